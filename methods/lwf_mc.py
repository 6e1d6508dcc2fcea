"""LwF-MC (iCaRL without exemplars): binary cross-entropy from step 0 on, plus the iCaRL
distillation of the old model's sigmoid outputs (docs/behaviour.md §8.4, §8.7). ``--bce``
alone selects the same criterion."""
import torch

from utils.loss import BCEWithLogitsLossWithIgnoreIndex, IcarlDistillationLoss, IcarlLoss
from utils.option_range import Range

from .base import MainLoss, Method, Term

METHODS = (Method("LWF-MC", {"icarl": True, "icarl_importance": 10},
                  "BCE (also at step 0) + 10 x iCaRL distillation"),)

# the original's options of the BCE criterion and iCaRL, as argparse keywords (argparser.py
# orders the original's options)
OPTIONS = {
    "bce": dict(action="store_true", default=False,
                help="BCE-with-ignore criterion instead of cross-entropy"),
    "icarl": dict(action="store_true", default=False,
                  help="iCaRL-style BCE training and distillation (LwF-MC)"),
    "icarl_importance": dict(type=float, default=1.0,
                             help="weight of the combined iCaRL distillation term"),
    "icarl_disjoint": dict(action="store_true", default=False,
                           help="disjoint iCaRL loss instead of the combined one"),
    "icarl_bkg": dict(action="store_true", default=False,
                      help="disjoint iCaRL: keep the ground truth for channel 0"),
}
OPTION_RANGES = {"icarl_importance": Range(0)}
FINGERPRINT_KEYS = tuple(OPTIONS)


class BinaryCrossEntropy(MainLoss):
    """``--bce`` or ``--icarl``: BCE over all channels against the one-hot target; it wins
    over the unbiased CE (the original's priority), also at step 0 (Q13)."""
    name = "bce"
    priority = 20

    def __init__(self, info):
        super().__init__(info)
        self.criterion = BCEWithLogitsLossWithIgnoreIndex(reduction="none")

    def per_pixel(self, batch):
        return self.criterion(batch.outputs, batch.labels)


class DisjointIcarl(MainLoss):
    """``--icarl --icarl_disjoint`` at step > 0: replaces the main loss; the old channels'
    targets are the old model's probabilities (ignored pixels kept, Q14)."""
    name = "icarl_disjoint"
    priority = 30
    needs_old = True

    def __init__(self, info):
        super().__init__(info)
        self.criterion = IcarlLoss(reduction="none", bkg=info.opts.icarl_bkg)

    def per_pixel(self, batch):
        return self.criterion(batch.outputs, batch.labels, torch.sigmoid(batch.outputs_old))


class IcarlDistillation(Term):
    """The combined iCaRL term, already weighted by ``--icarl_importance`` (so validation
    reports it weighted, as the original, Q22)."""
    name = "icarl"
    needs_old = True

    def __init__(self, info):
        super().__init__(info)
        self.loss = IcarlDistillationLoss(importance=info.opts.icarl_importance)

    def __call__(self, batch):
        return self.loss(batch.outputs, batch.outputs_old)


def parts(info):
    opts, later = info.opts, info.step > 0
    found = []
    if opts.bce or opts.icarl:
        found.append(BinaryCrossEntropy(info))
    if later and opts.icarl and opts.icarl_disjoint:
        found.append(DisjointIcarl(info))
    if later and opts.icarl and not opts.icarl_disjoint:
        found.append(IcarlDistillation(info))
    return found


def check_options(opts, explicit):
    warnings = []
    if (opts.icarl_disjoint or opts.icarl_bkg) and not opts.icarl:
        warnings.append("--icarl_disjoint/--icarl_bkg have no effect without --icarl")
    if opts.icarl_bkg and not opts.icarl_disjoint:
        warnings.append("--icarl_bkg only affects the disjoint iCaRL loss (--icarl_disjoint)")
    return warnings
