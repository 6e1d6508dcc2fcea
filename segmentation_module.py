"""The incremental segmentation network (ResNet body + DeepLab-v3 head + one classifier per
step), its construction from the options, and moving weights in and out of it.

State-dict keys are those of the original: ``body.*`` / ``head.*`` / ``cls.<k>.*``, and in
checkpoint files every key carries the ``module.`` prefix of the DDP wrapper the original
saves through. Helpers here accept keys with or without it."""
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import DeeplabV3, is_norm_layer, make_resnet, norm_act_factory
from modules.backbones import (
    is_timm_backbone,
    load_timm_weights,
    make_timm_body,
    missing_weights_message,
    timm_weights_path,
)

# re-exported: the names ported code imports from here
from utils.checkpoint import (  # noqa: F401
    PREFIX,
    CheckpointError,
    add_module_prefix,
    load_model_state,
    load_trusted,
    model_state_for_checkpoint,
    strip_module_prefix,
)
from utils.compile import unwrap  # noqa: F401

HEAD_CHANNELS = 256
IMAGENET_CLASSIFIER_KEYS = ("classifier.fc.weight", "classifier.fc.bias")


class PretrainedWeightsNotFound(CheckpointError):
    """The ImageNet weights file the body should start from is not there."""


class IncrementalSegmentationModule(nn.Module):
    """``body`` -> ``head`` -> concatenation of the per-step 1x1 classifiers ``cls[k]``
    (``classes[k]`` outputs each), upsampled bilinearly to the input size."""

    def __init__(self, body, head, head_channels, classes, ncm=False, fusion_mode="mean"):
        super().__init__()
        if not isinstance(classes, (list, tuple)) or not classes:
            raise ValueError(f"classes must be a non-empty list of per-step class counts, "
                             f"got {classes!r}")
        self.body = body
        self.head = head
        self.cls = nn.ModuleList([nn.Conv2d(head_channels, n, 1) for n in classes])
        self.classes = list(classes)
        self.head_channels = head_channels
        self.tot_classes = sum(self.classes)
        # kept for compatibility with the original's signature; neither has any effect
        self.ncm = ncm
        self.fusion_mode = fusion_mode

    def _network(self, x, ret_attentions=False):
        attentions = None
        if ret_attentions:
            features, attentions = self.body(x, ret_attentions=True)
        else:
            features = self.body(x)
        pre_logits = self.head(features)
        logits = torch.cat([c(pre_logits) for c in self.cls], dim=1)
        return logits, features, pre_logits, attentions

    def forward(self, x, ret_intermediate=False, ret_attentions=False):
        """Returns ``(logits at the input's size, extras)``. ``extras`` is ``{}``; with
        ``ret_intermediate`` truthy ``{"body": body output, "pre_logits": head output}``;
        with ``ret_attentions`` also PLOP's maps: ``"attentions"`` = the pre-activation
        outputs of the last block of each ResNet stage and the head output, and
        ``"sem_logits_small"`` = the logits before upsampling."""
        small, features, pre_logits, attentions = self._network(x, ret_attentions)
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        extras = {}
        if ret_intermediate or ret_attentions:
            extras = {"body": features, "pre_logits": pre_logits}
        if ret_attentions:
            extras["attentions"] = attentions + [pre_logits]
            extras["sem_logits_small"] = small
        return logits, extras

    def init_new_classifier(self, device=None):
        """MiB's background-based initialisation of the newest classifier: every new class
        gets the background row of ``cls[0]`` and the bias ``b_bg - ln(N + 1)``; the old
        background bias is set to that value too (as the original does)."""
        if len(self.cls) < 2:
            raise ValueError("init_new_classifier needs a model with at least two steps")
        new = self.cls[-1]
        if device is None:
            device = new.weight.device
        with torch.no_grad():
            w_bg = self.cls[0].weight[0]
            b_bg = self.cls[0].bias[0]
            # ln(N + 1) in float32, as the original computes it
            shift = torch.log(torch.tensor([float(self.classes[-1] + 1)],
                                           dtype=torch.float32)).to(device)
            new_bias = b_bg - shift
            new.weight.copy_(w_bg)
            new.bias.copy_(new_bias)
            self.cls[0].bias[0].copy_(new_bias.squeeze(0))

    def fix_bn(self):
        """Every norm layer to eval mode with frozen affine parameters (``--fix_bn``).
        A later ``model.train()`` puts the layers back in training mode, as in the original."""
        for m in self.modules():
            if is_norm_layer(m):
                m.eval()
                m.weight.requires_grad = False
                m.bias.requires_grad = False


# ------------------------------------------------------------------------------------------
# state dicts and files

def pretrained_path(backbone, norm_act, pretrained_dir="pretrained"):
    """The original's file name for the ImageNet weights of a body; for the timm bodies
    the released file's name (or timm's cached copy, modules/backbones.py)."""
    if is_timm_backbone(backbone):
        return timm_weights_path(backbone, pretrained_dir)
    return os.path.join(pretrained_dir, f"{backbone}_{norm_act}.pth.tar")


def require_pretrained(path, backbone=None):
    """Stop early, with what to do, when the ImageNet weights file is missing."""
    if not os.path.isfile(path) and backbone is not None and is_timm_backbone(backbone):
        raise PretrainedWeightsNotFound(missing_weights_message(backbone, path))
    if not os.path.isfile(path):
        raise PretrainedWeightsNotFound(
            f"ImageNet weights not found: {path}. Download the In-Place ABN ImageNet "
            "checkpoint (In-Place ABN project releases; see the README, 'Pretrained weights') "
            "and save it under that name, or pass --no_pretrained to start from random "
            "weights")


def load_imagenet_weights(body, path, cut_seven=False):
    """Load an In-Place ABN ImageNet checkpoint (entry ``state_dict``, keys with or without
    ``module.``) into ``body``, strictly, without the ImageNet classifier. ``cut_seven``:
    PLOP's rule (P20, ``--protocol plop``): every key loses its first 7 characters, so the
    file must carry ``module.``."""
    require_pretrained(path)
    checkpoint = load_trusted(path, what="ImageNet weights")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"ImageNet weights {path} hold no state dict (expected a dict "
                              "with the entry 'state_dict', as the In-Place ABN releases)")
    keys = (OrderedDict((k[7:], v) for k, v in state.items()) if cut_seven
            else strip_module_prefix(state))
    state = OrderedDict((k, v) for k, v in keys.items() if k not in IMAGENET_CLASSIFIER_KEYS)
    return load_model_state(body, state, strict=True, source=f"ImageNet weights {path}")


def body_stride(body):
    """The stride of the map the head reads (the timm bodies: 32 for Swin)."""
    strides = getattr(body, "strides", None)
    return strides[-1] if strides else 32


def make_model(opts, classes=None):
    """Body (+ ImageNet weights unless ``opts.no_pretrained``), head and one classifier per
    entry of ``classes``. Reads ``backbone``, ``output_stride``, ``norm_act``, ``norm_impl``
    (``auto`` counts as ``torch``: resolve it first), ``no_pretrained``, ``pretrained_dir``
    and ``pooling``."""
    if classes is None:
        raise ValueError("make_model needs the per-step class counts (classes=[...]); the "
                         "original's non-incremental model does not exist")
    norm = norm_act_factory(opts.norm_act, opts.norm_impl)
    head_stride = opts.output_stride
    if is_timm_backbone(opts.backbone):
        path = None
        if not opts.no_pretrained:
            path = pretrained_path(opts.backbone, opts.norm_act, opts.pretrained_dir)
            require_pretrained(path, opts.backbone)
        # no random init of what the file overwrites
        body = make_timm_body(opts.backbone, getattr(opts, "swin_shift_order", "pad_then_shift"),
                              init_weights=path is None)
        if path is not None:
            load_timm_weights(body, path, getattr(opts, "swin_norm3_from_file", False))
        if getattr(opts, "head_rates_from_body", False):   # W1's fix: rates of stride 32
            head_stride = body_stride(body)
    else:
        body = make_resnet(opts.backbone, norm, output_stride=opts.output_stride)
        if not opts.no_pretrained:
            load_imagenet_weights(body, pretrained_path(opts.backbone, opts.norm_act,
                                                        opts.pretrained_dir),
                                  cut_seven=opts.protocol == "plop")
    head = DeeplabV3(body.out_channels, HEAD_CHANNELS, HEAD_CHANNELS,
                     out_stride=head_stride, norm_act=norm, pooling_size=opts.pooling)
    return IncrementalSegmentationModule(body, head, HEAD_CHANNELS, classes=list(classes),
                                         fusion_mode=opts.fusion_mode)
