"""The Trainer: one training epoch, and the losses of the validation pass.

The Trainer runs the parts of the step's method (``methods/``): it knows no method by name.
The order of operations within an iteration is the original's (docs/behaviour.md §10.4),
with the lifecycle hooks of methods/base.py where they apply:

    batch on the device -> prepare_batch hooks -> old-model forward (no grad)
    -> target rewriting hooks -> zero grads -> forward
    -> main loss + weighted terms -> backward (gradients averaged over processes by DDP)
    -> penalties: update after the backward (not on a step the fp16 loss scaler skips),
       gradient added without a second all-reduce
    -> optimiser step -> after_optimizer_step hooks -> scheduler step
With ``--accumulate K`` the batch steps up to the backward run for each of K micro-batches,
and the steps from the penalties on once per group (one optimiser step).

Each epoch starts with ``model.train()`` and the ``train_mode`` hooks and ends with the
``after_epoch`` hooks.
"""
import contextlib
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import methods
from dataset.loader import as_mapping
from segmentation_module import unwrap
from utils import distributed
from utils.errors import UserError
from utils.eta import sequence_left
from utils.runtime import AMP_DTYPES, Runtime

__all__ = ["AMP_DTYPES", "Trainer", "optimizer_steps"]


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochResult:
    """What one training epoch gives: the mean per iteration (over all processes) of the
    main loss, of the other terms and penalties together, and of each one by name."""
    main: float
    reg: float
    terms: dict = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0

    def __iter__(self):         # (main, reg), as the original trainer returns them
        return iter((self.main, self.reg))

    def __getitem__(self, index):
        return (self.main, self.reg)[index]


def format_seconds(seconds):
    """``1:02:03`` (hours:minutes:seconds), as tqdm shows times."""
    return tqdm.format_interval(max(seconds, 0.0))


def step_speed(images, seconds, iterations_done, iterations_left, step_iterations=0,
               later_share=None):
    """Images per second so far and the time left of the step's training at that pace,
    for the progress bar and the log (as torchvision's reference scripts show them); with
    ``later_share`` (utils/eta.py) the estimate for the whole sequence too (``~``)."""
    per_iteration = seconds / max(iterations_done, 1)
    speed = {"img/s": f"{images / max(seconds, 1e-9):.1f}",
             "step ETA": format_seconds(per_iteration * iterations_left)}
    if later_share is not None:
        left = sequence_left(iterations_left, step_iterations, later_share)
        speed["all ETA"] = "~" + format_seconds(per_iteration * left)
    return speed


def micro_batch_group(index, n_iters, accumulate):
    """(size of the group of micro-batches ``index`` belongs to, is it the group's first,
    is it its last): groups of ``accumulate`` consecutive batches, the epoch's last group
    holding what is left."""
    start = index - index % accumulate
    size = min(accumulate, n_iters - start)
    return size, index == start, index == start + size - 1


def optimizer_steps(n_iters, accumulate):
    """Optimiser steps of an epoch of ``n_iters`` micro-batches (the poly schedule's unit)."""
    return -(-n_iters // accumulate)


class Trainer:
    """``Trainer(model, model_old, device, opts, trainer_state, classes)`` as in the original:
    the method's parts are assembled from the options unless ``method`` is given (the engine
    builds it first, to run its ``before_step`` hooks)."""

    def __init__(self, model, model_old, device, opts, trainer_state=None, classes=None,
                 logger=None, method=None, dist=None):
        self.model = model
        self.model_old = model_old
        self.device = device
        self.logger = logger
        self.dist = dist or distributed.context()
        classes = list(classes) if classes is not None else [0]
        if method is None:
            info = methods.StepInfo(opts, classes, device, rank=self.dist.rank,
                                    world_size=self.dist.world_size, logger=logger)
            method = methods.assemble(info)
        self.method = method
        method.setup(unwrap(model), unwrap(model_old) if model_old is not None else None,
                     trainer_state)

        # precision, memory format and the batch's way to the device (utils/runtime.py)
        self.runtime = Runtime.from_options(opts, device)
        self.scaler = self.runtime.grad_scaler()
        self.skip_nonfinite = opts.skip_nonfinite
        self.progress = not opts.no_progress
        self.epochs = opts.epochs           # for "epoch 1 of N" and the step's ETA
        self.later_share = None     # the later steps of a sequence, for its ETA (utils/eta.py)
        self.skipped_batches = 0
        self.scaler_skipped_steps = 0
        # --accumulate K: K micro-batches per optimiser step (docs/accumulation.md)
        self.accumulate = opts.accumulate

    # --- helpers --------------------------------------------------------------------------
    @property
    def amp_dtype(self):
        return self.runtime.amp_dtype

    @property
    def channels_last(self):
        return self.runtime.channels_last

    def autocast(self):
        return self.runtime.autocast()

    def to_device(self, images, labels):
        return self.runtime.images(images), self.runtime.labels(labels)

    def make_batch(self, item, **where):
        """A ``methods.Batch`` on the device from a loader item (a mapping or a pair)."""
        item = as_mapping(item)
        return methods.Batch(*self.to_device(item["image"], item["label"]),
                             extras=self.runtime.extras(item["extras"]), **where)

    def _old_forward(self, batch, validation=False):
        if self.model_old is not None and self.method.needs_old(validation):
            with self.autocast(), torch.no_grad():
                batch.outputs_old, batch.features_old = self.model_old(
                    batch.images, **self.method.model_kwargs(validation))

    # --- training -------------------------------------------------------------------------
    def train(self, cur_epoch, optim, train_loader, scheduler=None, print_int=10, logger=None):
        """One epoch over ``train_loader`` (``model.train()`` and the sampler's epoch set
        here). Returns an ``EpochResult`` (it unpacks as the original's (main, reg))."""
        logger = logger or self.logger
        model = self.model
        method = self.method
        device = self.device
        model.train()
        method.train_mode(unwrap(model))
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(cur_epoch)
        start = time.perf_counter()
        n_iters = len(train_loader)
        epoch_loss = torch.zeros((), device=device)
        reg_loss = torch.zeros((), device=device)
        interval_loss = torch.zeros((), device=device)
        by_name = {}
        finite_flags = []
        skipped_steps = torch.zeros((), dtype=torch.long, device=device)
        images_seen = 0
        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        forward_kwargs = method.model_kwargs()

        bar = tqdm(total=n_iters, desc=f"epoch {cur_epoch + 1} of {self.epochs}", leave=False,
                   dynamic_ncols=True, disable=not (self.progress and self.dist.is_main))
        for cur_step, item in enumerate(train_loader):
            # micro-batches of one optimiser step: K of them, the epoch's last group fewer
            group, first, last = micro_batch_group(cur_step, n_iters, self.accumulate)
            batch = self.make_batch(item, epoch=cur_epoch, iteration=cur_step)
            method.prepare_batch(batch)
            images_seen += batch.images.shape[0]
            self._old_forward(batch)
            with torch.no_grad():
                method.rewrite_targets(batch)
            if first:
                optim.zero_grad(set_to_none=True)
            with self.autocast():
                batch.outputs, batch.features = model(batch.images, **forward_kwargs)
            main = method.main(batch)
            values = method.term_values(batch)
            total = main
            for term, value in values:
                total = total + term.weight * value
            if self.skip_nonfinite and distributed.any_process(not bool(torch.isfinite(total)),
                                                               device):
                self._skip_batch(optim, scheduler if last else None, cur_epoch, cur_step, main,
                                 values, logger)
                bar.update(1)
                continue
            # the mean over the group's micro-batches: the large batch's gradient
            with self._no_sync(model, last):
                self.scaler.scale(total if group == 1 else total / group).backward()

            penalties, l_reg = [], 0.0
            if last:        # the optimiser step, once per group of micro-batches
                penalties = self._penalties(optim, params)
                l_reg = sum((w for _, w in penalties), 0.0)

                scale_before = self._scale()
                self.scaler.step(optim)
                self.scaler.update()
                if scale_before is not None:  # a skipped step lowers the scale; counted on device
                    skipped_steps += self._scale() < scale_before
                method.after_optimizer_step(batch)
                if scheduler is not None:
                    scheduler.step()

            step_total = (total + l_reg).detach()
            if not self.skip_nonfinite:  # under fp16 too: a NaN loss is no overflow
                finite_flags.append(torch.isfinite(step_total))
            epoch_loss += main.detach()
            reg = sum((term.weight * value for term, value in values if term.in_epoch_loss),
                      0.0) + l_reg
            if torch.is_tensor(reg):
                reg_loss += reg.detach()
            self._add_by_name(by_name, main, values, penalties)
            interval_loss += step_total
            bar.update(1)

            if (cur_step + 1) % print_int == 0 or cur_step + 1 == n_iters:
                self._check_finite(finite_flags, cur_epoch, cur_step, main, values, l_reg)
                finite_flags = []
            if (cur_step + 1) % print_int == 0:
                value = interval_loss.item() / print_int
                lr = optim.param_groups[0]["lr"]
                speed = step_speed(images_seen, time.perf_counter() - start, cur_step + 1,
                                   n_iters * (self.epochs - cur_epoch) - cur_step - 1,
                                   n_iters * self.epochs, self.later_share)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", **speed)
                if logger is not None:
                    x = cur_epoch * n_iters + cur_step + 1
                    logger.debug(f"epoch {cur_epoch + 1} of {self.epochs}, batch "
                                 f"{cur_step + 1}/{n_iters}, Loss={value}, "
                                 f"{speed['img/s']} images/s, step ETA {speed['step ETA']}"
                                 + (f", all steps {speed['all ETA']}" if "all ETA" in speed
                                    else ""))
                    logger.add_scalar("Loss", value, x)
                interval_loss.zero_()
        bar.close()
        if self.scaler.is_enabled():
            self.scaler_skipped_steps += int(skipped_steps)
        method.after_epoch(cur_epoch)

        # epoch statistics: sum over processes into rank 0, mean per iteration
        denom = self.dist.world_size * max(n_iters, 1)
        names = sorted(by_name)
        stacked = torch.stack([epoch_loss, reg_loss] + [by_name[k] for k in names])
        distributed.reduce_sum_to_main(stacked)
        values = [v / denom for v in stacked.tolist()]
        result = EpochResult(main=values[0], reg=values[1], terms=dict(zip(names, values[2:])),
                             images=images_seen * self.dist.world_size,
                             seconds=time.perf_counter() - start)
        if logger is not None:
            logger.info(f"epoch {cur_epoch + 1} of {self.epochs}, Class Loss={result.main}, "
                        f"Reg Loss={result.reg}")
        return result

    def _scale(self):
        """A copy of the fp16 loss scale on the device (None without the scaler): no host
        sync per iteration, where ``get_scale()`` would make two."""
        if not self.scaler.is_enabled():
            return None
        return self.scaler._get_scale_async().clone()

    @staticmethod
    def _no_sync(model, last):
        """DDP all-reduces the gradients at the group's last micro-batch only."""
        if last or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    def _penalties(self, optim, params):
        """Update every penalty after the task backward (true, unscaled gradients), then
        add the gradient of its weighted value. Returns [(penalty, weighted value)]."""
        if not self.method.penalties:
            return []
        self.scaler.unscale_(optim)
        # a step the loss scaler skips (inf gradients) teaches the importances nothing
        taken = not self.scaler.is_enabled() or _all_finite(p.grad for p in params)
        found = []
        for part in self.method.penalties:
            if taken:
                part.after_backward()
            value = part.penalty()
            if torch.is_tensor(value):
                weighted = part.weight * value
                self._add_penalty_gradient(weighted, params)
                found.append((part, weighted))
        return found

    def _add_by_name(self, by_name, main, values, penalties):
        entries = [("main", main)] + [(t.name, t.weight * v) for t, v in values] + \
            [(p.name, w) for p, w in penalties]
        for name, value in entries:
            value = value.detach().float()
            by_name[name] = by_name[name] + value if name in by_name else value.clone()

    def _add_penalty_gradient(self, l_reg, params):
        """Add d(penalty)/d(theta) to the averaged task gradients. ``autograd.grad`` does not
        go through DDP's reducer, so the identical penalty is not averaged a second time."""
        grads = torch.autograd.grad(l_reg, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    def _check_finite(self, flags, epoch, step, main, values, l_reg):
        """Checked every print interval (one host sync), on every process together."""
        if not flags:
            return
        ok = torch.stack(flags)
        if not distributed.any_process(not bool(ok.all()), self.device):
            return
        if bool(ok.all()):
            raise NonFiniteLossError(f"the training loss is not finite on another process at "
                                     f"epoch {epoch + 1}, around iteration {step}")
        first = step - len(flags) + 1 + int((~ok).nonzero()[0, 0])
        parts = self._parts_text(main, values, l_reg)
        raise NonFiniteLossError(
            f"the training loss is not finite at epoch {epoch + 1}, iteration {first} ({parts}); "
            "lower --lr, use --amp off, or pass --skip_nonfinite to skip such batches")

    def _skip_batch(self, optim, scheduler, epoch, step, main, values, logger):
        self.skipped_batches += 1
        optim.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()  # keep the schedule aligned with the iteration count
        if logger is not None:
            logger.warning(f"skipped batch {step} of epoch {epoch + 1}: non-finite loss "
                           f"({self._parts_text(main, values, 0.0)})")

    def _parts_text(self, main, values, l_reg):
        def f(v):
            return float(v.detach()) if torch.is_tensor(v) else v
        return ", ".join([f"main {f(main):.4g}"] + [f"{t.name} {f(v):.4g}" for t, v in values]
                         + [f"reg {f(l_reg):.4g}"])

    # --- validation -----------------------------------------------------------------------
    def validation_losses(self, images, labels, outputs, features):
        """(main, other terms and penalties) of one validation batch: the terms and the
        penalty unweighted, as the original logs them (Q22). For ``engine.evaluate``."""
        batch = methods.Batch(images, labels, training=False)
        batch.outputs, batch.features = outputs, features
        self._old_forward(batch, validation=True)
        main = self.method.main(batch)
        reg = main.new_zeros(())
        for _, value in self.method.term_values(batch, validation=True):
            reg = reg + value
        for part in self.method.penalties:
            reg = reg + part.penalty()
        return main, reg

    def validation_kwargs(self):
        """The network outputs the validation losses read."""
        return self.method.model_kwargs(validation=True)

    def predict(self, outputs):
        """The label map of a batch's outputs (the method's rule; default argmax)."""
        return self.method.predict(outputs)

    def validation_settings(self):
        """The keywords of ``engine.evaluate.evaluate`` for a validation pass of this step:
        the runtime, the losses, the outputs they read, the method's prediction rule."""
        return {"device": self.runtime, "losses": self.validation_losses,
                "forward_kwargs": self.validation_kwargs(), "progress": self.progress,
                "predict": self.predict}

    def log_skips(self, logger):
        """What the step skipped (non-finite losses, loss-scaler overflows), once at its end."""
        if self.skipped_batches:
            logger.warning(f"{self.skipped_batches} batches skipped for a non-finite loss")
        if self.scaler_skipped_steps:
            logger.info(f"the fp16 loss scaler skipped {self.scaler_skipped_steps} optimiser "
                        "steps (overflows; expected now and then)")

    # --- state ----------------------------------------------------------------------------
    def state_dict(self):
        """The original's trainer state (carried to the next step in the checkpoint)."""
        return self.method.state_dict()

    def load_state_dict(self, state):
        """Resume from an original-format trainer state (its quirks included, §9.5 of
        docs/behaviour.md)."""
        self.method.load_state_dict(state)

    def scaler_state(self):
        """The loss scaler's state (the checkpoint's ``scaler_state``)."""
        return self.scaler.state_dict()

    def load_scaler_state(self, state):
        self.scaler.load_state_dict(state)

    def full_state(self):
        """Everything needed to continue bit-exactly after an interruption."""
        return {**self.method.full_state(), "scaler": self.scaler.state_dict(),
                "skipped_batches": self.skipped_batches,
                "scaler_skipped_steps": self.scaler_skipped_steps}

    def load_full_state(self, state):
        self.method.load_full_state(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_batches = state.get("skipped_batches", 0)
        self.scaler_skipped_steps = state.get("scaler_skipped_steps", 0)


def _all_finite(grads):
    """No inf / NaN in any gradient (one host sync): what the loss scaler checks too."""
    flags = [torch.isfinite(g).all() for g in grads if g is not None]
    return not flags or bool(torch.stack(flags).all())
