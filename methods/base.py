"""What a method is made of: a ``--method`` entry and the parts it adds to a step.

A *method* (``Method``) is a name for ``--method`` and a preset: the options it sets. What
trains is decided by the options alone, as in the original (the options also combine by
hand without ``--method``): every family module in ``methods/`` looks at the options of a
step and returns the *parts* that are active for them. A part is one of

* ``MainLoss``: the per-pixel criterion of the step (the active one with the highest
  ``priority`` is used; plain cross-entropy has priority 0);
* ``Term``: a loss added to the main one with a ``weight`` (distillation, iCaRL);
* ``Penalty``: a loss whose gradient is added after the task backward, without a second
  all-reduce (the weight-importance regularisers);
* ``Part``: hooks only (a classifier initialisation, pseudo-labels).

Every part may implement the hooks below; the ``Trainer`` calls them and knows no method:

* ``before_step(step)``: once, before the trainer of a step is built (also when it resumes),
  with the bare model, the old model and the training loader (``StepState``);
* ``setup(model, model_old, trainer_state)``: when the trainer is built; ``trainer_state`` is
  what the previous step saved;
* ``rewrite_targets(batch)``: every training iteration, after the old model's forward and
  before the new one (the batch's ``labels`` and ``pixel_weight`` may be replaced);
* ``state_dict()`` / ``load_state_dict()``: what goes into the checkpoint's
  ``trainer_state[state_key]`` for the next step; ``full_state()`` / ``load_full_state()``:
  what an exact resume of the step needs.

Parts declare what they read from the networks: ``needs_old`` (the old model's outputs)
and ``features`` (extra outputs of the network: ``"body"``, ``"pre_logits"``,
``"attentions"``, ``"sem_logits_small"``), so that other methods pay nothing for them.
"""
import abc
import contextlib
from dataclasses import dataclass, field

import torch

__all__ = ["Method", "StepInfo", "StepState", "Batch", "Part", "MainLoss", "Term", "Penalty"]

INTERMEDIATE = frozenset({"body", "pre_logits"})
ATTENTIONS = frozenset({"attentions", "sem_logits_small"})


@dataclass(frozen=True)
class Method:
    """A ``--method`` entry: its spelling and the options it sets (its preset)."""
    name: str
    preset: dict = field(default_factory=dict)
    summary: str = ""


@dataclass
class StepInfo:
    """What the parts of a step know when they are made."""
    opts: object
    classes: list            # classes per step, this step's last
    device: torch.device
    rank: int = 0
    world_size: int = 1
    logger: object = None

    @property
    def step(self):
        return len(self.classes) - 1

    @property
    def n_old(self):
        """Channels of the old model (background included); 0 at step 0."""
        return sum(self.classes) - self.classes[-1]

    @property
    def n_classes(self):
        return sum(self.classes)

    @property
    def is_main(self):
        return self.rank == 0


@dataclass
class StepState:
    """What ``before_step`` hooks work on: the bare networks and the training loader."""
    model: torch.nn.Module
    model_old: torch.nn.Module
    train_loader: object
    device: torch.device
    logger: object = None
    amp_dtype: torch.dtype = None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


class Batch:
    """One iteration's tensors. ``labels`` may be rewritten by a hook (the loader's targets
    stay in ``targets``); ``pixel_weight`` (None, or broadcastable to B x H x W) multiplies
    the main loss of each pixel."""
    __slots__ = ("images", "targets", "labels", "pixel_weight", "outputs", "features",
                 "outputs_old", "features_old")

    def __init__(self, images, labels):
        self.images = images
        self.targets = labels
        self.labels = labels
        self.pixel_weight = None
        self.outputs = self.features = None
        self.outputs_old = self.features_old = None


class Part:
    """A piece of a method (hooks only); see the module docstring for the hooks."""
    name = "part"
    needs_old = False           # reads the old model's outputs
    features = frozenset()      # extra network outputs it reads
    in_validation = True        # computed in the validation pass too
    in_epoch_loss = True        # counted in the epoch's loss statistics
    state_key = None            # its entry of the checkpoint's trainer_state
    reads = ()                  # the options it reads beyond its activation (signature)

    def __init__(self, info):
        self.info = info

    def signature(self):
        """What makes this part train differently from another: its kind, its weight and
        the options it reads (two steps with equal signatures train the same way)."""
        return (type(self).__module__ + "." + type(self).__qualname__,
                getattr(self, "weight", None),
                tuple((name, repr(getattr(self.info.opts, name))) for name in self.reads))

    def before_step(self, step):
        pass

    def setup(self, model, model_old, trainer_state):
        pass

    def rewrite_targets(self, batch):
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass

    def full_state(self):
        return self.state_dict()

    def load_full_state(self, state):
        self.load_state_dict(state)


class MainLoss(Part, abc.ABC):
    """The main criterion: ``per_pixel(batch)`` is the B x H x W loss map (0 on ignored
    pixels); the trainer weights it by the batch's ``pixel_weight`` and averages it over
    all pixels, ignored ones included, as the original trainer does."""
    name = "main"
    priority = 0

    @abc.abstractmethod
    def per_pixel(self, batch):
        """The B x H x W loss map of the batch."""

    def __call__(self, batch):
        loss = self.per_pixel(batch)
        if batch.pixel_weight is not None:
            loss = loss * batch.pixel_weight
        return loss.mean()


class Term(Part, abc.ABC):
    """A loss term added to the main loss as ``weight * term(batch)``; validation reports
    the unweighted value (as the original logs them)."""
    weight = 1.0

    @abc.abstractmethod
    def __call__(self, batch):
        """The unweighted value of the term (a 0-dim tensor)."""


class Penalty(Part):
    """A loss on the parameters alone. After the task backward (gradients averaged over
    processes and unscaled), ``after_backward()`` updates its statistics; the trainer then
    adds the gradient of ``weight * penalty()`` without a second all-reduce."""
    weight = 1.0

    def after_backward(self):
        pass

    def penalty(self):
        """A 0-dim tensor, or the float 0.0 when there is nothing to penalise."""
        return 0.0
