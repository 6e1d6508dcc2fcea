"""Learning-rate schedules, stepped once per iteration (after every optimiser step)."""
from torch.optim.lr_scheduler import LRScheduler, StepLR


class PolyLR(LRScheduler):
    """``lr_k = base_lr * (1 - k / max_iters) ** power``, k = scheduler steps done so far;
    with ``min_lr`` never below it (SSUL's poly)."""

    min_lr = None   # a class default, so a floorless schedule's state dict is as before

    def __init__(self, optimizer, max_iters, power=0.9, last_epoch=-1, min_lr=None):
        self.max_iters = max_iters
        self.power = power
        if min_lr is not None:
            self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        # clamped at 0: past max_iters the original's formula turns complex
        factor = max(0.0, 1 - self.last_epoch / self.max_iters) ** self.power
        if self.min_lr is None:
            return [base_lr * factor for base_lr in self.base_lrs]
        return [max(base_lr * factor, self.min_lr) for base_lr in self.base_lrs]


def make_scheduler(optimizer, policy, max_iters, power=0.9, decay_step=5000, decay_factor=0.1):
    """The schedule of ``--lr_policy``: ``poly`` or ``step`` (period in iterations)."""
    if policy == "poly":
        return PolyLR(optimizer, max_iters=max_iters, power=power)
    if policy == "step":
        return StepLR(optimizer, step_size=decay_step, gamma=decay_factor)
    raise ValueError(f"unknown lr policy '{policy}'; valid: poly, step")


class WarmupPolyLR(LRScheduler):
    """``lr_k = base_lr * w_k * (1 - k / max_iters) ** power`` with a linear warm-up
    ``w_k = warmup_factor * (1 - k / K) + k / K`` for k < K = ``warmup_iters`` (in iterations,
    may be fractional), 1 afterwards; no floor. DKD's ``WarmupPolyLR`` and SSUL's
    ``warm_poly`` (they differ only in K: a fraction of the iterations, or ``int(0.1 I)``)."""

    def __init__(self, optimizer, max_iters, warmup_iters, warmup_factor=0.001, power=0.9,
                 last_epoch=-1):
        self.max_iters = max_iters
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        k = self.last_epoch
        warmup = 1.0
        if k < self.warmup_iters:
            alpha = k / self.warmup_iters
            warmup = self.warmup_factor * (1 - alpha) + alpha
        factor = warmup * max(0.0, 1 - k / self.max_iters) ** self.power
        return [base_lr * factor for base_lr in self.base_lrs]
