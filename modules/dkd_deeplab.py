"""DKD's segmentation network (docs/behaviour.md §19.3): the torchvision ResNet body of
``modules.tv_resnet`` (shared with SSUL's network) at output stride 16, DKD's ASPP head
(torchvision's ASPP with a 0.1 dropout and an extra 3x3 conv), and per-step sigmoid
classifiers ``cls[0..t]`` whose first one, the auxiliary classifier, sees the head output
detached.

``forward(x, ret_intermediate=False)`` returns ``(logits, {})``, or with ``ret_intermediate``
``(logits, {"neg_reg": N, "pos_reg": P})``: the head output seen through the positive and the
negative parts of the class weights (auxiliary classifier excluded, no bias), before
upsampling. State-dict keys are DKD's: ``backbone.*`` (torchvision names), ``aspp.*``,
``cls.<k>.*``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP

from . import tv_resnet
from .tv_resnet import set_bn_momentum

__all__ = ["DKD_BACKBONES", "ResNetBody", "DKDASPP", "DKDDeepLab", "make_dkd_deeplab",
           "load_imagenet_body", "freeze_bn", "freeze_dropout", "apply_step_freezing",
           "set_bn_momentum", "positive_part", "negative_part"]

DKD_BACKBONES = tuple(tv_resnet.TV_BACKBONES)
HEAD_CHANNELS = 256
ASPP_RATES = (6, 12, 18)
HEAD_DROPOUT = 0.1
BACKBONE_BN_MOMENTUM = 0.01   # DKD's current model; every other BN keeps torch's 0.1


class ResNetBody(tv_resnet.ResNetBody):
    """The shared torchvision body (``modules.tv_resnet``) at DKD's only output stride, 16:
    ``layer4`` keeps its resolution (first block without stride, later 3x3 convs dilation 2).
    Built by name; ``out_channels`` is the last stage's width."""

    def __init__(self, name="resnet101", output_stride=16):
        if name not in DKD_BACKBONES:
            raise ValueError(f"unknown DKD backbone {name!r}; valid: {', '.join(DKD_BACKBONES)}")
        if output_stride != 16:
            raise ValueError(f"DKD's network has output stride 16, got {output_stride}")
        super().__init__(tv_resnet.torchvision_resnet(name, output_stride))


def load_imagenet_body(body, state_dict):
    """torchvision's ImageNet weights into the body, ``fc.*`` dropped, not strictly (as DKD);
    returns torch's (missing, unexpected) keys."""
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    return body.load_state_dict(state, strict=False)


class DKDASPP(ASPP):
    """torchvision's ASPP (1x1, three dilated 3x3 and an image-pooling branch, each conv +
    BN + ReLU, concatenated and projected) with a 0.1 dropout after the projection, followed by
    ``last_conv`` (3x3 conv + BN + ReLU), so its output is >= 0. Convs Kaiming-normal (fan-in,
    gain sqrt 2), BN weight 1 and bias 0."""

    def __init__(self, in_channels, out_channels=HEAD_CHANNELS, rates=ASPP_RATES,
                 dropout=HEAD_DROPOUT):
        super().__init__(in_channels, list(rates), out_channels)
        self.project[3] = nn.Dropout(dropout)
        self.last_conv = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.last_conv(super().forward(x))


def positive_part(weight):
    """W where W > 0, else 0; its gradient reaches only the entries > 0 (an exact 0 gets none)."""
    return torch.where(weight > 0, weight, torch.zeros_like(weight))


def negative_part(weight):
    """W where W < 0, else 0 (gradient only on the entries < 0)."""
    return torch.where(weight < 0, weight, torch.zeros_like(weight))


class DKDDeepLab(nn.Module):
    """``backbone`` -> ``aspp`` (head output f, ``head_channels`` maps) -> ``cls[0]`` (the
    auxiliary classifier, one channel, on f detached) and ``cls[1..t]`` (``classes[k]``
    channels each), concatenated and upsampled bilinearly to the input size."""

    def __init__(self, backbone, aspp, head_channels, classes):
        super().__init__()
        if not isinstance(classes, (list, tuple)) or not classes or min(classes) < 1:
            raise ValueError(f"classes must be a non-empty list of per-step class counts "
                             f"(foreground only), got {classes!r}")
        self.backbone = backbone
        self.aspp = aspp
        self.classes = list(classes)
        self.cls = nn.ModuleList([nn.Conv2d(head_channels, 1, 1)]
                                 + [nn.Conv2d(head_channels, c, 1) for c in classes])
        for conv in self.cls:     # biases keep torch's default U(+-1/sqrt(fan_in))
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    @property
    def n_channels(self):
        """Output channels: the auxiliary one plus every class."""
        return 1 + sum(self.classes)

    # -- the classifiers on the head output --------------------------------------------------
    def forward_class_prediction(self, f):
        """Logits before upsampling: [aux (from f detached), step 0 classes, ..., step t]."""
        return torch.cat([self.cls[0](f.detach())] + [c(f) for c in self.cls[1:]], dim=1)

    def forward_class_prediction_positive(self, f):
        """P = concat over k >= 1 of W_k^+ f (no bias)."""
        return torch.cat([F.conv2d(f, positive_part(c.weight)) for c in self.cls[1:]], dim=1)

    def forward_class_prediction_negative(self, f):
        """N = concat over k >= 1 of W_k^- f (no bias)."""
        return torch.cat([F.conv2d(f, negative_part(c.weight)) for c in self.cls[1:]], dim=1)

    def forward(self, x, ret_intermediate=False):
        f = self.aspp(self.backbone(x))
        small = self.forward_class_prediction(f)
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not ret_intermediate:
            return logits, {}
        return logits, {"neg_reg": self.forward_class_prediction_negative(f),
                        "pos_reg": self.forward_class_prediction_positive(f)}

    # -- step hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def init_novel_classifier(self):
        """Every row of the newest classifier := the auxiliary row (weight and bias)."""
        new, aux = self.cls[-1], self.cls[0]
        new.weight.copy_(aux.weight.expand_as(new.weight))
        new.bias.copy_(aux.bias.expand_as(new.bias))

    def freeze_bn(self, affine_freeze=False):
        freeze_bn(self, affine_freeze)

    def freeze_dropout(self):
        freeze_dropout(self)


def freeze_bn(module, affine_freeze=False):
    """Every BatchNorm to eval mode (running statistics kept); ``affine_freeze`` also stops
    the gradients of their affine parameters (DKD leaves them on, D19)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if affine_freeze:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)


def freeze_dropout(module):
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


def apply_step_freezing(model, step, freeze_all_bn):
    """What DKD does after every ``model.train()``: with ``freeze_all_bn`` every BN in eval
    mode; at step >= 1 the dropout off, whatever ``freeze_all_bn``."""
    if freeze_all_bn:
        freeze_bn(model)
    if step > 0:
        freeze_dropout(model)


def make_dkd_deeplab(classes, backbone="resnet101", output_stride=16,
                     backbone_bn_momentum=BACKBONE_BN_MOMENTUM, imagenet_state=None):
    """DKD's network for per-step class counts ``classes`` (foreground only), random weights
    or the body from ``imagenet_state`` (a torchvision ImageNet state dict)."""
    body = ResNetBody(backbone, output_stride)
    if imagenet_state is not None:
        load_imagenet_body(body, imagenet_state)
    if backbone_bn_momentum is not None:
        set_bn_momentum(body, backbone_bn_momentum)
    return DKDDeepLab(body, DKDASPP(body.out_channels), HEAD_CHANNELS, classes)
