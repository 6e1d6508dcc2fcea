"""The registry of method families, and the method of one step assembled from its parts.

A family module (``methods/lwf.py``, ...) declares:

* ``METHODS``: its ``--method`` entries (``Method(name, preset)``);
* ``parts(info)``: the parts active for the options ``info.opts`` of a step;
* optionally ``OPTIONS`` (its options of the command line's "method" group: argparse keywords
  by option name; ``argparser.py`` adds the original's in the original's order, then the
  others), ``add_arguments(parser)`` (options in a group of its own),
  ``check_options(opts, explicit)`` (validation; returns warnings, raises ``OptionError``),
  ``OPTION_RANGES`` (its numeric options' ``argparser.Range``),
  ``FINGERPRINT_KEYS`` (its options that change what a step trains) and ``STATE_KEYS``
  (its entries of the checkpoint's ``trainer_state``, present as ``None`` when inactive, as
  the original always writes ``{"regularizer": ...}``).

Families are registered in ``methods/__init__.py``; their order is the order in which the
terms of a step add up (the original's: distillation, feature distillation, iCaRL)."""
import tasks

from .base import ATTENTIONS, INTERMEDIATE, MainLoss, Penalty, StepInfo, Term

_FAMILIES = []


def register(module):
    """Add a family module (once)."""
    if module not in _FAMILIES:
        _FAMILIES.append(module)
    return module


def families():
    return list(_FAMILIES)


def all_methods():
    return [m for family in _FAMILIES for m in family.METHODS]


def method_names():
    return [m.name for m in all_methods()]


def find_method(name):
    """The ``Method`` whose name matches ``name`` in any letter case, or None."""
    for m in all_methods():
        if m.name.lower() == str(name).lower():
            return m
    return None


def presets():
    return {m.name: dict(m.preset) for m in all_methods()}


def options():
    """The options the families declare in ``OPTIONS`` (name -> argparse keywords), in the
    order of registration; a name declared twice is a mistake of the families."""
    declared = {}
    for family in _FAMILIES:
        for name, keywords in getattr(family, "OPTIONS", {}).items():
            if name in declared:
                raise ValueError(f"option --{name} is declared by two method families")
            declared[name] = keywords
    return declared


def add_arguments(parser):
    for family in _FAMILIES:
        if hasattr(family, "add_arguments"):
            family.add_arguments(parser)


def check_options(opts, explicit):
    warnings = []
    for family in _FAMILIES:
        if hasattr(family, "check_options"):
            warnings += family.check_options(opts, explicit) or []
    return warnings


def option_ranges():
    """The numeric ranges of the families' own options (``OPTION_RANGES``, checked by the
    command line with its own)."""
    return {k: v for family in _FAMILIES for k, v in getattr(family, "OPTION_RANGES",
                                                               {}).items()}


def fingerprint_keys():
    return tuple(k for family in _FAMILIES for k in getattr(family, "FINGERPRINT_KEYS", ()))


def state_keys():
    return tuple(k for family in _FAMILIES for k in getattr(family, "STATE_KEYS", ()))


def step0_signature(opts):
    """The signature of step 0 of ``opts`` (``StepMethod.signature``): which methods could
    share one step-0 training (FT, LwF, ILT and MiB: plain cross-entropy; LwF-MC: BCE; EWC,
    PI, RW: cross-entropy plus their importances, each its own)."""
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, 0)
    return assemble(StepInfo(opts, classes, device=None)).signature()


def plain_fine_tuning(opts):
    """Whether a step of ``opts`` trains the cross-entropy alone (FT): no family adds a part
    for these options (asked of every family, so a new method's options count too)."""
    from . import ft
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    parts = assemble(StepInfo(opts, classes, device=None)).parts
    return [type(p) for p in parts] == [ft.CrossEntropy]


def assemble(info):
    """The method of one step: every family's active parts for ``info.opts``."""
    parts = [part for family in _FAMILIES for part in family.parts(info)]
    return StepMethod(parts)


class StepMethod:
    """The parts of one step, as the trainer runs them: the main loss (the active one with
    the highest priority), the weighted terms, the penalties and the hooks."""

    def __init__(self, parts):
        mains = [p for p in parts if isinstance(p, MainLoss)]
        if not mains:
            raise ValueError("no main loss among the parts of this step")
        top = max(p.priority for p in mains)
        chosen = [p for p in mains if p.priority == top]
        if len(chosen) > 1:
            raise ValueError(f"two main losses of the same priority: "
                             f"{', '.join(type(p).__name__ for p in chosen)}")
        self.main = chosen[0]
        # main losses that lost to a higher priority take no part in the step
        self.parts = [p for p in parts if not isinstance(p, MainLoss) or p is self.main]
        self.terms = [p for p in self.parts if isinstance(p, Term)]
        self.penalties = [p for p in self.parts if isinstance(p, Penalty)]

    def active(self, validation=False):
        return [p for p in self.parts if p.in_validation or not validation]

    def needs_old(self, validation=False):
        return any(p.needs_old for p in self.active(validation))

    def model_kwargs(self, validation=False):
        """Keyword arguments of the networks' forward: only the outputs that are read."""
        wanted = set().union(*(p.features for p in self.active(validation)))
        kwargs = {}
        if wanted & INTERMEDIATE:
            kwargs["ret_intermediate"] = True
        if wanted & ATTENTIONS:
            kwargs["ret_attentions"] = True
        return kwargs

    def names(self):
        return [type(p).__name__ for p in self.parts]

    def signature(self):
        """The parts of the step and what they read, in order: equal signatures (with
        equal common options) mean the step trains the same way and writes the same
        trainer state."""
        return tuple(p.signature() for p in self.parts)

    # --- hooks (methods/base.py lists them in the order they run) ---------------------------
    def extra_maps(self):
        """The extra per-pixel maps the parts read with every training image, in order."""
        names = []
        for p in self.parts:
            names += [n for n in p.extra_maps if n not in names]
        return tuple(names)

    def _memory_key(self, part):
        return part.state_key or part.name

    def load_memory(self, memories):
        """``memories``: what the previous step kept, by part key (``memory_state``)."""
        for p in self.parts:
            key = self._memory_key(p)
            if memories and memories.get(key) is not None:
                p.load_memory(memories[key])

    def memory_state(self):
        """What the parts keep for the next step, by key; None when nothing is kept."""
        kept = {self._memory_key(p): p.memory_state() for p in self.parts}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None

    def training_set(self, dataset):
        for p in self.parts:
            dataset = p.training_set(dataset)
        return dataset

    def network(self, net, role):
        for p in self.parts:
            net = p.network(net, role)
        return net

    def before_step(self, step):
        for p in self.parts:
            p.before_step(step)

    def optimizer_groups(self, groups, model):
        for p in self.parts:
            groups = p.optimizer_groups(groups, model)
        return groups

    def setup(self, model, model_old, trainer_state):
        for p in self.parts:
            p.setup(model, model_old, trainer_state)

    def train_mode(self, model):
        for p in self.parts:
            p.train_mode(model)

    def prepare_batch(self, batch):
        for p in self.parts:
            p.prepare_batch(batch)

    def rewrite_targets(self, batch):
        for p in self.parts:
            p.rewrite_targets(batch)

    def after_optimizer_step(self, batch):
        for p in self.parts:
            p.after_optimizer_step(batch)

    def after_epoch(self, epoch):
        for p in self.parts:
            p.after_epoch(epoch)

    def predict(self, outputs):
        """The label map of ``outputs``: the first part that gives one, else the argmax."""
        for p in self.parts:
            labels = p.predict(outputs)
            if labels is not None:
                return labels
        return outputs.argmax(dim=1)

    def after_step(self, step):
        for p in self.parts:
            p.after_step(step)

    def term_values(self, batch, validation=False):
        """(term, unweighted value) of every term active in this pass, in order."""
        return [(t, t(batch)) for t in self.terms if t.in_validation or not validation]

    # --- state ----------------------------------------------------------------------------
    def _keyed(self):
        return [p for p in self.parts if p.state_key is not None]

    def _collect(self, getter):
        """Every registered key, None for the families that are not active."""
        state = {key: None for key in state_keys()}
        for p in self._keyed():
            state[p.state_key] = getter(p)()
        return state

    def _spread(self, state, setter):
        for p in self._keyed():
            if state.get(p.state_key) is not None:
                setter(p)(state[p.state_key])

    def state_dict(self):
        """``trainer_state`` of the checkpoint (what the next step starts from)."""
        return self._collect(lambda p: p.state_dict)

    def load_state_dict(self, state):
        self._spread(state, lambda p: p.load_state_dict)

    def full_state(self):
        """What an exact resume of the step needs, by the same keys."""
        return self._collect(lambda p: p.full_state)

    def load_full_state(self, state):
        self._spread(state, lambda p: p.load_full_state)
