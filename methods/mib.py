"""MiB: unbiased cross-entropy, unbiased distillation and the background-based
initialisation of the new classifier (docs/behaviour.md §8.3, §8.6, §6.10)."""
from utils.loss import UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss

from .base import MainLoss, Method, Part
from .lwf import OutputDistillation

METHODS = (Method("MiB", {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True},
                  "unbiased cross-entropy + 10 x unbiased KD + background-based init"),)

# the original's options of MiB, as argparse keywords (argparser.py orders them)
OPTIONS = {
    "unce": dict(action="store_true", default=False,
                 help="unbiased cross-entropy at step>0 (MiB)"),
    "unkd": dict(action="store_true", default=False,
                 help="unbiased distillation instead of plain KD (MiB)"),
    "init_balanced": dict(action="store_true", default=False,
                          help="background-based init of the new classifier at step>0 (MiB)"),
}
FINGERPRINT_KEYS = tuple(OPTIONS)


class UnbiasedCE(MainLoss):
    """``--unce`` at step > 0: the background absorbs the old classes."""
    name = "unce"
    priority = 10

    def __init__(self, info):
        super().__init__(info)
        self.criterion = UnbiasedCrossEntropy(old_cl=info.n_old, reduction="none")

    def per_pixel(self, batch):
        return self.criterion(batch.outputs, batch.labels)


class UnbiasedDistillation(OutputDistillation):
    """LwF's ``--loss_kd`` term with unbiased KD (``--unkd``): the old background is
    distilled into the new background plus the new classes."""

    def __init__(self, info):
        super().__init__(info)
        self.loss = UnbiasedKnowledgeDistillationLoss(alpha=info.opts.alpha)


class BackgroundInit(Part):
    """``--init_balanced``: the new classifier starts from the background one, whose bias
    is lowered by ln(N + 1) too (Q6). Done once the previous step's weights are in; a
    resumed step overwrites it with its checkpoint."""
    name = "init_balanced"

    def before_step(self, step):
        step.model.init_new_classifier(step.device)


def parts(info):
    opts, later = info.opts, info.step > 0
    found = []
    if later and opts.unce:
        found.append(UnbiasedCE(info))
    if later and opts.loss_kd > 0 and opts.unkd:
        found.append(UnbiasedDistillation(info))
    if later and opts.init_balanced:
        found.append(BackgroundInit(info))
    return found


def check_options(opts, explicit):
    if opts.unkd and opts.loss_kd <= 0:
        return ["--unkd has no effect without --loss_kd > 0"]
    return []
