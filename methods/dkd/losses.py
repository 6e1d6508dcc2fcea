"""DKD's loss terms (docs/behaviour.md §19.4), each a per-pixel map of binary cross-entropies
with soft targets, reduced per channel by the mean over its pixels and then summed over the
channels (D10).

    l(x, y; p) = -[p y log s(x) + (1 - y) log(1 - s(x))],   s = sigmoid

* ``wbce_map``: the new classes (L_mbce); channel j is positive where the label equals
  ``n_old_classes + j`` (DKD's ``n_old_classes`` = old classes + 1), negative everywhere else,
  labels 0 and 255 included (D8); the target is built in float32 (D9).
* ``kd_map``: the old classes' logits against sigmoid of the old model's (L_kd; also L_pos on
  P and L_neg on N).
* ``ac_map``: the auxiliary channel against 0, i.e. softplus (L_ac).
"""
import torch
import torch.nn.functional as F

__all__ = ["wbce_map", "kd_map", "ac_map", "per_channel_mean", "channel_sum"]


def _check_4d(x, what):
    if x.dim() != 4:
        raise ValueError(f"{what} must be B x C x H x W, got shape {tuple(x.shape)}")


def wbce_map(logit, label, n_old_classes, pos_weight=1.0, ignore_index=None,
             target_dtype=torch.float32):
    """L_mbce's map over the new-class logits ``logit`` (B x n_new x H x W): BCE of channel j
    against ``label == n_old_classes + j`` with positive weight ``pos_weight``.

    DKD ignores nothing (D8: 255 is a negative of every channel); ``ignore_index`` (the fix)
    zeroes that label's pixels. DKD builds the target in float32 (D9), which rounds the map
    (and its gradient) to float32 even for float64 logits; ``target_dtype=None`` (the fix)
    keeps the logits' dtype."""
    _check_4d(logit, "the new-class logits")
    if label.shape != (logit.shape[0],) + tuple(logit.shape[2:]):
        raise ValueError(f"labels {tuple(label.shape)} do not match the logits "
                         f"{tuple(logit.shape)} (B x H x W expected)")
    channels = torch.arange(logit.shape[1], device=label.device) + n_old_classes
    target = label.long()[:, None] == channels[None, :, None, None]
    target = target.to(logit.dtype if target_dtype is None else target_dtype)
    weight = torch.full((logit.shape[1], 1, 1), float(pos_weight), dtype=logit.dtype,
                        device=logit.device)
    loss = F.binary_cross_entropy_with_logits(logit, target, pos_weight=weight, reduction="none")
    if ignore_index is not None:
        loss = loss * (label != ignore_index)[:, None].to(loss.dtype)
    return loss


def kd_map(logit, logit_old):
    """BCE of ``logit`` against the probabilities sigmoid(``logit_old``) (same shape); the
    targets are taken in ``logit_old``'s dtype (under autocast: fp16 logits, D24)."""
    _check_4d(logit, "the logits")
    if logit.shape != logit_old.shape:
        raise ValueError(f"logits {tuple(logit.shape)} and old logits "
                         f"{tuple(logit_old.shape)} differ in shape")
    return F.binary_cross_entropy_with_logits(logit, torch.sigmoid(logit_old), reduction="none")


def ac_map(logit_aux):
    """BCE of the auxiliary channel (B x 1 x H x W) against 0: softplus(x)."""
    _check_4d(logit_aux, "the auxiliary logits")
    return F.binary_cross_entropy_with_logits(logit_aux, torch.zeros_like(logit_aux),
                                              reduction="none")


def per_channel_mean(loss_map):
    """The mean over the batch and the pixels, one value per channel (what DKD logs, averaged
    over the channels)."""
    return loss_map.mean(dim=(0, 2, 3))


def channel_sum(loss_map):
    """What DKD optimises: the per-channel means summed over the channels."""
    return per_channel_mean(loss_map).sum()
