"""Swin Transformer bodies from timm, set up as NeST runs Swin-B under the DeepLab-v3 head
(docs/behaviour.md §20, quirks W1-W13).

The body keeps timm's ``patch_embed`` and ``layers`` (timm's key names: merging at the
start of a stage) and adds its own LayerNorms ``norm0..norm3`` on the four stage outputs.
``body(x)`` is the last stage's normalised map (stride 32), ``body(x, ret_attentions=True)``
also the first three: ``(out4, [out1, out2, out3])``, the maps PLOP distils.

Every block pads its map to whole windows *before* the cyclic shift, as NeST's copy of the
Swin code does (W6); timm shifts first. ``shift_order="timm"`` keeps timm's own order."""
import re
import types
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import CheckpointError, load_model_state, load_trusted


@dataclass(frozen=True)
class SwinVariant:
    timm_name: str
    file: str               # ImageNet weights as the Swin authors release them
    drop_path_rate: float


# --backbone name -> timm model, file under --pretrained_dir, stochastic depth
SWIN_VARIANTS = {
    "swin_b": SwinVariant("swin_base_patch4_window12_384",
                          "swin_base_patch4_window12_384.pth", 0.3),
    "swin_b_22k": SwinVariant("swin_base_patch4_window12_384",
                              "swin_base_patch4_window12_384_22kto1k.pth", 0.3),
    "swin_b_224": SwinVariant("swin_base_patch4_window7_224",
                              "swin_base_patch4_window7_224.pth", 0.3),
    "swin_l": SwinVariant("swin_large_patch4_window12_384",
                          "swin_large_patch4_window12_384_22kto1k.pth", 0.3),
    "swin_l_224": SwinVariant("swin_large_patch4_window7_224",
                              "swin_large_patch4_window7_224_22kto1k.pth", 0.3),
    "swin_t": SwinVariant("swin_tiny_patch4_window7_224",
                          "swin_tiny_patch4_window7_224.pth", 0.2),
}
SHIFT_ORDERS = ("pad_then_shift", "timm")
# keys of a classification checkpoint that the segmentation body does not have
CLASSIFIER_PREFIXES = ("head.", "norm.")


def relative_position_index(ws):
    """index[n, m] = (h_n - h_m + ws - 1)(2 ws - 1) + (w_n - w_m + ws - 1), tokens row-major."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    coords = coords.flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + ws - 1
    return rel[0] * (2 * ws - 1) + rel[1]


def _window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _window_reverse(windows, ws, B, H, W):
    C = windows.shape[-1]
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def _pad_then_shift_attn(self, x):
    """NeST's order for one block (replaces ``SwinTransformerBlock._attn``): zero-pad at the
    bottom/right to whole windows, then roll by the shift, window attention with the mask of
    the padded map, roll back, crop. The shift applies whatever the map size (W6)."""
    B, H, W, C = x.shape
    wh, ww = self.window_size
    sh, sw = self.shift_size
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    Hp, Wp = x.shape[1:3]
    shifted = sh > 0 or sw > 0
    if shifted:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    mask = self.get_attn_mask(x) if shifted else None
    out = self.attn(_window_partition(x, wh), mask=mask)
    x = _window_reverse(out, wh, B, Hp, Wp)
    if shifted:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class SwinBody(nn.Module):
    """timm's Swin trunk (always full windows, any input size) + LayerNorms on its stages."""

    # norm0..norm2 feed only the maps a distillation loss reads: without one they get no
    # gradient, which DDP must be told about (engine.build.wrap_ddp)
    has_unused_parameters = True

    def __init__(self, variant, shift_order="pad_then_shift", init_weights=True):
        """``init_weights=False``: the trunk's parameters are left uninitialised (a file
        loaded next overwrites all of them; saves timm's random init of ~90M values)."""
        super().__init__()
        import timm
        from timm.models.swin_transformer import SwinTransformerBlock
        if shift_order not in SHIFT_ORDERS:
            raise ValueError(f"shift_order must be one of {SHIFT_ORDERS}, got {shift_order!r}")
        kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=variant.drop_path_rate,
                      always_partition=True, strict_img_size=False)
        if init_weights:
            trunk = timm.create_model(variant.timm_name, **kwargs)
        else:
            with torch.device("meta"):
                trunk = timm.create_model(variant.timm_name, **kwargs)
            trunk.to_empty(device="cpu")
            for m in trunk.modules():   # the index buffers are computed, not loaded
                if isinstance(getattr(m, "relative_position_index", None), torch.Tensor):
                    index = relative_position_index(m.window_size[0])
                    m.relative_position_index.copy_(index.view_as(m.relative_position_index))
        self.variant = variant
        self.patch_size = trunk.patch_embed.patch_size
        self.patch_embed = trunk.patch_embed
        self.layers = trunk.layers
        dims = [info["num_chs"] for info in trunk.feature_info]
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))
        self.out_channels = dims[-1]
        self.stage_channels = dims
        self.strides = [info["reduction"] for info in trunk.feature_info]
        self.window_size = trunk.layers[0].blocks[0].window_size[0]
        if shift_order == "pad_then_shift":
            for block in self.layers.modules():
                if isinstance(block, SwinTransformerBlock):
                    block._attn = types.MethodType(_pad_then_shift_attn, block)

    def _stage_norm(self, i, x):
        return getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()

    def forward(self, x, ret_attentions=False):
        ph, pw = self.patch_size
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        x = self.patch_embed(x)                       # (B, H/4, W/4, C)
        stages = []
        for stage in self.layers:
            x = stage(x)
            stages.append(x)
        out = self._stage_norm(len(stages) - 1, stages[-1])
        if not ret_attentions:
            return out
        return out, [self._stage_norm(i, s) for i, s in enumerate(stages[:-1])]


def make_swin(backbone, shift_order="pad_then_shift", init_weights=True):
    return SwinBody(SWIN_VARIANTS[backbone], shift_order=shift_order, init_weights=init_weights)


# ------------------------------------------------------------------------------------------
# ImageNet weights

def read_weights_file(path, what):
    """A ``.safetensors`` file (timm's cache) or a ``torch.save`` file."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:   # a damaged or foreign file
            raise CheckpointError(f"cannot load {what} {path}: {e}") from e
    return load_trusted(path, what=what)


def swin_state_from_file(checkpoint, path):
    """The state dict of a Swin file: the authors' release (``{"model": ...}``, merging at
    the end of a stage) or timm's (bare, or under ``state_dict``)."""
    state = checkpoint
    if isinstance(state, dict):
        for entry in ("model", "state_dict"):
            if isinstance(state.get(entry), dict):
                state = state[entry]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v)
                                                           for v in state.values()):
        raise CheckpointError(f"Swin weights {path} hold no state dict (expected the Swin "
                              "release's {'model': ...} or a timm state dict)")
    return state


def load_swin_weights(body, path, norm3_from_file=False):
    """Load a Swin ImageNet file into ``body`` strictly. Expected differences, and only
    these: the file's relative-position index buffers and shift masks (rebuilt by timm),
    its classifier ``head.*`` and final ``norm.*``, and the body's ``norm0..3`` (not in the
    file: they start at 1/0, W2; ``norm3_from_file`` takes ``norm3`` from the file's
    ``norm.*``). A window other than the body's is an error, not a resize (W7)."""
    state = swin_state_from_file(read_weights_file(path, "Swin weights"), path)
    own = body.state_dict()
    wrong = [f"{k} {list(v.shape)}" for k, v in state.items()
             if k.endswith("relative_position_bias_table") and k in own
             and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"Swin weights {path} are for another window size ({wrong[0]}; the body "
            f"{body.variant.timm_name} has window {body.window_size}): pick the --backbone "
            "of that file (e.g. swin_b_224 for *_window7_224.pth)")
    # the release's layout -> timm's (buffers dropped, merging moved to the next stage);
    # timm's own filter is not used: older timm releases misread headless timm files
    state = nest_to_project_keys(state) if merges_at_stage_end(state) else OrderedDict(
        (k, v) for k, v in state.items() if not k.endswith(("relative_position_index",
                                                              "attn_mask")))
    final_norm = {k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")}
    state = OrderedDict((k, v) for k, v in state.items()
                        if not k.startswith(CLASSIFIER_PREFIXES))
    stage_norms = [k for k in own if k.startswith(("norm0.", "norm1.", "norm2.", "norm3."))]
    for k in stage_norms:
        state[k] = own[k]
    if norm3_from_file:
        if not final_norm:
            raise CheckpointError(f"Swin weights {path} have no final norm.* to start norm3 "
                                  "from; drop --swin_norm3_from_file")
        for k, v in final_norm.items():
            state[f"norm3.{k}"] = v
    return load_model_state(body, state, strict=True, source=f"Swin weights {path}")


# ------------------------------------------------------------------------------------------
# key layouts: the Swin release and NeST's checkpoints merge at the end of a stage and save
# the index buffers; timm and this project merge at the start of the next stage

_DOWNSAMPLE = re.compile(r"((?:^|\.)layers\.)(\d+)(\.downsample\.)")
_TABLE = re.compile(r"(?:^|\.)layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")


def merges_at_stage_end(state):
    """True for the Swin release / NeST layout (``layers.0.downsample`` exists)."""
    return any(_DOWNSAMPLE.search(k) and _DOWNSAMPLE.search(k).group(2) == "0" for k in state)


def nest_to_project_keys(state):
    """A NeST-layout Swin state (any key prefix kept) in this project's layout: the index
    and mask buffers dropped, ``layers.<i>.downsample`` -> ``layers.<i+1>.downsample``."""
    out = OrderedDict()
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        out[_DOWNSAMPLE.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}", k)] = v
    return out


def infer_swin(state):
    """The ``--backbone`` whose Swin layout the keys follow (``swin_b`` stands for the
    window-12 Swin-B files of either pre-training), or None."""
    depths, window, embed = {}, None, None
    for k, v in state.items():
        m = _TABLE.search(k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            window = (round(v.shape[0] ** 0.5) + 1) // 2
        if k.endswith("patch_embed.proj.weight"):
            embed = v.shape[0]
    known = {(96, (2, 2, 6, 2), 7): "swin_t", (128, (2, 2, 18, 2), 12): "swin_b",
             (128, (2, 2, 18, 2), 7): "swin_b_224", (192, (2, 2, 18, 2), 12): "swin_l",
             (192, (2, 2, 18, 2), 7): "swin_l_224"}
    return known.get((embed, tuple(depths.get(i, 0) for i in range(4)), window))
