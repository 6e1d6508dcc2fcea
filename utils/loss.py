"""Loss terms of the incremental methods (FT, LwF, LwF-MC, ILT, MiB).

Class names and constructor keywords are those of the original MiB code, so code written
against it keeps working. Conventions shared by every term here:

* ``inputs`` are the new model's logits, B x C x H x W, old channels first;
* ``reduction='none'`` gives the per-pixel B x H x W map (0 on ignored pixels) and
  ``'sum'`` its sum. ``'mean'`` is each original class's own mean: over the pixels that are
  not ignored for ``UnbiasedCrossEntropy`` and ``BCEWithLogitsLossWithIgnoreIndex`` (NaN when
  every pixel is ignored, as the original), over all pixels for the others. The trainer takes
  ``'none'`` and averages over **all** B*H*W pixels, ignored ones included, as the original
  trainer does (docs/behaviour.md, the losses section);
* logits that arrive in float16/bfloat16 (autocast) are upcast, so every loss is computed in
  float32 (float64 inputs stay float64, for exact comparisons);
* no one-hot targets are materialised: the per-pixel terms are written with logsumexp,
  softplus and a gather.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

__all__ = [
    "LossError", "PixelCrossEntropy", "UnbiasedCrossEntropy", "KnowledgeDistillationLoss",
    "UnbiasedKnowledgeDistillationLoss", "BCEWithLogitsLossWithIgnoreIndex", "IcarlLoss",
    "IcarlDistillationLoss", "EncoderDistillationLoss",
]

_REDUCTIONS = ("mean", "sum", "none")


class LossError(UserError, ValueError):
    """A loss was given inputs it is not defined for."""


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise LossError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _upcast(x):
    # Half-precision logits from autocast: the losses are computed in float32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _mean_over_valid(loss, valid, reduction):
    """The original's 'mean' of a loss with ignored pixels: over the valid ones only."""
    if reduction == "mean":
        return loss.sum() / valid.sum()
    return _reduce(loss, reduction)


def _apply_mask(loss, mask):
    return loss if mask is None else loss * mask.to(loss.dtype)


def _sum_softplus(x):
    # sum over channels of BCE(x_c, 0) = softplus(x_c), in the exact form of
    # binary_cross_entropy_with_logits; the zero target is a broadcast view, not a tensor.
    zero = x.new_zeros(()).expand_as(x)
    return F.binary_cross_entropy_with_logits(x, zero, reduction="none").sum(dim=1)


def _gather_channel(x, index):
    """x[b, index[b, h, w], h, w] for a B x C x H x W map."""
    return x.gather(1, index.unsqueeze(1)).squeeze(1)


class PixelCrossEntropy(nn.Module):
    """Cross-entropy with ignore index, reduced as the original trainer does: per pixel
    (``nn.CrossEntropyLoss(reduction='none')``) then the mean over all pixels, ignored ones
    included. ``reduction='none'`` returns the per-pixel map."""

    def __init__(self, ignore_index=255, reduction="mean"):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = _check_reduction(reduction)

    def forward(self, inputs, targets):
        loss = F.cross_entropy(_upcast(inputs), targets, ignore_index=self.ignore_index,
                               reduction="none")
        return _reduce(loss, self.reduction)


class UnbiasedCrossEntropy(nn.Module):
    """MiB's unbiased cross-entropy. The background probability absorbs every old channel
    (``log p_bg = LSE(z_0..z_{old_cl-1}) - LSE(z)``) and every target below ``old_cl`` (old
    classes and background) counts as background. The caller's targets are not modified."""

    def __init__(self, old_cl=None, reduction="mean", ignore_index=255):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.ignore_index = ignore_index
        self.old_cl = old_cl

    def forward(self, inputs, targets):
        old_cl = self.old_cl
        n_cl = inputs.shape[1]
        if old_cl is None or not 1 <= old_cl <= n_cl:
            raise LossError(
                f"UnbiasedCrossEntropy needs old_cl = number of old channels (background "
                f"included) between 1 and the {n_cl} input channels, got {old_cl!r}; at step 0 "
                f"use the plain cross-entropy")
        x = _upcast(inputs)
        den = torch.logsumexp(x, dim=1)
        log_bkg = torch.logsumexp(x[:, :old_cl], dim=1)
        is_bkg = targets < old_cl                 # old classes and background -> background
        labels = torch.where(is_bkg, torch.zeros_like(targets), targets)   # a copy
        valid = labels != self.ignore_index
        index = torch.where(valid, labels, torch.zeros_like(labels))
        numerator = torch.where(is_bkg, log_bkg, _gather_channel(x, index))
        loss = torch.where(valid, den - numerator, torch.zeros_like(den))
        # the original is an NLL with ignore_index: its 'mean' skips the ignored pixels
        return _mean_over_valid(loss, valid, self.reduction)


class KnowledgeDistillationLoss(nn.Module):
    """Plain KD of LwF/ILT. ``targets`` are the old model's logits (C_old channels). The
    student is renormalised over its first C_old channels, ``alpha`` multiplies the teacher
    logits only, and the per-pixel term is a mean over the C_old classes (not a sum).
    ``mask`` (B x H x W, optional) multiplies the per-pixel loss."""

    def __init__(self, reduction="mean", alpha=1.):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.alpha = alpha

    def forward(self, inputs, targets, mask=None):
        n_old = targets.shape[1]
        if n_old > inputs.shape[1]:
            raise LossError(f"the old model has {n_old} channels but the new one only "
                            f"{inputs.shape[1]}")
        log_p = torch.log_softmax(_upcast(inputs).narrow(1, 0, n_old), dim=1)
        q = torch.softmax(_upcast(targets) * self.alpha, dim=1)
        loss = -(log_p * q).mean(dim=1)
        return _reduce(_apply_mask(loss, mask), self.reduction)


class UnbiasedKnowledgeDistillationLoss(nn.Module):
    """MiB's unbiased KD. The student's full softmax is used; its background probability
    absorbs the background and all new channels (``LSE(z_0, z_{C_old}..z_{C-1}) - LSE(z)``).
    Teacher probabilities ``softmax(alpha * targets)``; per-pixel mean over the C_old old
    classes; ``mask`` multiplies the per-pixel loss. Needs at least one new channel."""

    def __init__(self, reduction="mean", alpha=1.):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.alpha = alpha

    def forward(self, inputs, targets, mask=None):
        n_old, n_cl = targets.shape[1], inputs.shape[1]
        if n_cl <= n_old:
            raise LossError(
                f"unbiased KD is undefined for a step that adds no class (new model "
                f"{n_cl} channels, old model {n_old}); check the task split or use plain KD")
        x = _upcast(inputs)
        den = torch.logsumexp(x, dim=1)
        # background + new channels, without building an index_select copy
        log_bkg = torch.logaddexp(x[:, 0], torch.logsumexp(x[:, n_old:], dim=1)) - den
        q = torch.softmax(_upcast(targets) * self.alpha, dim=1)
        old_part = (q[:, 1:] * (x[:, 1:n_old] - den.unsqueeze(1))).sum(dim=1)
        loss = -(q[:, 0] * log_bkg + old_part) / n_old
        return _reduce(_apply_mask(loss, mask), self.reduction)


class BCEWithLogitsLossWithIgnoreIndex(nn.Module):
    """Per pixel: sum over all C channels of BCE-with-logits against the one-hot of the
    target, times that one-hot row's sum (so 0 for ignored pixels); ``'mean'`` and ``'sum'``
    are taken over the pixels that are not ignored."""

    def __init__(self, reduction="mean", ignore_index=255):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.ignore_index = ignore_index

    def forward(self, inputs, targets):
        x = _upcast(inputs)
        valid = targets != self.ignore_index
        index = torch.where(valid, targets, torch.zeros_like(targets))
        # BCE(x, 1) = BCE(x, 0) - x: the one-hot channel only subtracts its logit
        loss = _sum_softplus(x) - _gather_channel(x, index)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        # the original's 'mean'/'sum' drop pixels whose one-hot row is all zero (ignored)
        return _mean_over_valid(loss, valid, self.reduction)


class IcarlLoss(nn.Module):
    """The disjoint iCaRL loss, which replaces the main loss at step > 0 when it is chosen.

    ``output_old`` are the old model's **probabilities** ``sigmoid(z_old)`` (C_old channels;
    the original trainer passes them already through the sigmoid). Targets: one-hot of the
    labels (zero for ignored pixels), with channels ``0..C_old-1`` overwritten by
    ``output_old`` (``bkg=True``: channels ``1..C_old-1`` only; channel 0 keeps the label).
    Per pixel: sum of BCE over all channels. Ignored pixels are **not** excluded (they keep
    the soft old targets), as in the original."""

    def __init__(self, reduction="mean", ignore_index=255, bkg=False):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.ignore_index = ignore_index
        self.bkg = bkg

    def forward(self, inputs, targets, output_old):
        x = _upcast(inputs)
        n_old = output_old.shape[1]
        if n_old > x.shape[1]:
            raise LossError(f"the old model has {n_old} channels but the new one only "
                            f"{x.shape[1]}")
        first = 1 if self.bkg else 0
        soft = _upcast(output_old)[:, first:]
        loss = _sum_softplus(x) - (x[:, first:n_old] * soft).sum(dim=1)
        # the label's own channel, unless it was overwritten by a soft target
        keeps_label = (targets != self.ignore_index) & ((targets < first) | (targets >= n_old))
        index = torch.where(keeps_label, targets, torch.zeros_like(targets))
        label_logit = _gather_channel(x, index)
        loss = loss - torch.where(keeps_label, label_logit, torch.zeros_like(label_logit))
        return _reduce(loss, self.reduction)


class IcarlDistillationLoss(nn.Module):
    """The combined iCaRL distillation term of LwF-MC (added to the main loss at step > 0):
    ``importance * C_old * mean BCE(z_c, sigmoid(z_old_c))`` over all pixels and old
    channels, i.e. ``importance`` times the per-pixel sum over old channels, averaged over
    all pixels (no ignore mask). ``outputs_old`` are the old model's **logits**."""

    def __init__(self, importance=1.0):
        super().__init__()
        self.importance = importance

    def forward(self, inputs, outputs_old):
        n_old = outputs_old.shape[1]
        bce = F.binary_cross_entropy_with_logits(
            _upcast(inputs).narrow(1, 0, n_old), torch.sigmoid(_upcast(outputs_old)),
            reduction="mean")
        return self.importance * n_old * bce


class EncoderDistillationLoss(nn.Module):
    """ILT's encoder distillation: mean squared error over all elements of the body features
    (``nn.MSELoss()``); the term's weight is applied by the caller."""

    def forward(self, features, features_old):
        return F.mse_loss(_upcast(features), _upcast(features_old))
