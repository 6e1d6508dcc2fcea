"""PLOP's pseudo-labelling of the background (docs/behaviour.md §15.5).

Once per step (before the first epoch, step > 0) ``find_median`` runs the old model over the
training loader and derives one entropy threshold per class from a histogram; every iteration
``pseudo_label_targets`` rewrites the background targets with the old model's confident
predictions and ``classif_adaptive_factor`` gives the per-image weight of the classification
loss. The quirks P1-P4, P6, P7 (no ``sync``) and P9 are reproduced by default; keyword-only
switches fix them.

Thresholds, the maximum entropy and the classification factor are float32, as in PLOP.
Logits that arrive in float16/bfloat16 (autocast) are upcast to float32.
"""
import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch

from dataset.loader import images_and_labels
from utils.errors import UserError

__all__ = ["PseudoLabelError", "PseudoLabels", "entropy", "accumulate_histogram",
           "thresholds_from_histogram", "find_median", "pseudo_label_targets",
           "classif_adaptive_factor", "DEFAULT_NB_BINS", "PSEUDO_MODES"]

DEFAULT_NB_BINS = {"entropy": 100, "probability": 20}
# --pseudo values whose target rewriting is implemented
PSEUDO_MODES = ("entropy", "naive")
_EPS = 1e-8          # entropy: inside the log and the normalising log
_FACTOR_EPS = 1e-6   # classification factor denominator


class PseudoLabelError(UserError, ValueError):
    """Pseudo-labelling was given inputs or a mode it is not defined for."""


class PseudoLabels(NamedTuple):
    """What pseudo_label_targets returns."""

    targets: torch.Tensor          # y': rewritten targets, B x H x W
    pseudo_labels: torch.Tensor    # old argmax, B x H x W
    mask_background: torch.Tensor  # [y < C_old]
    mask_valid: torch.Tensor       # [normalised entropy < threshold of the old argmax], all pixels


def _upcast(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_mode(mode):
    if mode not in DEFAULT_NB_BINS:
        raise PseudoLabelError(f"histogram mode must be 'entropy' or 'probability', got {mode!r}")


# ---------------------------------------------------------------------------- entropy
def entropy(probabilities, *, normalized=False):
    """Per-pixel entropy of B x C x H x W probabilities, B x H x W.

    P1 (default): -(1/ln(C + 1e-8)) * mean over the C channels of p ln(p + 1e-8), a channel
    *mean* (so at most 1/C); a one-hot p gives -1e-8/(C ln C) in float64, 0 in float32.
    ``normalized=True``: -sum p ln p / ln C (0 ln 0 = 0), in [0, 1].
    """
    p = _upcast(probabilities)
    if p.dim() < 2:
        raise PseudoLabelError(f"probabilities must have a channel dimension, got {tuple(p.shape)}")
    c = p.shape[1]
    if normalized:
        if c < 2:
            raise PseudoLabelError("the normalised entropy needs at least 2 channels")
        return -torch.xlogy(p, p).sum(dim=1) / math.log(c)
    return (-1.0 / math.log(c + _EPS)) * torch.mean(p * torch.log(p + _EPS), dim=1)


# -------------------------------------------------------------------------- thresholds
def accumulate_histogram(hist, labels, logits_old, max_value, mode, nb_bins, *, same_mask=False,
                         n_old=None, normalized_entropy=False):
    """Add one batch to ``hist`` (C_cur x nb_bins, int64, in place) and return it.

    P6: only pixels with y = 0 count (``same_mask``: y < ``n_old``, the rewriting mask). Each
    adds 1 at [old argmax, min(trunc(v * nb_bins), nb_bins - 1)] with v = entropy / max_value
    ("entropy") or the max probability ("probability").
    """
    _check_mode(mode)
    logits_old = _upcast(logits_old)
    if logits_old.dim() != 4 or labels.shape != logits_old.shape[:1] + logits_old.shape[2:]:
        raise PseudoLabelError(f"labels {tuple(labels.shape)} do not match old logits "
                               f"{tuple(logits_old.shape)}")
    if hist.shape != (hist.shape[0], nb_bins) or logits_old.shape[1] > hist.shape[0]:
        raise PseudoLabelError(f"histogram of shape {tuple(hist.shape)} cannot hold "
                               f"{logits_old.shape[1]} classes x {nb_bins} bins")
    if same_mask:
        if n_old is None:
            raise PseudoLabelError("same_mask needs n_old")
        mask = labels < n_old
    else:
        mask = labels == 0
    probabilities = torch.softmax(logits_old, dim=1)
    max_probability, pseudo_labels = probabilities.max(dim=1)
    if mode == "entropy":
        values = entropy(probabilities, normalized=normalized_entropy)[mask] / max_value
    else:
        values = max_probability[mask]
    if not bool(torch.isfinite(values).all()):
        raise PseudoLabelError("non-finite old-model values in the threshold histogram")
    rows = pseudo_labels[mask]
    columns = (values * nb_bins).long().clamp(0, nb_bins - 1)
    hist.index_put_((rows.to(hist.device), columns.to(hist.device)),
                    torch.ones((), dtype=hist.dtype, device=hist.device).expand(rows.shape[0]),
                    accumulate=True)
    return hist


def _plop_median(counts, nb_bins):
    """PLOP's histogram median of one class, in float32 (counts: int64 array, total > 0).

    P2: the running sum adds bin *indices* (k/nb * nb), not counts. P3: the bin read at step k
    is int((k/nb) * nb), one below k for some k (29, 57, 58 with 100 bins). P4: if no step
    stops, k = nb - 1 with the full running sum, and an empty bin gives +inf, -inf or NaN.
    """
    f32 = np.float32
    half = f32(counts.sum()) / f32(2)
    running = 0.0
    for k in range(nb_bins):
        lower = k / nb_bins
        index = int(lower * nb_bins)
        if half >= f32(running) and half <= f32(running) + f32(counts[index]):
            break
        running += lower * nb_bins
    with np.errstate(divide="ignore", invalid="ignore"):
        return f32(lower) + (half - f32(running)) / f32(counts[index]) * f32(1 / nb_bins)


def _true_median(counts, nb_bins):
    """The histogram's median by cumulative counts, linear inside the bin (total > 0)."""
    half = counts.sum() / 2.0
    cumulative = 0
    for k in range(nb_bins):
        if cumulative + counts[k] >= half:
            return np.float32((k + (half - cumulative) / counts[k]) / nb_bins)
        cumulative += counts[k]
    return np.float32(1.0)  # not reached for total > 0


def thresholds_from_histogram(hist, nb_bins, threshold, mode, *, true_median=False):
    """Per-class thresholds (float32, on ``hist``'s device) from a C x nb_bins histogram.

    A class with an empty row gets median 0; otherwise PLOP's median (P2-P4) or, with
    ``true_median``, the real one. Then tau = max(median, threshold) ("entropy", a floor) or
    min(median, threshold) ("probability", a cap) with Python's max/min on float32 values:
    a NaN median stays NaN.
    """
    _check_mode(mode)
    counts = hist.detach().cpu().numpy().astype(np.int64)
    if counts.ndim != 2 or counts.shape[1] != nb_bins:
        raise PseudoLabelError(f"histogram of shape {counts.shape} is not C x {nb_bins}")
    bound = np.float32(threshold)
    out = np.zeros(counts.shape[0], dtype=np.float32)
    for c, row in enumerate(counts):
        median = np.float32(0.0)
        if row.sum() > 0:
            median = _true_median(row, nb_bins) if true_median else _plop_median(row, nb_bins)
        if mode == "entropy":
            out[c] = bound if median < bound else median   # max(median, threshold)
        else:
            out[c] = bound if median > bound else median   # min(median, threshold)
    return torch.from_numpy(out).to(hist.device)


def _autocast_context(autocast, device):
    if autocast is None:
        return contextlib.nullcontext()
    if isinstance(autocast, torch.dtype):
        return torch.autocast(device_type=device.type, dtype=autocast)
    return autocast()


def find_median(model_old, loader, device, nb_current_classes, mode="probability", threshold=0.9,
                nb_bins=None, *, logger=None, autocast=None, same_mask=False, n_old=None,
                true_median=False, normalized_entropy=False, sync=None, return_histogram=False):
    """Class thresholds from one pass of the old model over ``loader`` ((images, labels)
    batches): returns (thresholds, max_value), both float32 tensors on ``device``, and the
    histogram too with ``return_histogram``.

    The old model runs in eval mode without gradients (its mode is restored afterwards);
    ``model_old(images)`` may return the logits or a tuple starting with them; images are cast
    to float32 as the trainer does. ``autocast``: None, a dtype, or a callable returning a
    context manager. ``mode`` "entropy": 100 bins, max_value = ln(nb_current_classes)
    (``normalized_entropy``: the normalised entropy and max_value 1); "probability"
    (``--pseudo median``): 20 bins, max_value 1. ``nb_bins`` overrides the bin count.
    ``sync(hist)``, if given, reduces the int64 histogram in place across processes before
    the medians (P7 fix; PLOP keeps one histogram per process). ``same_mask`` (P6 fix, with
    ``n_old``) and ``true_median`` (P2-P4 fix): see accumulate_histogram and
    thresholds_from_histogram.
    """
    _check_mode(mode)
    device = torch.device(device)
    nb = DEFAULT_NB_BINS[mode] if nb_bins is None else int(nb_bins)
    if nb < 1:
        raise PseudoLabelError(f"nb_bins must be >= 1, got {nb_bins!r}")
    if mode == "entropy" and not normalized_entropy:
        max_value = torch.log(torch.tensor(float(nb_current_classes), dtype=torch.float32,
                                           device=device))
    else:
        max_value = torch.ones((), dtype=torch.float32, device=device)
    hist = torch.zeros(nb_current_classes, nb, dtype=torch.long, device=device)
    try:
        n_batches = len(loader)
    except TypeError:
        n_batches = "?"
    was_training = model_old.training
    model_old.eval()
    try:
        with torch.no_grad():
            for step, item in enumerate(loader):
                images, labels = images_and_labels(item)
                images = images.to(device, dtype=torch.float32)
                labels = labels.to(device, dtype=torch.long)
                with _autocast_context(autocast, device):
                    outputs = model_old(images)
                logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
                accumulate_histogram(hist, labels, logits, max_value, mode, nb,
                                     same_mask=same_mask, n_old=n_old,
                                     normalized_entropy=normalized_entropy)
                if logger is not None and step % 10 == 0:
                    logger.info(f"Median computing {step}/{n_batches}.")
    finally:
        model_old.train(was_training)
    if sync is not None:
        sync(hist)
    thresholds = thresholds_from_histogram(hist, nb, threshold, mode, true_median=true_median)
    if logger is not None:
        logger.info(f"Finished computing median {thresholds.tolist()}")
    if return_histogram:
        return thresholds, max_value, hist
    return thresholds, max_value


# ------------------------------------------------------------------- target rewriting
def pseudo_label_targets(labels, logits_old, thresholds, max_entropy, n_old, *, mode="entropy",
                         normalized_entropy=False, ignore_index=255):
    """Rewrite the targets with the old model's predictions (every iteration, step > 0).

    p = softmax(old logits), y^ = argmax p (first max), bg = [y < n_old] (old-class pixels
    included, P17). "entropy": valid = [entropy(p) / max_entropy < thresholds[y^]]; y' = y^ on
    bg and valid, ``ignore_index`` on bg and not valid, y elsewhere. "naive": every bg pixel
    takes y^ (valid everywhere; thresholds and max_entropy unused). ``normalized_entropy``
    must match the one given to find_median.
    """
    if mode not in PSEUDO_MODES:
        detail = (" (its thresholds are computed by find_median(mode='probability'), but its "
                  "acceptance rule is not specified)" if mode == "median" else "")
        raise PseudoLabelError(f"pseudo-labelling mode {mode!r} is not supported{detail}; "
                               f"supported: {', '.join(PSEUDO_MODES)}")
    logits_old = _upcast(logits_old)
    if logits_old.dim() != 4 or labels.shape != logits_old.shape[:1] + logits_old.shape[2:]:
        raise PseudoLabelError(f"labels {tuple(labels.shape)} do not match old logits "
                               f"{tuple(logits_old.shape)}")
    probabilities = torch.softmax(logits_old, dim=1)
    pseudo_labels = probabilities.argmax(dim=1)
    background = labels < n_old
    if mode == "entropy":
        if thresholds.dim() != 1 or thresholds.shape[0] < logits_old.shape[1]:
            raise PseudoLabelError(f"{tuple(thresholds.shape)} thresholds for "
                                   f"{logits_old.shape[1]} old classes")
        value = entropy(probabilities, normalized=normalized_entropy) / max_entropy
        valid = value < thresholds.to(value.device)[pseudo_labels]
    else:
        valid = torch.ones_like(background)
    targets = torch.where(background & valid, pseudo_labels,
                          torch.where(background, torch.full_like(labels, ignore_index), labels))
    return PseudoLabels(targets, pseudo_labels, background, valid)


def classif_adaptive_factor(mask_background, mask_valid, *, min_factor=0.0, bg_only=False):
    """Weight of the classification loss: phi_b = #(bg and valid in image b) / (#(bg in b) +
    1e-6), float32, shape B; with a non-zero ``min_factor`` clamped from below.

    P9 (default): phi_b scales every pixel of image b, and an image without background gets
    0. ``bg_only``: a B x H x W weight map, phi_b on the background pixels and 1 elsewhere
    (an image without background keeps its whole loss).
    """
    if mask_background.shape != mask_valid.shape or mask_background.dim() != 3:
        raise PseudoLabelError(f"masks of shapes {tuple(mask_background.shape)} and "
                               f"{tuple(mask_valid.shape)}: expected two B x H x W masks")
    background = mask_background.bool()
    accepted = (background & mask_valid.bool()).float().sum(dim=(1, 2))
    count = background.float().sum(dim=(1, 2))
    factor = accepted / (count + _FACTOR_EPS)
    if min_factor:
        factor = factor.clamp(min=min_factor)
    if not bg_only:
        return factor
    return torch.where(background, factor[:, None, None], torch.ones_like(factor)[:, None, None])
