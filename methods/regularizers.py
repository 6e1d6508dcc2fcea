"""EWC, PI and RW: weight-importance penalties (docs/behaviour.md §9). The importances are
collected from step 0 on and carried to the next step in ``trainer_state["regularizer"]``,
so every step of a sequence must use the same method (Q15)."""
import logging

from utils.errors import OptionError
from utils.option_range import Range
from utils.regularizer import get_regularizer

from .base import Method, Penalty

METHODS = (
    Method("EWC", {"regularizer": "ewc", "reg_importance": 500},
           "cross-entropy + 500 x EWC penalty"),
    Method("RW", {"regularizer": "rw", "reg_importance": 100},
           "cross-entropy + 100 x Riemannian-walk penalty"),
    Method("PI", {"regularizer": "pi", "reg_importance": 500},
           "cross-entropy + 500 x path-integral penalty"),
)
STATE_KEYS = ("regularizer",)

# the original's options of the regularisers, as argparse keywords (argparser.py orders the
# original's options)
OPTIONS = {
    "regularizer": dict(type=str, default=None, choices=["ewc", "rw", "pi"],
                        help="weight-importance regulariser"),
    "reg_importance": dict(type=float, default=1.0, help="weight of the penalty"),
    "reg_alpha": dict(type=float, default=0.9,
                      help="weight of the newest squared gradient in the Fisher estimate"),
    "reg_no_normalize": dict(action="store_true", default=False,
                             help="do not min-max normalise the importances of the previous "
                                  "step"),
    "reg_iterations": dict(type=int, default=10, help="RW: score update period in iterations"),
}
OPTION_RANGES = {"reg_importance": Range(0), "reg_alpha": Range(0, 1),
                 "reg_iterations": Range(1)}
FINGERPRINT_KEYS = tuple(OPTIONS)

log = logging.getLogger(__name__)


class WeightRegularizer(Penalty):
    """``--regularizer`` x ``--reg_importance``: updated on rank 0 after every task
    backward, its penalty gradient added to the averaged task gradients."""
    name = "reg"
    state_key = "regularizer"
    reads = ("regularizer", "reg_alpha", "reg_no_normalize", "reg_iterations")

    def __init__(self, info):
        super().__init__(info)
        self.weight = info.opts.reg_importance
        self.regularizer = None

    def setup(self, model, model_old, trainer_state):
        old_state = trainer_state.get("regularizer") if trainer_state else None
        if self.info.step > 0 and old_state is None:
            log.warning("the previous step saved no regulariser state: no penalty at this "
                        "step (run step 0 with the same --method)")
        self.regularizer = make_regularizer(model, model_old, self.info.device, self.info.opts,
                                            old_state)

    def after_backward(self):
        if self.info.is_main:      # the original updates the importances on rank 0 only
            self.regularizer.update()

    def penalty(self):
        return self.regularizer.penalty()

    def state_dict(self):
        return self.regularizer.state_dict()

    def load_state_dict(self, state):
        self.regularizer.load_state_dict(state)

    def full_state(self):
        return self.regularizer.full_state()

    def load_full_state(self, state):
        self.regularizer.load_full_state(state)


def make_regularizer(model, model_old, device, opts, old_state):
    """The regulariser of ``--regularizer`` with the settings of ``--reg_alpha``,
    ``--reg_iterations`` and ``--reg_no_normalize`` (``utils.regularizer.get_regularizer``)."""
    return get_regularizer(model, model_old, device, opts.regularizer, old_state,
                           alpha=opts.reg_alpha, iterations=opts.reg_iterations,
                           normalize=not opts.reg_no_normalize)


def parts(info):
    return [WeightRegularizer(info)] if info.opts.regularizer is not None else []


def check_options(opts, explicit):
    if opts.fix_bn and opts.regularizer == "ewc":
        raise OptionError("--fix_bn cannot be combined with EWC (the EWC update needs the "
                          "gradients of the frozen norm layers; the original crashes here)")
    return []
