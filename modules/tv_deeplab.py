"""The torchvision-style DeepLab-v3 of SSUL's lineage (docs/behaviour.md, SSUL section).

Body: torchvision's ResNet (``modules.tv_resnet``: plain BatchNorm + ReLU; ``layer4`` dilated
for output stride 16, ``layer3`` and ``layer4`` for 8), of which only ``layer4``'s map is used.
Classifier: torchvision's ASPP (1x1, three atrous 3x3, image pooling; projection with dropout
0.1) and one head per entry of ``num_classes`` (3x3 conv + BN + ReLU + 1x1 conv); the logits
are the heads' outputs concatenated, upsampled bilinearly to the input size.

State-dict keys are SSUL's: ``backbone.<torchvision resnet keys without fc>``,
``classifier.aspp.*``, ``classifier.head.<k>.{0,1,3}.*``, so its checkpoints load as they are.

Also here: the new head's transfer from the unknown head, freezing a step's parameters, and
BatchNorm freezing (every BN in eval mode with its affine frozen whenever ``train()`` runs).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.segmentation.deeplabv3 import ASPP

from utils.errors import RunError

from .tv_resnet import (
    TV_BACKBONES,
    ResNetBody,
    imagenet_weights_file,
    set_bn_momentum,
    torchvision_resnet,
)

__all__ = ["TV_BACKBONES", "ASPP_RATES", "ResNetBody", "StepHeads", "DeepLabHead",
           "TVDeepLabV3", "make_tv_deeplab", "assemble_tv_deeplab", "imagenet_weights_file",
           "freeze_bn", "set_bn_momentum", "transfer_unknown_head", "load_previous_step",
           "freeze_for_step", "NetworkStateError"]

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
BACKBONE_BN_MOMENTUM = 0.01   # SSUL sets it on the body; the classifier keeps 0.1
HEAD_DROPOUT = 0.1


class NetworkStateError(RunError):
    """A state dict that does not fit the network of this step."""


# ------------------------------------------------------------------------ classifier
def _head(classes, channels):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, classes, 1))


class StepHeads(nn.ModuleList):
    """One head per entry of ``num_classes``; the output concatenates them in order."""

    def __init__(self, num_classes, channels=256):
        super().__init__(_head(c, channels) for c in num_classes)
        self.num_classes = list(num_classes)

    def forward(self, features):
        return torch.cat([head(features) for head in self], dim=1)


def _init_classifier(module):
    # Kaiming-normal (fan-in, gain sqrt 2) convs, BN at identity; conv biases keep their init
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DeepLabHead(nn.Module):
    """ASPP (``aspp``) then the per-step heads (``head``)."""

    def __init__(self, in_channels, num_classes, rates=ASPP_RATES[16], channels=256,
                 dropout=HEAD_DROPOUT):
        super().__init__()
        self.aspp = ASPP(in_channels, list(rates), channels)
        self.aspp.project[3] = nn.Dropout(dropout)   # torchvision's is 0.5
        self.head = StepHeads(num_classes, channels)
        _init_classifier(self)

    def forward(self, features):
        return self.head(self.aspp(features))


class TVDeepLabV3(nn.Module):
    """``backbone`` then ``classifier``; logits upsampled to the input size.

    ``bn_freeze``: every ``train()`` call puts all BatchNorm layers in eval mode and freezes
    their affine parameters (SSUL at steps > 0; ASPP dropout stays active, S5)."""

    def __init__(self, backbone, classifier, bn_freeze=False):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.bn_freeze = bn_freeze

    @property
    def num_classes(self):
        return list(self.classifier.head.num_classes)

    def forward(self, x):
        size = x.shape[-2:]
        logits = self.classifier(self.backbone(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def train(self, mode=True):
        super().train(mode)
        if self.bn_freeze:
            freeze_bn(self)
        return self


def freeze_bn(module):
    """Every BatchNorm of ``module`` in eval mode, weight and bias without gradient."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            if m.affine:
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)


def make_tv_deeplab(num_classes, backbone="resnet101", output_stride=16, weights=None,
                    bn_freeze=False, head_channels=256, dropout=HEAD_DROPOUT):
    """SSUL's network for the per-step class counts ``num_classes`` (with the unknown class:
    ``[1, 1, n_0 - 1, n_1, ...]``). ``weights``: a torchvision ImageNet state dict or file,
    loaded strictly into the whole ResNet before ``fc`` is dropped; None = random weights."""
    net = torchvision_resnet(backbone, output_stride)
    if weights is not None:
        state = weights if isinstance(weights, dict) else torch.load(
            weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return assemble_tv_deeplab(ResNetBody(net), TV_BACKBONES[backbone], num_classes,
                               output_stride, bn_freeze=bn_freeze, head_channels=head_channels,
                               dropout=dropout)


def assemble_tv_deeplab(body, in_channels, num_classes, output_stride=16, *, bn_freeze=False,
                        head_channels=256, dropout=HEAD_DROPOUT):
    """SSUL's network around any ``body`` returning an ``in_channels`` map: the body's BN
    momentum becomes 0.01, the classifier is built and initialised."""
    set_bn_momentum(body, BACKBONE_BN_MOMENTUM)
    classifier = DeepLabHead(in_channels, num_classes, ASPP_RATES[output_stride],
                             head_channels, dropout)
    return TVDeepLabV3(body, classifier, bn_freeze=bn_freeze)


# --------------------------------------------------------------- step-to-step state
def transfer_unknown_head(heads):
    """The last head takes the unknown head's (``heads[0]``) 3x3 conv, BN affine and running
    statistics (not ``num_batches_tracked``, S20), and every row of its 1x1 conv and bias is the
    unknown head's single row: each new class starts with the unknown logit."""
    unknown, new = heads[0], heads[-1]
    with torch.no_grad():
        new[0].weight.copy_(unknown[0].weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new[1], name).copy_(getattr(unknown[1], name))
        new[3].weight.copy_(unknown[3].weight.expand_as(new[3].weight))
        new[3].bias.copy_(unknown[3].bias.expand_as(new[3].bias))


def load_previous_step(model, state_dict, *, unknown, w_transfer):
    """Load the previous step's state dict into this step's ``model`` (which has one head
    more): every key must fit, only the new head may be missing. With ``unknown`` and
    ``w_transfer`` the new head is then initialised from the unknown head; otherwise it keeps
    its fresh initialisation. SSUL's checkpoint dictionary (its ``model_state``) is accepted
    as well; a ``module.`` prefix is stripped."""
    if "model_state" in state_dict:
        state_dict = state_dict["model_state"]
    state = {k[len("module."):] if k.startswith("module.") else k: v
             for k, v in state_dict.items()}
    heads = model.classifier.head
    new_prefix = f"classifier.head.{len(heads) - 1}."
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(new_prefix)]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise NetworkStateError(
            f"the previous step's checkpoint does not fit this step's network (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {reshaped[:3]}): was "
            f"it written for the same task, backbone and unknown-class setting?")
    model.load_state_dict(state, strict=False)
    if unknown and w_transfer:
        transfer_unknown_head(heads)
    return model


def freeze_for_step(model, step, *, freeze, unknown):
    """SSUL's ``--freeze`` at step > 0: only the new head (and with ``unknown`` the unknown
    and background heads) keeps gradients. Step 0 or ``freeze=False``: everything trains."""
    train_all = step == 0 or not freeze
    for p in model.parameters():
        p.requires_grad_(train_all)
    if not train_all:
        heads = model.classifier.head
        trained = [heads[-1]] + ([heads[0], heads[1]] if unknown else [])
        for head in trained:
            for p in head.parameters():
                p.requires_grad_(True)
    return model
