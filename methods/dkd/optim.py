"""DKD's parameter groups and learning-rate schedules (docs/behaviour.md §19.5).

| step | group | parameters                                        | lr      | weight decay |
| 0    | 1     | backbone (BN affine unless ``freeze_all_bn``)      | lr      | wd           |
| 0    | 2     | head (same rule)                                   | 10 lr   | wd           |
| 0    | 3     | every classifier, the auxiliary one included       | 10 lr   | wd           |
| >= 1 | 1-3   | backbone / head / cls[0..t-1] (same rule for BN)   | as above| 0            |
| >= 1 | 4     | cls[t]                                             | 10 lr   | wd           |

Parameters that do not require gradients are left out.
"""
import torch.nn as nn

from utils.scheduler import PolyLR, WarmupPolyLR

__all__ = ["param_group_layout", "dkd_param_groups", "dkd_scheduler", "HEAD_LR_FACTOR"]

HEAD_LR_FACTOR = 10.0


def _module_params(prefix, module, freeze_all_bn):
    """(name, parameter) of ``module`` in registration order; BN affine parameters only
    without ``freeze_all_bn``."""
    found = []
    for mod_name, mod in module.named_modules():
        if freeze_all_bn and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                found.append((".".join(n for n in (prefix, mod_name, p_name) if n), p))
    return found


def _classifier_params(model, indices):
    return [(f"cls.{k}.{n}", p) for k in indices
            for n, p in model.cls[k].named_parameters() if p.requires_grad]


def param_group_layout(model, step, lr, weight_decay=1e-4, freeze_all_bn=False):
    """DKD's groups with parameter names: a list of ``{"params": [(name, tensor)], "lr",
    "weight_decay"}``; ``model`` has ``backbone``, ``aspp`` and ``cls``."""
    head_lr = HEAD_LR_FACTOR * lr
    newest = len(model.cls) - 1
    old_wd = weight_decay if step == 0 else 0
    groups = [
        {"params": _module_params("backbone", model.backbone, freeze_all_bn), "lr": lr,
         "weight_decay": old_wd},
        {"params": _module_params("aspp", model.aspp, freeze_all_bn), "lr": head_lr,
         "weight_decay": old_wd},
    ]
    if step == 0:
        groups.append({"params": _classifier_params(model, range(newest + 1)), "lr": head_lr,
                       "weight_decay": weight_decay})
    else:
        groups.append({"params": _classifier_params(model, range(newest)), "lr": head_lr,
                       "weight_decay": 0})
        groups.append({"params": _classifier_params(model, [newest]), "lr": head_lr,
                       "weight_decay": weight_decay})
    return groups


def dkd_param_groups(model, step, lr, weight_decay=1e-4, freeze_all_bn=False):
    """The groups as ``torch.optim`` takes them (DKD: SGD, momentum 0.9, Nesterov)."""
    return [dict(g, params=[p for _, p in g["params"]])
            for g in param_group_layout(model, step, lr, weight_decay, freeze_all_bn)]


def dkd_scheduler(optimizer, max_iters, warmup_fraction=None, power=0.9):
    """VOC: poly; ADE: a linear warm-up over ``warmup_fraction`` of the iterations (0.2),
    restarted at every step (D25), then poly."""
    if warmup_fraction is None:
        return PolyLR(optimizer, max_iters=max_iters, power=power)
    return WarmupPolyLR(optimizer, max_iters=max_iters, warmup_iters=warmup_fraction * max_iters,
                        power=power)
