"""SSUL's parameter groups and learning-rate schedules (docs/behaviour.md, SSUL: optimiser).

Groups, in order:

* step 0, or ``freeze`` off: the body at 0.001 and the classifier (ASPP + every head) at 0.01,
  whatever ``lr`` is (S3; ``scale_by_lr`` gives ``0.1 lr`` and ``lr``);
* step > 0 with ``freeze``: the new head at ``lr``; with the unknown class also the unknown
  head at ``lr`` and the background head at ``lr * background_lr_factor`` (1e-4, S4).

Each group lists every parameter of its modules, BatchNorm ones too (those without gradient
are skipped by the optimiser). SGD: momentum 0.9, Nesterov, weight decay on every group.
"""
from torch.optim.lr_scheduler import StepLR

from utils.errors import OptionError
from utils.scheduler import PolyLR, WarmupPolyLR

__all__ = ["param_groups", "named_param_groups", "FlooredPolyLR", "WarmupPolyLR",
           "make_ssul_scheduler", "LR_POLICIES", "BODY_LR", "CLASSIFIER_LR",
           "BACKGROUND_LR_FACTOR", "POLY_MIN_LR"]

BODY_LR, CLASSIFIER_LR = 0.001, 0.01     # S3: fixed at step 0 / without freeze
BACKGROUND_LR_FACTOR = 1e-4              # S4
POLY_MIN_LR = 1e-6
LR_POLICIES = ("poly", "step", "warm_poly")


def named_param_groups(model, step, *, freeze, unknown, lr, scale_by_lr=False,
                       background_lr_factor=BACKGROUND_LR_FACTOR):
    """[(lr, [(name, parameter), ...]), ...] for a ``modules.tv_deeplab`` network."""
    def named(prefix, module):
        return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]

    if step == 0 or not freeze:
        body_lr, cls_lr = (0.1 * lr, lr) if scale_by_lr else (BODY_LR, CLASSIFIER_LR)
        return [(body_lr, named("backbone", model.backbone)),
                (cls_lr, named("classifier", model.classifier))]
    heads = model.classifier.head
    last = len(heads) - 1
    groups = [(lr, named(f"classifier.head.{last}", heads[last]))]
    if unknown:
        groups += [(lr, named("classifier.head.0", heads[0])),
                   (lr * background_lr_factor, named("classifier.head.1", heads[1]))]
    return groups


def param_groups(model, step, *, freeze, unknown, lr, weight_decay=1e-4, scale_by_lr=False,
                 background_lr_factor=BACKGROUND_LR_FACTOR):
    """The optimiser's groups (dicts for ``torch.optim.SGD``), see the module doc."""
    return [{"params": [p for _, p in params], "lr": group_lr, "weight_decay": weight_decay,
             "momentum": 0.9, "nesterov": True}
            for group_lr, params in named_param_groups(
                model, step, freeze=freeze, unknown=unknown, lr=lr, scale_by_lr=scale_by_lr,
                background_lr_factor=background_lr_factor)]


class FlooredPolyLR(PolyLR):
    """SSUL's ``poly``: ``max(base (1 - i/I)^power, min_lr)``, i = scheduler steps done (the
    background head's 1e-6 stays 1e-6)."""

    def __init__(self, optimizer, max_iters, power=0.9, last_epoch=-1, min_lr=POLY_MIN_LR):
        super().__init__(optimizer, max_iters, power, last_epoch, min_lr=min_lr)


def make_ssul_scheduler(optimizer, policy, max_iters, step_size=10000):
    """The schedule of SSUL's ``--lr_policy`` (stepped after every iteration)."""
    if policy == "poly":
        return FlooredPolyLR(optimizer, max_iters)
    if policy == "warm_poly":   # a linear warm-up over the first int(0.1 I) iterations
        return WarmupPolyLR(optimizer, max_iters, warmup_iters=int(0.1 * max_iters))
    if policy == "step":
        return StepLR(optimizer, step_size=step_size, gamma=0.1)
    raise OptionError(f"--lr_policy {policy!r} is not one of {', '.join(LR_POLICIES)}")
