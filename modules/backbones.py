"""Bodies from timm: the Swin family (``--backbone swin_b`` ...) and any timm model that
exposes feature maps (``--backbone timm:<name>``), and where their ImageNet weights come
from (docs/behaviour.md §20)."""
import os
from collections import OrderedDict

import torch.nn as nn

from utils.checkpoint import CheckpointError, load_model_state
from utils.errors import UserError

from .swin import SWIN_VARIANTS, load_swin_weights, make_swin, read_weights_file

TIMM_PREFIX = "timm:"
RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# the largest stride of the map the head reads that its ASPP rates can still work on
MAX_HEAD_STRIDE = 32
# classification parts of a timm checkpoint that a body does not keep
CLASSIFIER_PREFIXES = ("head.", "head_drop.", "fc.", "classifier.", "fc_norm.", "norm.",
                       "pre_logits.")


class BackboneError(UserError, ValueError):
    """A --backbone that cannot be built."""


def is_timm_backbone(name):
    return name in SWIN_VARIANTS or name.startswith(TIMM_PREFIX)


def backbone_choice(value):
    """argparse type of ``--backbone``: a ResNet, a Swin name or ``timm:<model>``."""
    if value in RESNET_BACKBONES or value in SWIN_VARIANTS:
        return value
    if value.startswith(TIMM_PREFIX) and len(value) > len(TIMM_PREFIX):
        return value
    import argparse
    raise argparse.ArgumentTypeError(
        f"unknown backbone {value!r}; choose one of {', '.join(RESNET_BACKBONES)}, "
        f"{', '.join(SWIN_VARIANTS)}, or timm:<model name>")


class TimmFeatureBody(nn.Module):
    """Any timm model with ``forward_intermediates``: the head reads its last feature map,
    PLOP the earlier ones. Its stride is ``strides[-1]`` (timm's ``feature_info``)."""

    has_unused_parameters = True

    def __init__(self, name):
        super().__init__()
        import timm
        if not timm.is_model(name):
            raise BackboneError(f"--backbone timm:{name}: timm {timm.__version__} has no model "
                                f"{name!r} (timm.list_models() lists them)")
        try:   # transformers with a fixed input size accept any size with this option
            trunk = timm.create_model(name, pretrained=False, num_classes=0,
                                      dynamic_img_size=True)
        except TypeError:
            trunk = timm.create_model(name, pretrained=False, num_classes=0)
        info = getattr(trunk, "feature_info", None)
        if not hasattr(trunk, "forward_intermediates") or not info:
            raise BackboneError(f"--backbone timm:{name}: this model exposes no feature maps "
                                "(no forward_intermediates / feature_info in timm); choose a "
                                "model that does (Swin, ConvNeXt, ViT, ResNet ...)")
        self.strides = [f["reduction"] for f in info]
        self.stage_channels = [f["num_chs"] for f in info]
        if self.strides[-1] > MAX_HEAD_STRIDE:
            raise BackboneError(f"--backbone timm:{name}: its last feature map has stride "
                                f"{self.strides[-1]}, more than {MAX_HEAD_STRIDE}; the "
                                "DeepLab head cannot work on it")
        try:   # the final norm and classifier are never used: no parameter without gradient
            trunk.prune_intermediate_layers(list(range(len(info))), prune_norm=True)
        except (AttributeError, NotImplementedError, TypeError):
            pass
        self.name = name
        self.trunk = trunk
        self.out_channels = self.stage_channels[-1]

    def forward(self, x, ret_attentions=False):
        maps = self.trunk.forward_intermediates(x, intermediates_only=True)
        if not ret_attentions:
            return maps[-1]
        return maps[-1], list(maps[:-1])


def make_timm_body(backbone, swin_shift_order="pad_then_shift", init_weights=True):
    if backbone in SWIN_VARIANTS:
        return make_swin(backbone, shift_order=swin_shift_order, init_weights=init_weights)
    return TimmFeatureBody(backbone[len(TIMM_PREFIX):])


# ------------------------------------------------------------------------------------------
# ImageNet weights

def weights_file_name(backbone):
    if backbone in SWIN_VARIANTS:
        return SWIN_VARIANTS[backbone].file
    return backbone[len(TIMM_PREFIX):] + ".pth"


def timm_cache_file(backbone):
    """The ImageNet weights in timm's own (Hugging Face) cache, or None. Nothing is
    downloaded."""
    if backbone in SWIN_VARIANTS:
        tag = {"swin_b_22k": ".ms_in22k_ft_in1k", "swin_l": ".ms_in22k_ft_in1k",
               "swin_l_224": ".ms_in22k_ft_in1k"}.get(backbone, ".ms_in1k")
        name = SWIN_VARIANTS[backbone].timm_name + tag
    else:
        name = backbone[len(TIMM_PREFIX):]
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(name)
        repo = cfg.hf_hub_id if cfg is not None else None
        if not repo:
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo_id=repo, filename=filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    except Exception:   # no cache, no hub client, an unknown tag: not there
        return None
    return None


def timm_weights_path(backbone, pretrained_dir):
    """``<pretrained_dir>/<file>`` when it is there, else timm's cached copy, else the
    local path (whose absence ``require_timm_weights`` reports)."""
    local = os.path.join(pretrained_dir, weights_file_name(backbone))
    if os.path.isfile(local):
        return local
    return timm_cache_file(backbone) or local


def missing_weights_message(backbone, path):
    if backbone in SWIN_VARIANTS:
        return (f"ImageNet weights not found: {path}. Download {weights_file_name(backbone)} "
                "from the Swin Transformer releases (github.com/SwinTransformer/storage, "
                "release v1.0.0; see the README, 'Backbones') and save it under that name, or "
                "pass --no_pretrained to start from random weights")
    return (f"ImageNet weights not found: {path}. Save the timm state dict of "
            f"{backbone[len(TIMM_PREFIX):]} under that name (or let timm cache it), or pass "
            "--no_pretrained to start from random weights")


def load_timm_weights(body, path, norm3_from_file=False):
    if isinstance(body, TimmFeatureBody):
        return load_timm_feature_weights(body, path)
    return load_swin_weights(body, path, norm3_from_file=norm3_from_file)


def load_timm_feature_weights(body, path):
    """A timm state dict (``.pth`` or ``.safetensors``) into ``body.trunk``, through the
    model's own checkpoint filter; only its classifier parts may be left over."""
    state = read_weights_file(path, "ImageNet weights")
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise CheckpointError(f"ImageNet weights {path} hold no state dict")
    import sys
    filter_fn = getattr(sys.modules[type(body.trunk).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, body.trunk)
    own = body.trunk.state_dict()
    state = OrderedDict((k, v) for k, v in state.items()
                        if k in own or not k.startswith(CLASSIFIER_PREFIXES))
    return load_model_state(body.trunk, state, strict=True, source=f"ImageNet weights {path}")
