"""The Trainer: one training epoch and one validation pass.

A method is only a choice of loss terms and weights, read from the options: the main
criterion (CE, unbiased CE or BCE), output distillation (KD or unbiased KD), encoder
distillation, the iCaRL terms and a weight-importance regulariser. The order of operations
within an iteration is the original's (docs/behaviour.md §10.4):

    old-model forward (no grad) -> zero grads -> forward -> main + KD + DE + iCaRL
    -> backward (gradients averaged over processes by DDP)
    -> rank 0: regulariser.update() -> penalty gradient added without a second all-reduce
    -> optimiser step -> scheduler step
"""
import contextlib

import torch
from tqdm import tqdm

from segmentation_module import unwrap
from utils import distributed
from utils.loss import (EncoderDistillationLoss, IcarlDistillationLoss, IcarlLoss,
                        KnowledgeDistillationLoss, UnbiasedKnowledgeDistillationLoss,
                        make_main_criterion)
from utils.regularizer import get_regularizer
from utils.errors import UserError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


class Trainer:
    def __init__(self, model, model_old, device, opts, trainer_state=None, classes=None,
                 logger=None, regularize=True):
        self.model = model
        self.model_old = model_old
        self.device = device
        self.logger = logger
        self.rank = 0 if not torch.distributed.is_initialized() else torch.distributed.get_rank()
        self.world = 1 if not torch.distributed.is_initialized() else \
            torch.distributed.get_world_size()

        if classes is not None:
            self.old_classes = sum(classes) - classes[-1]
        else:
            self.old_classes = 0
        has_old = model_old is not None

        # main criterion (§8.1): BCE first, then unbiased CE at step>0, else CE
        self.icarl_combined = opts.icarl and not opts.icarl_disjoint and has_old
        self.icarl_only_dist = opts.icarl and opts.icarl_disjoint and has_old
        if self.icarl_only_dist:
            self.criterion = IcarlLoss(reduction="mean", bkg=opts.icarl_bkg)
        else:
            # per pixel, then the mean over all pixels, ignored ones included (the
            # original trainer's reduction, not the loss classes' own 'mean')
            self.criterion = make_main_criterion(bce=opts.bce, icarl=opts.icarl, unce=opts.unce,
                                                 old_cl=self.old_classes, reduction="none")
        self.icarl_loss = IcarlDistillationLoss(importance=opts.icarl_importance)
        self.de_loss = EncoderDistillationLoss()

        self.lde = opts.loss_de
        self.lde_flag = self.lde > 0 and has_old
        self.lkd = opts.loss_kd
        self.lkd_flag = self.lkd > 0 and has_old
        if opts.unkd:
            self.lkd_loss = UnbiasedKnowledgeDistillationLoss(alpha=opts.alpha)
        else:
            self.lkd_loss = KnowledgeDistillationLoss(alpha=opts.alpha)
        self.old_forward = self.lde_flag or self.lkd_flag or self.icarl_combined or \
            self.icarl_only_dist
        # the original passes the float weight as the flag: features iff loss_de > 0
        self.ret_intermediate = self.lde > 0

        self.reg_importance = opts.reg_importance
        self.regularizer = None
        if opts.regularizer is not None and regularize:
            old_state = trainer_state.get("regularizer") if trainer_state else None
            self.regularizer = get_regularizer(unwrap(model), unwrap(model_old), device, opts,
                                               old_state)
        self.regularizer_flag = self.regularizer is not None

        self.amp = opts.amp
        self.amp_dtype = AMP_DTYPES[opts.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=opts.amp == "fp16")
        self.channels_last = getattr(opts, "channels_last", "off") == "on"
        self.skip_nonfinite = getattr(opts, "skip_nonfinite", False)
        self.progress = not getattr(opts, "no_progress", False)
        self.skipped_batches = 0
        self.scaler_skipped_steps = 0

    # --- helpers --------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, images, labels):
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, dtype=torch.long, non_blocking=True)
        return images, labels

    def _losses(self, outputs, features, outputs_old, features_old, labels):
        """Main loss and the unweighted distillation terms (the combined iCaRL term is
        weighted, as in the original)."""
        if self.icarl_only_dist:
            main = self.criterion(outputs, labels, torch.sigmoid(outputs_old))
        else:
            main = self.criterion(outputs, labels).mean()
        zero = main.new_zeros(())
        icarl = zero
        if self.icarl_combined:
            icarl = self.icarl_loss(outputs, outputs_old)
        de = zero
        if self.lde_flag:
            de = self.de_loss(features["body"], features_old["body"])
        kd = zero
        if self.lkd_flag:
            kd = self.lkd_loss(outputs, outputs_old)
        return main, kd, de, icarl

    # --- training -------------------------------------------------------------------------
    def train(self, cur_epoch, optim, train_loader, scheduler=None, print_int=10, logger=None):
        logger = logger or self.logger
        model = self.model
        device = self.device
        n_iters = len(train_loader)
        epoch_loss = torch.zeros((), device=device)
        reg_loss = torch.zeros((), device=device)
        interval_loss = torch.zeros((), device=device)
        finite_flags = []
        params = [p for p in unwrap(model).parameters() if p.requires_grad]

        bar = tqdm(total=n_iters, desc=f"epoch {cur_epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (self.progress and self.rank == 0))
        for cur_step, (images, labels) in enumerate(train_loader):
            images, labels = self._to_device(images, labels)
            outputs_old = features_old = None
            with self.autocast():
                if self.old_forward:
                    with torch.no_grad():
                        outputs_old, features_old = self.model_old(
                            images, ret_intermediate=self.ret_intermediate)
            optim.zero_grad(set_to_none=True)
            with self.autocast():
                outputs, features = model(images, ret_intermediate=self.ret_intermediate)
            main, kd, de, icarl = self._losses(outputs, features, outputs_old, features_old,
                                               labels)
            total = main + self.lkd * kd + self.lde * de + icarl
            if self.skip_nonfinite and distributed.any_process(not bool(torch.isfinite(total)),
                                                               device):
                self._skip_batch(optim, scheduler, cur_epoch, cur_step, main, kd, de, icarl,
                                 logger)
                bar.update(1)
                continue
            self.scaler.scale(total).backward()

            l_reg = 0.0
            if self.regularizer_flag:
                self.scaler.unscale_(optim)  # the regulariser reads true gradients
                if self.rank == 0:
                    self.regularizer.update()
                penalty = self.regularizer.penalty()
                if torch.is_tensor(penalty):
                    l_reg = self.reg_importance * penalty
                    self._add_penalty_gradient(l_reg, params)

            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(optim)
            self.scaler.update()
            if scale_before is not None and self.scaler.get_scale() < scale_before:
                self.scaler_skipped_steps += 1
            if scheduler is not None:
                scheduler.step()

            step_total = (total + l_reg).detach()
            if not self.scaler.is_enabled() and not self.skip_nonfinite:
                finite_flags.append(torch.isfinite(step_total))
            epoch_loss += main.detach()
            reg_loss += (self.lkd * kd + self.lde * de + icarl + l_reg).detach()
            interval_loss += step_total
            bar.update(1)

            if (cur_step + 1) % print_int == 0 or cur_step + 1 == n_iters:
                self._check_finite(finite_flags, cur_epoch, cur_step, main, kd, de, icarl, l_reg)
                finite_flags = []
            if (cur_step + 1) % print_int == 0:
                value = interval_loss.item() / print_int
                lr = optim.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                if logger is not None:
                    x = cur_epoch * n_iters + cur_step + 1
                    logger.debug(f"Epoch {cur_epoch}, Batch {cur_step + 1}/{n_iters}, "
                                 f"Loss={value}")
                    logger.add_scalar("Loss", value, x)
                interval_loss.zero_()
        bar.close()

        # epoch statistics: sum over processes into rank 0, mean per iteration
        distributed.reduce_sum_to_main(epoch_loss)
        distributed.reduce_sum_to_main(reg_loss)
        denom = self.world * max(n_iters, 1)
        epoch_loss = epoch_loss.item() / denom
        reg_loss = reg_loss.item() / denom
        if logger is not None:
            logger.info(f"Epoch {cur_epoch}, Class Loss={epoch_loss}, Reg Loss={reg_loss}")
        return epoch_loss, reg_loss

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

    def _check_finite(self, flags, epoch, step, main, kd, de, icarl, l_reg):
        """Checked every print interval (one host sync), on every process together."""
        if not flags:
            return
        ok = torch.stack(flags)
        if not distributed.any_process(not bool(ok.all()), self.device):
            return
        if bool(ok.all()):
            raise NonFiniteLossError(f"the training loss is not finite on another process at "
                                     f"epoch {epoch}, around iteration {step}")
        first = step - len(flags) + 1 + int((~ok).nonzero()[0, 0])
        parts = self._parts_text(main, kd, de, icarl, l_reg)
        raise NonFiniteLossError(
            f"the training loss is not finite at epoch {epoch}, iteration {first} ({parts}); "
            "lower --lr, use --amp off, or pass --skip_nonfinite to skip such batches")

    def _skip_batch(self, optim, scheduler, epoch, step, main, kd, de, icarl, logger):
        self.skipped_batches += 1
        optim.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()  # keep the schedule aligned with the iteration count
        if logger is not None:
            logger.warning(f"skipped batch {step} of epoch {epoch}: non-finite loss "
                           f"({self._parts_text(main, kd, de, icarl, 0.0)})")

    def _parts_text(self, main, kd, de, icarl, l_reg):
        def f(v):
            return float(v.detach()) if torch.is_tensor(v) else v
        return (f"main {f(main):.4g}, kd {f(kd):.4g}, de {f(de):.4g}, icarl {f(icarl):.4g}, "
                f"reg {f(l_reg):.4g}")

    # --- validation -----------------------------------------------------------------------
    def validate(self, loader, metrics, ret_samples_ids=None, logger=None, desc="validate"):
        """Losses (unweighted KD, DE and penalty, as the original logs them), metrics and the
        sample images of the requested batch indices."""
        metrics.reset()
        model = self.model
        device = self.device
        class_loss = torch.zeros((), device=device)
        reg_loss = torch.zeros((), device=device)
        ret_samples = []
        ret_samples_ids = set() if ret_samples_ids is None else \
            {int(i) for i in ret_samples_ids}
        model.eval()
        bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                   disable=not (self.progress and self.rank == 0))
        with torch.no_grad():
            for i, (images, labels) in enumerate(bar):
                images, labels = self._to_device(images, labels)
                outputs_old = features_old = None
                with self.autocast():
                    if self.old_forward:
                        outputs_old, features_old = self.model_old(images, ret_intermediate=True)
                    outputs, features = model(images, ret_intermediate=True)
                main, kd, de, icarl = self._losses(outputs, features, outputs_old, features_old,
                                                   labels)
                loss_reg = kd + de + icarl
                if self.regularizer_flag:
                    penalty = self.regularizer.penalty()
                    loss_reg = loss_reg + penalty
                class_loss += main
                reg_loss += loss_reg
                prediction = outputs.argmax(dim=1)
                metrics.update(labels, prediction)
                if i in ret_samples_ids:
                    ret_samples.append((images[0].float().cpu().numpy(), labels[0].cpu().numpy(),
                                        prediction[0].cpu().numpy()))
            metrics.synch(device)
            score = metrics.get_results()
            distributed.reduce_sum_to_main(class_loss)
            distributed.reduce_sum_to_main(reg_loss)
            denom = self.world * max(len(loader), 1)
            class_loss = class_loss.item() / denom
            reg_loss = reg_loss.item() / denom
        if logger is not None:
            logger.info(f"Validation, Class Loss={class_loss}, Reg Loss={reg_loss} "
                        "(only rank 0)")
        return (class_loss, reg_loss), score, ret_samples

    # --- state ----------------------------------------------------------------------------
    def state_dict(self):
        """The original's trainer state (carried to the next step in the checkpoint)."""
        return {"regularizer": self.regularizer.state_dict() if self.regularizer_flag else None}

    def load_state_dict(self, state):
        """Resume from an original-format trainer state (its quirks included, §9.5)."""
        if self.regularizer_flag and state.get("regularizer") is not None:
            self.regularizer.load_state_dict(state["regularizer"])

    def full_state(self):
        """Everything needed to continue bit-exactly after an interruption."""
        return {"regularizer": self.regularizer.full_state() if self.regularizer_flag else None,
                "scaler": self.scaler.state_dict(),
                "skipped_batches": self.skipped_batches,
                "scaler_skipped_steps": self.scaler_skipped_steps}

    def load_full_state(self, state):
        if self.regularizer_flag and state.get("regularizer") is not None:
            self.regularizer.load_full_state(state["regularizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_batches = state.get("skipped_batches", 0)
        self.scaler_skipped_steps = state.get("scaler_skipped_steps", 0)
