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

The lifecycle of a step: every part may implement the hooks below (all optional). The
engine and the ``Trainer`` call them in this order and know no method; the parts of a step
are called in registration order. "Resume" says what happens when a killed step is run
again (it must give the same numbers as an uninterrupted one).

 1. ``load_memory(memory)``: when the step starts, before the datasets are built, with what
    the part kept at the end of the previous step (``memory_state``); not called when the
    previous step kept nothing. Resume: called again with the same file.
 2. ``training_set(dataset) -> dataset``: the step's training set (a dataset yielding
    ``(image, label)`` or a mapping, taking ``(index, sample_seed)`` keys like
    ``dataset.loader.IndexSubset``); return it, or a bigger one (a replay memory:
    ``dataset.loader.JoinedDataset``). Extra per-pixel maps are asked for with the class
    attribute ``extra_maps`` (names of folders beside the training images); they reach the
    batch as ``batch.extras[name]``. Resume: called again, same result.
 3. ``network(net, role) -> net``: on every freshly built network of the step, before any
    weights are loaded into it: ``role`` is ``"train"`` (the network trained), ``"old"``
    (the previous step's network, into which its final checkpoint loads strictly) or
    ``"final"`` (the network the step's final checkpoint loads into strictly: ``--test``).
    May change it in place or return another module (an output channel, branches, another
    classifier or backbone). Resume: the same networks are built again.
 4. ``before_step(step)``: every step (step 0 too), after the previous step's weights are
    loaded and before the optimiser is built; ``step`` is a ``StepState`` (bare ``model``,
    ``model_old``, ``train_loader``, ``device``, ``logger``, ``autocast()``). May change the
    weights and freeze parameters (``requires_grad``). Resume: runs again, then the
    checkpoint overwrites the weights and the optimiser state.
 5. ``optimizer_groups(groups, model) -> groups``: the optimiser's parameter groups (dicts
    with ``params`` and ``weight_decay``: body, head, classifiers; one group of every
    trainable parameter for a network without that layout); return new ones, each may
    carry ``lr_factor`` (its learning rate is ``--lr`` times it). Resume: same groups.
 6. ``setup(model, model_old, trainer_state)``: when the trainer is built; ``trainer_state``
    is what the previous step saved. Resume: runs, then ``load_full_state`` restores.
 7. ``train_mode(model)``: at the start of every training epoch, right after
    ``model.train()`` (freeze batch-norm statistics). Resume: as every epoch.
 8. ``prepare_batch(batch)``: every training iteration, as soon as the batch is on the
    device, before the old model's forward: may replace ``images``, ``labels``,
    ``targets`` and ``extras`` (mix memory samples into the batch). Resume: a part that
    draws its own samples keeps where it is in ``full_state``.
 9. ``rewrite_targets(batch)``: every training iteration, after the old model's forward and
    before the new one, without gradients: ``batch.labels`` and ``batch.pixel_weight``.
10. ``after_optimizer_step(batch)``: every training iteration whose step was taken, after
    the optimiser step and before the scheduler step.
11. ``after_epoch(epoch)``: at the end of every training epoch, before validation and
    before its checkpoint. Resume: what it changed is in that checkpoint (the weights, or
    the part's ``full_state``).
12. ``predict(outputs) -> labels``: the label map of a batch for validation and test
    (return None to leave it to the next part; default ``outputs.argmax(1)``).
13. ``after_step(step)``: once, after the last epoch and before the step's final checkpoint
    is written (``StepState``; may change the weights and the network's structure, e.g.
    merge branches, into the ``"final"`` network). What it changes is in that checkpoint,
    which records that it ran: a step killed after it resumes to the test, without running
    it again; one killed during it resumes from the last epoch's checkpoint and runs it again.
14. ``memory_state()``: right after ``after_step``, what the part keeps for the next step
    (None: nothing). The engine writes the step's memories beside the checkpoint
    (``<checkpoint stem>.memory.pth``, atomically, before the final checkpoint, which records
    its SHA-256; the manifest then covers it through the checkpoint).
15. ``state_dict()`` / ``load_state_dict()``: what goes into the checkpoint's
    ``trainer_state[state_key]`` for the next step; ``full_state()`` / ``load_full_state()``:
    what an exact resume of the step needs.

Parts declare what they read from the networks: ``needs_old`` (the old model's outputs)
and ``features`` (extra outputs of the network: ``"body"``, ``"pre_logits"``,
``"attentions"``, ``"sem_logits_small"``), so that other methods pay nothing for them.
"""
import abc
from dataclasses import dataclass, field

import torch

from utils.runtime import Runtime

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
        """Autocast as the trainer runs it (``utils.runtime.Runtime``)."""
        return Runtime(torch.device(self.device), self.amp_dtype).autocast()


class Batch:
    """One iteration's tensors. ``labels`` may be rewritten by a hook (the loader's targets
    stay in ``targets``); ``pixel_weight`` (None, or broadcastable to B x H x W) multiplies
    the main loss of each pixel; ``extras`` holds the extra per-pixel maps of the data (by
    name) and whatever the parts add; ``training`` is False in validation; ``epoch`` and
    ``iteration`` say where in the step the batch is (None in validation)."""

    def __init__(self, images, labels, extras=None, training=True, epoch=None, iteration=None):
        self.images = images
        self.targets = labels
        self.labels = labels
        self.pixel_weight = None
        self.outputs = self.features = None
        self.outputs_old = self.features_old = None
        self.extras = dict(extras or {})
        self.training = training
        self.epoch = epoch
        self.iteration = iteration


class Part:
    """A piece of a method (hooks only); see the module docstring for the hooks."""
    name = "part"
    needs_old = False           # reads the old model's outputs
    features = frozenset()      # extra network outputs it reads
    in_validation = True        # computed in the validation pass too
    in_epoch_loss = True        # counted in the epoch's loss statistics
    state_key = None            # its entry of the checkpoint's trainer_state
    reads = ()                  # the options it reads beyond its activation (signature)
    extra_maps = ()             # extra per-pixel maps read with every training image

    def __init__(self, info):
        self.info = info

    def signature(self):
        """What makes this part train differently from another: its kind, its weight and
        the options it reads (two steps with equal signatures train the same way)."""
        return (type(self).__module__ + "." + type(self).__qualname__,
                getattr(self, "weight", None),
                tuple((name, repr(getattr(self.info.opts, name))) for name in self.reads))

    # the hooks, in the order they run (module docstring)
    def load_memory(self, memory):
        pass

    def training_set(self, dataset):
        return dataset

    def network(self, net, role):
        return net

    def before_step(self, step):
        pass

    def optimizer_groups(self, groups, model):
        return groups

    def setup(self, model, model_old, trainer_state):
        pass

    def train_mode(self, model):
        pass

    def prepare_batch(self, batch):
        pass

    def rewrite_targets(self, batch):
        pass

    def after_optimizer_step(self, batch):
        pass

    def after_epoch(self, epoch):
        pass

    def predict(self, outputs):
        return None

    def after_step(self, step):
        pass

    def memory_state(self):
        return None

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
