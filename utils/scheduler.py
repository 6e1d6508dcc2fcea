"""Learning-rate schedules, stepped once per iteration (after every optimiser step)."""
from torch.optim.lr_scheduler import LRScheduler, StepLR


class PolyLR(LRScheduler):
    """``lr_k = base_lr * (1 - k / max_iters) ** power``, k = scheduler steps done so far."""

    def __init__(self, optimizer, max_iters, power=0.9, last_epoch=-1):
        self.max_iters = max_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        # clamped at 0: past max_iters the original's formula turns complex
        factor = max(0.0, 1 - self.last_epoch / self.max_iters) ** self.power
        return [base_lr * factor for base_lr in self.base_lrs]


def make_scheduler(optimizer, policy, max_iters, power=0.9, decay_step=5000, decay_factor=0.1):
    """The schedule of ``--lr_policy``: ``poly`` or ``step`` (period in iterations)."""
    if policy == "poly":
        return PolyLR(optimizer, max_iters=max_iters, power=power)
    if policy == "step":
        return StepLR(optimizer, step_size=decay_step, gamma=decay_factor)
    raise ValueError(f"unknown lr policy '{policy}'; valid: poly, step")
