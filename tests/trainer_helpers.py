"""Shared by the test_trainer_* files (a helper module: no tests here, hence its name without
``test_``): a tiny stand-in for the segmentation network, options from the real command
line, a gradient-recording optimiser, and the loss
terms of docs/behaviour.md §8 written out directly from their formulas (independently of
utils.loss) to check what the Trainer composes."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import argparser

IGNORE = 255


class TinySegNet(nn.Module):
    """body -> per-step 1x1 classifiers, as IncrementalSegmentationModule is shaped:
    ``forward(x, ret_intermediate)`` -> (logits, {"body", "pre_logits"})."""

    def __init__(self, classes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.cls = nn.ModuleList(nn.Conv2d(6, c, 1) for c in classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, ret_intermediate=False):
        body = self.body(x)
        feat = torch.tanh(body)
        out = torch.cat([c(feat) for c in self.cls], dim=1)
        return out, {"body": body, "pre_logits": feat}


def options(*argv, amp="off"):
    """Options as run.py gets them (presets applied), with the runtime choices resolved."""
    return argparser.build_options(["--task", "15-5", "--no_progress", *argv], amp=amp)


def regularizer_of(trainer):
    """The EWC / PI / RW object of a trainer's weight-regulariser part."""
    [part] = trainer.method.penalties
    return part.regularizer


def batch(seed, n_classes, size=5, n=2):
    """Random images and labels over every class, with some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, n_classes, (n, size, size), generator=g)
    labels[torch.rand(n, size, size, generator=g) < 0.15] = IGNORE
    return images, labels


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it is asked to apply (and, given a list,
    notes its zero_grad and step calls there)."""

    def __init__(self, params, lr=0.0, events=None):
        super().__init__(params, lr=lr)
        self.seen = []
        self.events = events

    def zero_grad(self, set_to_none=True):
        if self.events is not None:
            self.events.append("zero_grad")
        return super().zero_grad(set_to_none)

    def step(self, closure=None):
        if self.events is not None:
            self.events.append("step")
        self.seen.append([None if p.grad is None else p.grad.detach().clone()
                          for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def grads_of(loss, params):
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


# --- the loss terms of §8, straight from the formulas -----------------------------------------

def ce(z, y):
    return F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none").mean()


def unbiased_ce(z, y, old_cl):
    den = torch.logsumexp(z, 1)
    log_p = z - den[:, None]
    log_bg = torch.logsumexp(z[:, :old_cl], 1) - den
    y2 = torch.where(y < old_cl, torch.zeros_like(y), y)
    valid = y2 != IGNORE
    picked = log_p.gather(1, torch.where(valid, y2, 0)[:, None])[:, 0]
    picked = torch.where(y2 == 0, log_bg, picked)
    return -(picked * valid).mean()


def one_hot(y, n):
    valid = y != IGNORE
    t = F.one_hot(torch.where(valid, y, 0), n).permute(0, 3, 1, 2).to(torch.float32)
    return t * valid[:, None]


def bce_ignore(z, y):
    valid = (y != IGNORE).to(z.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(z, one_hot(y, z.shape[1]),
                                                   reduction="none").sum(1)
    return (per_pixel * valid).mean()


def kd(z, zo, alpha=1.0):
    n_old = zo.shape[1]
    log_p = torch.log_softmax(z[:, :n_old], 1)
    q = torch.softmax(alpha * zo, 1)
    return -(q * log_p).mean(1).mean()


def unbiased_kd(z, zo, alpha=1.0):
    n_old = zo.shape[1]
    den = torch.logsumexp(z, 1)
    log_bg = torch.logsumexp(torch.cat([z[:, :1], z[:, n_old:]], 1), 1) - den
    q = torch.softmax(alpha * zo, 1)
    old = (q[:, 1:] * (z[:, 1:n_old] - den[:, None])).sum(1)
    return -((q[:, 0] * log_bg + old) / n_old).mean()


def icarl_combined(z, zo, importance):
    n_old = zo.shape[1]
    return importance * n_old * F.binary_cross_entropy_with_logits(
        z[:, :n_old], torch.sigmoid(zo), reduction="mean")


def icarl_disjoint(z, y, zo, bkg=False):
    n_old = zo.shape[1]
    t = one_hot(y, z.shape[1])
    first = 1 if bkg else 0
    t[:, first:n_old] = torch.sigmoid(zo)[:, first:]
    return F.binary_cross_entropy_with_logits(z, t, reduction="none").sum(1).mean()


def feature_mse(b, bo):
    return ((b - bo) ** 2).mean()


def min_max(x):
    return (x - x.min()) / (x.max() - x.min() + 1e-8)
