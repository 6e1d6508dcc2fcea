"""LwF: knowledge distillation of the old model's outputs (docs/behaviour.md §8.5)."""
from utils.loss import KnowledgeDistillationLoss
from utils.option_range import Range

from .base import Method, Term

METHODS = (Method("LWF", {"loss_kd": 100}, "cross-entropy + 100 x KD"),)

# the original's options of output distillation (MiB reads them too), as argparse keywords;
# argparser.py lists the original's options in the original's order
OPTIONS = {
    "loss_kd": dict(type=float, default=0.0, help="weight of output distillation (step>0)"),
    "alpha": dict(type=float, default=1.0,
                  help="multiplies the teacher logits inside (un)biased KD"),
}
OPTION_RANGES = {"loss_kd": Range(0), "alpha": Range(0, low_open=True)}
FINGERPRINT_KEYS = ("loss_kd", "alpha")


class OutputDistillation(Term):
    """``--loss_kd`` x KD of the old model's logits (the student renormalised over the old
    channels, a mean over the old classes, Q5)."""
    name = "kd"
    needs_old = True

    def __init__(self, info):
        super().__init__(info)
        self.weight = info.opts.loss_kd
        self.loss = KnowledgeDistillationLoss(alpha=info.opts.alpha)

    def __call__(self, batch):
        return self.loss(batch.outputs, batch.outputs_old)


def parts(info):
    opts = info.opts
    if info.step > 0 and opts.loss_kd > 0 and not opts.unkd:
        return [OutputDistillation(info)]
    return []
