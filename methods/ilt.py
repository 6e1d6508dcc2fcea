"""ILT: KD of the outputs (LwF's term) plus distillation of the body features
(docs/behaviour.md §8.8)."""
from utils.loss import EncoderDistillationLoss
from utils.option_range import Range

from .base import Method, Term

METHODS = (Method("ILT", {"loss_kd": 100, "loss_de": 100},
                  "cross-entropy + 100 x KD + 100 x feature distillation"),)

# the original's option of feature distillation, as argparse keywords (argparser.py orders
# the original's options)
OPTIONS = {"loss_de": dict(type=float, default=0.0,
                           help="weight of encoder (feature) distillation (step>0)")}
OPTION_RANGES = {"loss_de": Range(0)}
FINGERPRINT_KEYS = ("loss_de",)


class FeatureDistillation(Term):
    """``--loss_de`` x the mean squared error between the new and the old body outputs."""
    name = "de"
    needs_old = True
    features = frozenset({"body"})

    def __init__(self, info):
        super().__init__(info)
        self.weight = info.opts.loss_de
        self.loss = EncoderDistillationLoss()

    def __call__(self, batch):
        return self.loss(batch.features["body"], batch.features_old["body"])


def parts(info):
    if info.step > 0 and info.opts.loss_de > 0:
        return [FeatureDistillation(info)]
    return []
