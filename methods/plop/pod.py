"""PLOP's local POD feature distillation (docs/behaviour.md §15.4).

``features_distillation(old_maps, new_maps, ...)`` compares, map by map, a pooled embedding of
the old model's maps with that of the new model's maps and returns

    POD = (1/L) * sum over the maps l with factor_l > 0 of
              factor_l * schedule_l * mean over images b of alpha_l(b) * D_l(b)

with L the number of maps (skipped ones included), D_l(b) the L2 (or L1) distance of image b's
embeddings and schedule_l = sqrt(nb_current_classes / nb_new_classes). The keywords and
defaults are PLOP's; every quirk is reproduced by default, and three keyword-only switches
fix the quirks P10, P11 and P13.

Maps that arrive in float16/bfloat16 (autocast) are computed in float32; float64 maps stay
float64. The sum over maps is accumulated in a float32 scalar, as PLOP does (P12).
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from utils.errors import UserError

__all__ = ["PODError", "features_distillation", "_local_pod", "_local_pod_masked",
           "_global_pod", "_spatial_pod"]

_PREPROS = ("pow", "none", "relu")
_TYPES = ("spatial", "global", "local")
_DIFFERENCES = ("frobenius", "l1", "frobenius_mix")
_PART_KEYS = {"type", "factor", "norm", "prepro", "use_adaptative_factor", "extra_channels",
              "spp_scales", "use_pod_schedule", "apply_mask", "upscale_mask_topk",
              "mix_new_old"}
_SWITCH_KEYS = {"before", "after", "mask_position", "normalize_per_scale"}
_OPTION_KEYS = {"switch", "difference_function", "difference_function_all", "pool"}


class PODError(UserError, ValueError):
    """POD was given maps or options it is not defined for, or a map's term is not finite."""


# ------------------------------------------------------------------------------ helpers
def _upcast(x):
    # autocast maps: POD is computed in float32
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _no_autocast(device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _check_scales(spp_scales):
    scales = list(spp_scales)
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise PODError(f"spp_scales must be positive integers, got {spp_scales!r}")
    return scales


def _scale_divisor(index, scale, n_scales, normalize_per_scale):
    """rho_s: 1, s^2 (True) or the pyramid weights 2^(n-1), 2^(n-1), 2^(n-2), ... ("spm")."""
    if normalize_per_scale is True:
        return float(scale * scale)
    if normalize_per_scale == "spm":
        return float(2 ** (n_scales - 1) if index == 0 else 2 ** (n_scales - index))
    if normalize_per_scale is False or normalize_per_scale is None:
        return 1.0
    raise PODError(f"normalize_per_scale must be false, true or 'spm', got {normalize_per_scale!r}")


def _tile_sides(h, w, scale, per_axis_tiles):
    """P10: PLOP sizes the tiles by the width on both axes; the fix uses H // s and W // s."""
    return (h // scale if per_axis_tiles else w // scale), w // scale


def _check_map(x, name):
    if x.dim() != 4:
        raise PODError(f"{name} must be B x C x H x W, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------- embeddings
def _local_pod(x, spp_scales=(1, 2, 4), normalize=False, normalize_per_scale=False, *,
               per_axis_tiles=False):
    """Local POD embedding of x (B x C x H x W), B x D.

    For each scale s, the s x s tiles of side k = W // s (P10: the width sets the side on both
    axes; remainder rows/columns dropped, tiles clipped at the bottom) give their row means
    (mean over the width) and column means (mean over the height), channel-major, tiles in
    row-major order, each divided by rho_s (``normalize_per_scale``). A scale with k = 0 adds
    nothing; a tile left empty when H < W gives NaN columns, as in PLOP. ``normalize``
    L2-normalises each tile's row-mean and column-mean vectors (features_distillation never
    sets it). ``per_axis_tiles`` (P10 fix): tiles of H // s rows and W // s columns.
    """
    _check_map(x, "x")
    scales = _check_scales(spp_scales)
    b, c, h, w = x.shape
    parts = []
    for index, s in enumerate(scales):
        kh, kw = _tile_sides(h, w, s, per_axis_tiles)
        if kh == 0 or kw == 0:
            continue
        rho = _scale_divisor(index, s, len(scales), normalize_per_scale)
        if s * kh <= h:  # every tile is full: one reshape
            t = x[:, :, :s * kh, :s * kw].reshape(b, c, s, kh, s, kw)
            rows = t.mean(dim=5).permute(0, 2, 4, 1, 3).reshape(b, s, s, c * kh)
            cols = t.mean(dim=3).permute(0, 2, 3, 1, 4).reshape(b, s, s, c * kw)
            rows, cols = rows / rho, cols / rho
            if normalize:
                rows, cols = F.normalize(rows, p=2, dim=-1), F.normalize(cols, p=2, dim=-1)
            parts.append(torch.cat([rows, cols], dim=-1).reshape(b, -1))
            continue
        for i in range(s):  # clipped (or empty) bottom tiles
            for j in range(s):
                t = x[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]
                rows = t.mean(dim=3).reshape(b, -1) / rho
                cols = t.mean(dim=2).reshape(b, -1) / rho
                if normalize:
                    rows, cols = F.normalize(rows, p=2, dim=1), F.normalize(cols, p=2, dim=1)
                parts += [rows, cols]
    if not parts:
        return x.new_zeros((b, 0))
    return torch.cat(parts, dim=1)


def _local_pod_masked(x, mask, spp_scales=(1, 2, 4), normalize=False, normalize_per_scale=False,
                      *, per_axis_tiles=False):
    """Local POD of x with the pixels where ``mask`` (B x H x W) holds set to 0 on every channel.

    Only ``normalize_per_scale`` True divides by s^2; "spm" raises, as it does in PLOP (there a
    NameError). The zeroing is out of place (the caller's maps are not modified).
    """
    _check_map(x, "x")
    if normalize_per_scale == "spm":
        raise PODError("normalize_per_scale 'spm' is not available with the masked POD "
                       "(PLOP fails there too)")
    if mask.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1:] != x.shape[2:]:
        raise PODError(f"mask of shape {tuple(mask.shape)} does not match maps of shape "
                       f"{tuple(x.shape)}")
    x = x.masked_fill(mask.bool()[:, None], 0.)
    return _local_pod(x, spp_scales, normalize=normalize,
                      normalize_per_scale=normalize_per_scale is True,
                      per_axis_tiles=per_axis_tiles)


def _global_pod(x, spp_scales=(1, 2, 4), normalize=False, *, per_axis_tiles=False):
    """Global POD embedding: per scale, P = average pooling with kernel = stride = W // s
    (P10: from the width; per_axis_tiles: (H // s, W // s)), then [sum over h of P, sum over
    w of P]. ``normalize`` L2-normalises each of the two parts."""
    _check_map(x, "x")
    scales = _check_scales(spp_scales)
    b, _, h, w = x.shape
    parts = []
    for s in scales:
        kh, kw = _tile_sides(h, w, s, per_axis_tiles)
        if kh == 0 or kw == 0 or kh > h:
            raise PODError(f"global POD: scale {s} gives a pooling window of {kh} x {kw} on a "
                           f"{h} x {w} map")
        p = F.avg_pool2d(x, kernel_size=(kh, kw))
        horizontal = p.sum(dim=2).reshape(b, -1)
        vertical = p.sum(dim=3).reshape(b, -1)
        if normalize:
            horizontal = F.normalize(horizontal, p=2, dim=1)
            vertical = F.normalize(vertical, p=2, dim=1)
        parts += [horizontal, vertical]
    return torch.cat(parts, dim=1)


def _spatial_pod(x):
    """Spatial POD embedding: [sum over the width, sum over the height], no pyramid."""
    _check_map(x, "x")
    b = x.shape[0]
    return torch.cat([x.sum(dim=3).reshape(b, -1), x.sum(dim=2).reshape(b, -1)], dim=1)


# ---------------------------------------------------------------------------- the loss
def _collapse_new_logits(new, n_old, how, logsumexp):
    """The new logits map on the old channels. "sum" (P11): channel 0 := z_0 + sum of the new
    channels (raw logits); channels 1..C_old-1 kept. "trim": the first C_old channels.
    ``logsumexp`` (P11 fix): channel 0 := log-sum-exp of z_0 and the new channels."""
    if how == "trim":
        return new[:, :n_old]
    if how != "sum":
        raise PODError(f"extra_channels must be 'sum' or 'trim', got {how!r}")
    extra = new[:, n_old:]
    if logsumexp:
        background = torch.logsumexp(torch.cat([new[:, :1], extra], dim=1), dim=1, keepdim=True)
    else:
        background = new[:, :1] + extra.sum(dim=1, keepdim=True)
    return torch.cat([background, new[:, 1:n_old]], dim=1)


def _prepro(x, how):
    if how == "pow":
        return x.pow(2)
    if how == "none":
        return x
    if how == "relu":
        return x.clamp(min=0.)
    raise PODError(f"prepro must be one of {_PREPROS}, got {how!r} ('abs' fails in PLOP too)")


def _pod_mask(labels, n_old, apply_mask, outputs_old):
    """M = [y < C_old] ("background") or [y < C_old and y~ > 0] with y~ = y where y = 0 is
    replaced by the old argmax ("old")."""
    if labels is None or n_old is None:
        raise PODError("the masked POD needs labels and index_new_class")
    if apply_mask == "background":
        return labels < n_old
    if apply_mask == "old":
        if outputs_old is None:
            raise PODError("apply_mask 'old' needs outputs_old")
        relabelled = torch.where(labels == 0, outputs_old.argmax(dim=1), labels)
        return (labels < n_old) & (relabelled > 0)
    raise PODError(f"apply_mask must be 'background' or 'old', got {apply_mask!r}")


def _schedule(nb_current_classes, nb_new_classes):
    """sqrt(C_cur / C_new), the factor that grows as the step adds fewer classes."""
    if nb_new_classes == 0 or nb_current_classes / nb_new_classes < 0:
        raise PODError(f"the POD schedule needs nb_current_classes / nb_new_classes >= 0, got "
                       f"{nb_current_classes} / {nb_new_classes}")
    return math.sqrt(nb_current_classes / nb_new_classes)


def _refuse_unknown(mapping, known, what):
    unknown = set(mapping) - known
    if unknown:
        raise PODError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")


def _check_options(pod_options):
    _refuse_unknown(pod_options, _OPTION_KEYS, "pod_options")
    switch = pod_options.get("switch")
    if not switch:
        return None
    if not isinstance(switch, dict):
        raise PODError(f"pod_options['switch'] must be a dict, got {switch!r}")
    _refuse_unknown(switch, _SWITCH_KEYS, "pod_options['switch']")
    for name in ("before", "after"):
        part = switch.get(name)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise PODError(f"pod_options['switch'][{name!r}] must be a dict, got {part!r}")
        _refuse_unknown(part, _PART_KEYS, f"pod_options['switch'][{name!r}]")
    return switch


def _distance(ea, eb, how, mix_new_old):
    d = ea - eb
    if how == "frobenius":
        return torch.linalg.vector_norm(d, ord=2, dim=-1)
    if how == "l1":
        return torch.linalg.vector_norm(d, ord=1, dim=-1)
    if how == "frobenius_mix":
        # PLOP mixes the distances of images 0 and 1 of the batch (one scalar)
        if mix_new_old is None or d.shape[0] < 2:
            raise PODError("frobenius_mix needs 'mix_new_old' in the 'after' options and a "
                           "batch of at least 2 images")
        return (mix_new_old * torch.linalg.vector_norm(d[0], ord=2, dim=-1)
                + (1 - mix_new_old) * torch.linalg.vector_norm(d[1], ord=2, dim=-1))
    if how in ("kl", "bce"):
        raise PODError(f"difference function {how!r} needs 3-D embeddings; the embeddings are "
                       "B x D (PLOP fails there too)")
    raise PODError(f"difference function must be one of {_DIFFERENCES}, got {how!r}")


def features_distillation(list_attentions_a, list_attentions_b, collapse_channels="spatial",
                          normalize=True, labels=None, index_new_class=None, pod_apply="all",
                          pod_deeplab_mask=False, pod_deeplab_mask_factor=None,
                          interpolate_last=False, pod_factor=1., prepro="pow",
                          deeplabmask_upscale=True, spp_scales=(1, 2, 4), pod_options=None,
                          outputs_old=None, use_pod_schedule=True, nb_current_classes=-1,
                          nb_new_classes=-1, *, per_axis_tiles=False, logits_logsumexp=False,
                          per_map_options=False, accumulate_dtype=torch.float32):
    """PLOP's POD loss between the old maps (``list_attentions_a``) and the new ones
    (``list_attentions_b``), a 0-dim ``accumulate_dtype`` tensor (float32 in PLOP).

    Per map, in PLOP's order: settings from ``pod_options`` (below); if the channel counts
    differ (last map only) the new map is collapsed onto the ``index_new_class`` old channels
    ("sum" or "trim", P11); ``use_adaptative_factor`` (unmasked): alpha = mean of [labels = 0];
    prepro ("pow", "none", "relu") on both maps; the embedding of ``type`` ("spatial",
    "global", "local"; masked local POD when ``pod_deeplab_mask`` applies to this map); one L2
    normalisation per image embedding if ``norm`` (P12); distance per image ("frobenius",
    "l1", "frobenius_mix"); a non-finite or negative term raises PODError; the term is skipped
    if its factor is <= 0, else multiplied by the factor and sqrt(nb_current_classes /
    nb_new_classes) if the schedule is on; the sum is divided by the number of maps (P12).

    ``pod_options``: ``{"switch": {"before": {...}, "after": {...}, "mask_position": "last" |
    "all", "normalize_per_scale": false | true | "spm"}, "difference_function": ...,
    "difference_function_all": ..., "pool": ...}``; "before" sets every map but the last,
    "after" the last one whatever it is (P16). P13: type, factor, norm, prepro, the scales,
    the schedule and the mask settings carry over to the next maps (a "before" alone also
    sets the last map); alpha, the difference, use_adaptative_factor, extra_channels and
    normalize_per_scale restart from their defaults at every map; ``norm`` starts False
    whatever ``normalize`` says. ``pod_apply``, ``interpolate_last`` and "pool" have no effect.

    Masked POD (``pod_deeplab_mask``, last map or all with mask_position "all"): factor :=
    ``pod_deeplab_mask_factor`` (default ``pod_factor``; it carries over, P13), skipped if 0;
    mask from ``labels`` ("apply_mask" "background" or "old", the latter with
    ``outputs_old``); with ``deeplabmask_upscale`` both maps are reduced to their top-k
    channel values (k = "upscale_mask_topk") and resized bilinearly to the label size, else
    the mask is nearest-resized to the maps; the masked pixels are zeroed before the local
    POD; ``use_adaptative_factor``: alpha(b) = mean of the mask over image b.

    Fixes (keyword-only, default off = PLOP): ``per_axis_tiles`` (P10) tiles of H // s by
    W // s; ``logits_logsumexp`` (P11) collapses with log-sum-exp; ``per_map_options`` (P13)
    every map starts from the arguments (``norm`` defaults to ``normalize``) and the mask
    factor applies to masked maps only. ``accumulate_dtype`` sets the accumulator (float64
    for finite-difference checks).
    """
    del pod_apply, interpolate_last  # no effect, as in PLOP
    if len(list_attentions_a) != len(list_attentions_b):
        raise PODError(f"{len(list_attentions_a)} old maps but {len(list_attentions_b)} new ones")
    n_maps = len(list_attentions_a)
    if n_maps == 0:
        raise PODError("no maps to distil")
    if pod_options is not None and not isinstance(pod_options, dict):
        raise PODError(f"pod_options must be a dict or None, got {type(pod_options).__name__}")
    options = dict(pod_options or {})
    switch = _check_options(options)
    mask_factor = pod_factor if pod_deeplab_mask_factor is None else pod_deeplab_mask_factor
    defaults = {"type": collapse_channels, "factor": pod_factor,
                "norm": bool(normalize) if per_map_options else False, "prepro": prepro,
                "scales": _check_scales(spp_scales), "schedule": use_pod_schedule,
                "apply_mask": "background", "topk": 1, "mix_new_old": None,
                "mask_position": "last"}
    state = dict(defaults)

    device = list_attentions_a[0].device
    total = torch.zeros((), dtype=accumulate_dtype, device=device)
    with _no_autocast(device):
        for i, (a, b) in enumerate(zip(list_attentions_a, list_attentions_b)):
            last = i == n_maps - 1
            if per_map_options:
                state = dict(defaults)
            # settings that restart at every map
            use_adaptive = False
            extra_channels = "sum"
            normalize_per_scale = False
            if switch:
                part = switch.get("after" if last else "before")
                if part is not None:
                    state["type"] = part.get("type", state["type"])
                    state["factor"] = part.get("factor", state["factor"])
                    state["norm"] = part.get("norm", defaults["norm"])
                    state["prepro"] = part.get("prepro", state["prepro"])
                    use_adaptive = part.get("use_adaptative_factor", False)
                    if last:
                        state["apply_mask"] = part.get("apply_mask", state["apply_mask"])
                        state["topk"] = part.get("upscale_mask_topk", state["topk"])
                        state["mix_new_old"] = part.get("mix_new_old", state["mix_new_old"])
                        extra_channels = part.get("extra_channels", "sum")
                        if "spp_scales" in part:
                            state["scales"] = _check_scales(part["spp_scales"])
                        state["schedule"] = part.get("use_pod_schedule", state["schedule"])
                state["mask_position"] = switch.get("mask_position", state["mask_position"])
                normalize_per_scale = switch.get("normalize_per_scale", False)
            if state["mask_position"] not in ("last", "all"):
                raise PODError(f"mask_position must be 'last' or 'all', got "
                               f"{state['mask_position']!r}")

            _check_map(a, f"old map {i}")
            _check_map(b, f"new map {i}")
            a, b = _upcast(a), _upcast(b)
            if a.shape[1] != b.shape[1]:
                if not last:
                    raise PODError(f"map {i} of {n_maps}: only the last map may have more new "
                                   f"channels ({a.shape[1]} old, {b.shape[1]} new)")
                if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
                    raise PODError(f"last map: old {tuple(a.shape)} and new {tuple(b.shape)} "
                                   "differ beyond the channels")
                if index_new_class != a.shape[1]:
                    raise PODError(f"last map: index_new_class={index_new_class!r} must be the "
                                   f"old map's channel count {a.shape[1]}")
                b = _collapse_new_logits(b, index_new_class, extra_channels, logits_logsumexp)
            if a.shape != b.shape:
                raise PODError(f"map {i}: old {tuple(a.shape)} and new {tuple(b.shape)} differ")

            alpha = 1.0
            if not pod_deeplab_mask and use_adaptive:
                if labels is None:
                    raise PODError("use_adaptative_factor needs labels")
                alpha = (labels == 0).float().mean()

            a, b = _prepro(a, state["prepro"]), _prepro(b, state["prepro"])
            kind = state["type"]
            factor = state["factor"]
            if kind == "spatial":
                ea, eb = _spatial_pod(a), _spatial_pod(b)
            elif kind == "global":
                ea = _global_pod(a, state["scales"], per_axis_tiles=per_axis_tiles)
                eb = _global_pod(b, state["scales"], per_axis_tiles=per_axis_tiles)
            elif kind == "local":
                masked = pod_deeplab_mask and (
                    (last and state["mask_position"] == "last") or state["mask_position"] == "all")
                if masked:
                    if mask_factor == 0:
                        continue
                    factor = mask_factor
                    if not per_map_options:
                        state["factor"] = mask_factor  # P13: carries over to the next maps
                    mask = _pod_mask(labels, index_new_class, state["apply_mask"], outputs_old)
                    if deeplabmask_upscale:
                        k = state["topk"]
                        if isinstance(k, bool) or not isinstance(k, int) \
                                or not 1 <= k <= a.shape[1]:
                            raise PODError(f"upscale_mask_topk={k!r} must be in 1..{a.shape[1]}")
                        size = labels.shape[-2:]
                        a = F.interpolate(torch.topk(a, k, dim=1).values, size=size,
                                          mode="bilinear", align_corners=False)
                        b = F.interpolate(torch.topk(b, k, dim=1).values, size=size,
                                          mode="bilinear", align_corners=False)
                    else:
                        mask = F.interpolate(mask[:, None].float(), size=a.shape[-2:],
                                             mode="nearest")[:, 0].bool()
                    if use_adaptive:
                        alpha = mask.float().mean(dim=(1, 2))
                    ea = _local_pod_masked(a, mask, state["scales"],
                                           normalize_per_scale=normalize_per_scale,
                                           per_axis_tiles=per_axis_tiles)
                    eb = _local_pod_masked(b, mask, state["scales"],
                                           normalize_per_scale=normalize_per_scale,
                                           per_axis_tiles=per_axis_tiles)
                else:
                    ea = _local_pod(a, state["scales"], normalize_per_scale=normalize_per_scale,
                                    per_axis_tiles=per_axis_tiles)
                    eb = _local_pod(b, state["scales"], normalize_per_scale=normalize_per_scale,
                                    per_axis_tiles=per_axis_tiles)
            else:
                raise PODError(f"POD type must be one of {_TYPES}, got {kind!r}")

            key = "difference_function" if last else "difference_function_all"
            difference = options.get(key, "frobenius")
            if state["norm"]:  # P12: one L2 norm per image embedding
                ea, eb = F.normalize(ea, p=2, dim=1), F.normalize(eb, p=2, dim=1)
            term = _distance(ea, eb, difference, state["mix_new_old"])
            if not bool(torch.isfinite(term).all()) or bool((term < 0).any()):
                raise PODError(f"POD term of map {i} is not finite: {term.detach().tolist()} "
                               f"(maps of size {tuple(a.shape[-2:])}; a tile can be empty when "
                               "H < W, P10)")
            term = torch.mean(alpha * term)
            if factor <= 0:
                continue
            term = factor * term
            if state["schedule"]:
                term = term * _schedule(nb_current_classes, nb_new_classes)
            total = (total + term).to(accumulate_dtype)  # P12: float32 accumulator
    return total / n_maps
