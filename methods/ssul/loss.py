"""SSUL's losses (docs/behaviour.md, SSUL: loss).

``bce_loss`` (published): sigmoid BCE on every channel against the one-hot target, summed over
channels, averaged over the valid pixels ``0 <= y < C`` (255 and a label equal to C are left
out; a label above C is an error). All pixels ignored gives NaN, as SSUL (S23).
``ce_loss``: cross-entropy, mean over non-ignored pixels. ``focal_loss``: alpha (1 - p_t)^gamma
CE, 0 on ignored pixels, averaged over **all** pixels (S23).
Half-precision logits are computed in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.loss import LossError

__all__ = ["SSULBCELoss", "SSULFocalLoss", "make_ssul_criterion", "LOSS_TYPES"]

LOSS_TYPES = ("bce_loss", "ce_loss", "focal_loss")
_REDUCTIONS = ("mean", "sum", "none")


def _upcast(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class SSULBCELoss(nn.Module):
    """Per pixel sum over channels of BCE(z_c, [c = y]); reduction over the valid pixels;
    an optional per-pixel ``weight`` (B x H x W) multiplies the per-pixel loss first."""

    def __init__(self, reduction="mean", ignore_index=255):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise LossError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs, targets, weight=None):
        z = _upcast(inputs)
        n_channels = z.shape[1]
        targets = targets.long()
        over = (targets > n_channels) & (targets != self.ignore_index)
        if bool(over.any()):
            raise LossError(f"labels up to {int(targets[over].max())} for {n_channels} "
                            f"channels: the labels do not fit the network's outputs")
        valid = (targets >= 0) & (targets < n_channels)
        index = torch.where(valid, targets, torch.zeros_like(targets))
        onehot = F.one_hot(index, n_channels).permute(0, 3, 1, 2).to(z.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(z, onehot, reduction="none").sum(dim=1)
        if weight is not None:
            per_pixel = per_pixel * weight
        per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
        if self.reduction == "none":
            return per_pixel
        if self.reduction == "sum":
            return per_pixel.sum()
        return per_pixel.sum() / valid.sum()


class SSULFocalLoss(nn.Module):
    """alpha (1 - exp(-CE))^gamma CE per pixel (0 where ignored); mean over all pixels."""

    def __init__(self, alpha=1.0, gamma=0.0, size_average=True, ignore_index=255):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma
        self.size_average, self.ignore_index = size_average, ignore_index

    def forward(self, inputs, targets):
        ce = F.cross_entropy(_upcast(inputs), targets.long(), reduction="none",
                             ignore_index=self.ignore_index)
        loss = self.alpha * (1 - torch.exp(-ce)) ** self.gamma * ce
        return loss.mean() if self.size_average else loss.sum()


def make_ssul_criterion(loss_type):
    """The criterion of SSUL's ``--loss_type``."""
    if loss_type == "bce_loss":
        return SSULBCELoss(reduction="mean", ignore_index=255)
    if loss_type == "ce_loss":
        return nn.CrossEntropyLoss(ignore_index=255, reduction="mean")
    if loss_type == "focal_loss":
        return SSULFocalLoss(alpha=1, gamma=0, size_average=True, ignore_index=255)
    raise LossError(f"loss type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
