"""Entry point: train (then test) one incremental step, or several in a row.

    python run.py --data_root data --dataset voc --task 15-5 --step 0 --method MiB ...
    torchrun --nproc_per_node=2 run.py ...
    python -m torch.distributed.launch --nproc_per_node=2 run.py ...

One code path for a plain process, torchrun and the legacy launcher; CPU or GPU. Bad input
ends with one line on stderr and exit code 1 (``--debug`` shows the traceback).
"""
import copy
import os
import random
import sys
import time

import numpy as np
import torch

import argparser
import tasks
from utils import distributed
from utils.checkpoint import (CheckpointError, atomic_torch_save, classes_in_state,
                              load_trusted, step_checkpoint_path)
from utils.errors import RunError, UserError
from utils.manifest import Manifest
from dataset.factory import index_folder as dataset_index_folder

CHECKPOINT_FORMAT = "mib-port/1"

# Options that change what a step trains; an interrupted run resumes only when they match.
FINGERPRINT_KEYS = (
    "task", "dataset", "step", "epochs", "batch_size", "crop_size", "lr", "momentum",
    "weight_decay", "lr_policy", "lr_power", "lr_decay_step", "lr_decay_factor", "backbone",
    "output_stride", "norm_act", "overlap", "no_mask", "bce", "unce", "loss_kd", "unkd",
    "alpha", "loss_de", "init_balanced", "icarl", "icarl_importance", "icarl_disjoint",
    "icarl_bkg", "regularizer", "reg_importance", "reg_alpha", "reg_no_normalize",
    "reg_iterations", "fix_bn", "freeze", "random_seed", "cross_val", "train_void_as_ignore",
    "amp", "no_pretrained",
)


# --- setup helpers --------------------------------------------------------------------------

def resolve_runtime_options(opts, device):
    """Turn the ``auto`` choices into concrete ones for this device."""
    if opts.amp is None:
        opts.amp = "off" if opts.opt_level == "O0" else \
            ("fp16" if device.type == "cuda" else "bf16")
    from modules.norm import resolve_norm_impl
    opts.norm_impl = resolve_norm_impl(opts.norm_impl, device)
    if opts.channels_last == "auto":
        opts.channels_last = "on" if device.type == "cuda" else "off"
    if device.type == "cuda":
        # fixed crop sizes: pick the fastest kernels once; with full-image evaluation every
        # new image size would start a new search
        torch.backends.cudnn.benchmark = opts.crop_val
    return opts


def set_seeds(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def make_optimizer(model, opts):
    """SGD with Nesterov momentum; groups body, head, classifiers (docs/behaviour.md §7.1)."""
    groups = []
    if not opts.freeze:
        groups.append({"params": [p for p in model.body.parameters() if p.requires_grad],
                       "weight_decay": opts.weight_decay})
    groups.append({"params": [p for p in model.head.parameters() if p.requires_grad],
                   "weight_decay": opts.weight_decay})
    groups.append({"params": [p for p in model.cls.parameters() if p.requires_grad],
                   "weight_decay": opts.weight_decay})
    # one fused kernel for all parameters on CUDA; the same update rule everywhere
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=True, **fused)


def fingerprint(opts, world_size):
    fp = {k: getattr(opts, k) for k in FINGERPRINT_KEYS}
    fp["method"] = opts.method
    fp["world_size"] = world_size
    return fp


def checkpoint_meta(opts, classes, world_size):
    return {"format": CHECKPOINT_FORMAT, "task": opts.task, "dataset": opts.dataset,
            "step": opts.step, "name": opts.name, "backbone": opts.backbone,
            "output_stride": opts.output_stride, "norm_act": opts.norm_act,
            "classes": list(classes), "epochs": opts.epochs,
            "fingerprint": fingerprint(opts, world_size)}


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_checkpoint_fits(ckpt, path, opts, classes, what):
    """A checkpoint of another task, dataset, backbone or number of classes is an error."""
    if "model_state" not in ckpt:
        raise CheckpointError(f"{what} {path} has no 'model_state' entry; is it a step "
                              "checkpoint of this project or of the original code?")
    meta = ckpt.get("meta") or {}
    for key in ("dataset", "task", "backbone"):
        if key in meta and meta[key] != getattr(opts, key):
            raise CheckpointError(f"{what} {path} was made with --{key} {meta[key]}, this run "
                                  f"uses --{key} {getattr(opts, key)}")
    found = classes_in_state(ckpt["model_state"])
    if found != list(classes):
        raise CheckpointError(f"{what} {path} has classifiers for classes per step {found}, "
                              f"but step {len(classes) - 1} of {opts.task}-{opts.dataset} needs "
                              f"{list(classes)}; is it from another task or step?")


def load_state_into(model, ckpt, path, strict, what):
    from segmentation_module import load_model_state
    return load_model_state(model, ckpt["model_state"], strict=strict, source=f"{what} {path}")


# --- the step -------------------------------------------------------------------------------

class Step:
    """Everything one incremental step needs, built in the original's order
    (docs/behaviour.md §10.1)."""

    def __init__(self, opts, ctx):
        self.opts = opts
        self.ctx = ctx
        self.device = ctx.device
        self.logdir = os.path.join(opts.logdir, opts.task_name, opts.name)
        self.ckpt_path = step_checkpoint_path(opts.checkpoint_dir, opts.task_name, opts.name,
                                              opts.step)
        self.classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
        self.prev_path = None
        if opts.step > 0:
            self.prev_path = opts.step_ckpt or step_checkpoint_path(
                opts.checkpoint_dir, opts.task_name, opts.name, opts.step - 1)

    # preflight: every input file, before anything is built or written
    def preflight(self, manifest):
        opts = self.opts
        if not os.path.isdir(opts.data_root):
            raise RunError(f"data root {opts.data_root} does not exist; get the data with "
                           f"data/download_{opts.dataset}.sh or point --data_root at it")
        if opts.ckpt is not None and not os.path.isfile(opts.ckpt):
            raise RunError(f"--ckpt {opts.ckpt} does not exist (the original silently ignores "
                           "this and trains from scratch; give an existing file or drop --ckpt)")
        if opts.test:
            if opts.ckpt is None and not os.path.isfile(self.ckpt_path):
                raise RunError(f"--test: no trained checkpoint for step {opts.step} at "
                               f"{self.ckpt_path}; train the step first (same command without "
                               "--test) or name a checkpoint with --ckpt")
            return "test"
        if self.prev_path is not None and not os.path.isfile(self.prev_path):
            if not opts.debug:
                how = ("--step_ckpt names it" if opts.step_ckpt else
                       f"make it with the same command and --step {opts.step - 1}")
                raise RunError(f"previous-step checkpoint {self.prev_path} does not exist; "
                               f"{how} (all steps of a task need the same --name and "
                               "--checkpoint_dir)")
        if opts.step == 0 and not opts.no_pretrained:
            from segmentation_module import pretrained_path, require_pretrained
            require_pretrained(pretrained_path(opts.backbone, opts.norm_act, opts.pretrained_dir))
        for folder in (opts.checkpoint_dir, self.logdir):
            _check_writable(folder)
        if opts.ckpt is not None:
            return "ckpt"
        if opts.resume == "never":
            return "fresh"
        if manifest.check_finished_checkpoint(opts.step):
            check_finished_with_same_options(manifest, opts.step, self.ckpt_path, opts,
                                             self.ctx.world_size)
            return "done"
        if os.path.isfile(self.ckpt_path):
            return "auto"
        return "fresh"

    def build(self, plan):
        opts, ctx = self.opts, self.ctx
        from utils.logger import Logger
        self.logger = Logger(self.logdir, rank=ctx.rank, debug=opts.debug,
                             summary=opts.visualize, step=opts.step)
        logger = self.logger
        logger.info(f"Device: {self.device}, processes: {ctx.world_size}, "
                    f"precision: {opts.amp}, norm: {opts.norm_act} ({opts.norm_impl})")
        for w in opts.warnings:
            logger.warning(w)

        set_seeds(opts.random_seed)
        from dataset.factory import get_dataset
        self.train_dst, self.val_dst, self.test_dst, self.n_classes = distributed.main_first(
            lambda: get_dataset(opts, rank=ctx.rank))
        random.seed(opts.random_seed)  # the dataset build may have used the generator
        logger.info(f"Dataset: {opts.dataset}, train set: {len(self.train_dst)}, "
                    f"val set: {len(self.val_dst)}, test set: {len(self.test_dst)}, "
                    f"n_classes: {self.n_classes}")
        if len(self.train_dst) == 0 and plan != "test":
            raise RunError(f"no training image of step {opts.step} of {opts.task} in "
                           f"{opts.data_root}; check --data_root and the index lists in "
                           f"{dataset_index_folder(opts)}")

        from dataset.loader import build_loader
        pin = self.device.type == "cuda"
        self.train_loader = build_loader(self.train_dst, opts.batch_size, shuffle=True,
                                         drop_last=True, num_workers=opts.num_workers,
                                         seed=opts.random_seed, rank=ctx.rank,
                                         world_size=ctx.world_size, pin_memory=pin)
        val_batch = opts.batch_size if opts.crop_val else 1
        self.val_loader = build_loader(self.val_dst, val_batch, shuffle=True, drop_last=False,
                                       num_workers=opts.num_workers, seed=opts.random_seed,
                                       rank=ctx.rank, world_size=ctx.world_size, pin_memory=pin)
        self.test_loader = build_loader(self.test_dst, val_batch, shuffle=True,
                                        drop_last=False, num_workers=opts.num_workers,
                                        seed=opts.random_seed, rank=ctx.rank,
                                        world_size=ctx.world_size, pin_memory=pin)
        if plan != "test" and len(self.train_loader) == 0:
            raise RunError(f"the training set of step {opts.step} has {len(self.train_dst)} "
                           f"images, fewer than one batch of {opts.batch_size} per process; "
                           "lower --batch_size")

    def build_model(self, prev_ckpt=None):
        """Current model (and old model at step>0), optimiser, scheduler (§10.1 6-10)."""
        from segmentation_module import make_model
        opts = self.opts
        # weights overwritten by a checkpoint need no ImageNet file (same numbers)
        model_opts = opts
        if opts.step > 0:
            model_opts = copy.copy(opts)
            model_opts.no_pretrained = True
        self.model = make_model(model_opts, classes=self.classes)
        self.model_old = None
        if opts.step > 0:
            self.model_old = make_model(model_opts, classes=self.classes[:-1])
        if opts.fix_bn:
            self.model.fix_bn()
        memory_format = torch.channels_last if opts.channels_last == "on" else \
            torch.contiguous_format
        self.model.to(self.device, memory_format=memory_format)
        if self.model_old is not None:
            self.model_old.to(self.device, memory_format=memory_format)
        self.optimizer = make_optimizer(self.model, opts)
        from utils.scheduler import make_scheduler
        self.max_iters = opts.epochs * len(self.train_loader)
        self.scheduler = make_scheduler(self.optimizer, opts.lr_policy, self.max_iters,
                                        power=opts.lr_power, decay_step=opts.lr_decay_step,
                                        decay_factor=opts.lr_decay_factor)
        self.prev_trainer_state = None
        if opts.step > 0:
            self._load_previous_step(prev_ckpt)
        from utils.compile import maybe_compile
        self.train_model = maybe_compile(self._wrap(self.model), opts.compile)

    def _wrap(self, model):
        if self.ctx.world_size > 1:
            import inspect
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffer broadcast in forward, as the original's apex DDP (the name changed)
            no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")
            return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})
        return model

    def _load_previous_step(self, ckpt):
        opts, logger = self.opts, self.logger
        if ckpt is None:
            logger.warning(f"previous-step checkpoint {self.prev_path} not found; continuing "
                           "because of --debug (the old model keeps random weights)")
        else:
            check_checkpoint_fits(ckpt, self.prev_path, opts, self.classes[:-1],
                                  "previous-step checkpoint")
            meta = ckpt.get("meta") or {}
            if "epochs" in meta and ckpt.get("epoch", meta["epochs"]) < meta["epochs"]:
                msg = (f"previous-step checkpoint {self.prev_path} is from an unfinished run "
                       f"(epoch {ckpt['epoch'] + 1} of {meta['epochs']}); finish step "
                       f"{opts.step - 1} first")
                if not opts.debug:
                    raise CheckpointError(msg)
                logger.warning(msg)
            load_state_into(self.model, ckpt, self.prev_path, strict=False,
                            what="previous-step checkpoint")
            if opts.init_balanced:
                self.model.init_new_classifier(self.device)
            load_state_into(self.model_old, ckpt, self.prev_path, strict=True,
                            what="previous-step checkpoint")
            self.prev_trainer_state = ckpt.get("trainer_state")
            logger.info(f"[!] Previous model loaded from {self.prev_path}")
        for p in self.model_old.parameters():
            p.requires_grad = False
        self.model_old.eval()

    def checkpoint(self, epoch, best_score, trainer, val_results):
        """The original's keys and ``module.`` names, plus what an exact resume needs."""
        from segmentation_module import model_state_for_checkpoint
        return {
            "epoch": epoch,
            "model_state": model_state_for_checkpoint(self.model),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "best_score": best_score,
            "trainer_state": trainer.state_dict(),
            "scaler_state": trainer.scaler.state_dict(),
            "meta": checkpoint_meta(self.opts, self.classes, self.ctx.world_size),
            "resume_state": {"rng": rng_states(), "trainer": trainer.full_state(),
                             "val_results": val_results},
        }

    def resume_from(self, ckpt, path, trainer):
        """Continue a step from its checkpoint: strict model load, optimiser, scheduler,
        epoch; the trainer state as the original does it, or exactly when ours is there."""
        check_checkpoint_fits(ckpt, path, self.opts, self.classes, "checkpoint")
        load_state_into(self.model, ckpt, path, strict=True, what="checkpoint")
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        resume = ckpt.get("resume_state")
        if resume is not None:
            trainer.load_full_state(resume["trainer"])
            restore_rng_states(resume["rng"])
        else:
            if ckpt.get("trainer_state"):
                trainer.load_state_dict(ckpt["trainer_state"])
            if ckpt.get("scaler_state"):
                trainer.scaler.load_state_dict(ckpt["scaler_state"])
        start_epoch = ckpt["epoch"] + 1
        best_score = ckpt.get("best_score", 0.0)
        val_results = (resume or {}).get("val_results")
        self.logger.info(f"[!] Model restored from {path}; continuing at epoch {start_epoch} "
                         f"of {self.opts.epochs}")
        return start_epoch, best_score, val_results


def _check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {folder}: {e.strerror}; choose another folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"{folder} is not writable; fix its permissions or choose another "
                       "folder (--checkpoint_dir / --logdir)")


def fingerprint_changes(recorded, opts, world_size):
    """``option: before -> now`` for every option that differs from a recorded fingerprint."""
    now = fingerprint(opts, world_size)
    return [f"{k}: {recorded.get(k)!r} -> {now[k]!r}" for k in now if recorded.get(k) != now[k]]


def check_resumable(ckpt, path, opts, world_size):
    meta = ckpt.get("meta")
    if meta is None or meta.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} exists but has no record of the run that wrote it (made by "
                       "the original code?); pass --ckpt to resume from it, or --resume never "
                       "to train from scratch and replace it")
    diff = fingerprint_changes(meta["fingerprint"], opts, world_size)
    if diff:
        raise RunError(f"{path} is an unfinished run with other options ({'; '.join(diff)}); "
                       "rerun with the same options to resume it, or with --resume never to "
                       "start over and replace it")


def check_finished_with_same_options(manifest, step, path, opts, world_size):
    """A finished step is skipped only when it was trained with the options given now."""
    recorded = manifest.entry(step).get("fingerprint")
    if recorded is None:      # a manifest written before fingerprints were recorded
        recorded = ((load_trusted(path, "checkpoint").get("meta") or {})
                    .get("fingerprint"))
    if recorded is None:
        return
    diff = fingerprint_changes(recorded, opts, world_size)
    if diff:
        raise RunError(f"step {step} of {opts.task_name}/{opts.name} finished with other "
                       f"options ({'; '.join(diff)}); rerun with --resume never to train it "
                       "again with these options (its checkpoint and results are replaced), "
                       "or choose another --name")


def run_step(opts, ctx):
    """Train and test one step. Returns the test results (rank 0) or None when skipped."""
    from metrics import StreamSegMetrics
    from train import Trainer

    step = Step(opts, ctx)
    logdir = step.logdir
    manifest = Manifest(logdir)
    plan = step.preflight(manifest)
    if plan == "done":
        if ctx.is_main:
            sys.stderr.write(f"INFO:rank0: step {opts.step} of {opts.task_name}/{opts.name} is "
                             f"already finished ({step.ckpt_path}); skipping it "
                             "(--resume never trains it again)\n")
        return None

    # load the checkpoints this run starts from (clear errors before building anything)
    prev_ckpt = None
    if plan != "test" and step.prev_path is not None and os.path.isfile(step.prev_path):
        prev_ckpt = load_trusted(step.prev_path, "previous-step checkpoint")
    resume_ckpt, resume_path = None, None
    if plan == "ckpt":
        resume_path = opts.ckpt
        resume_ckpt = load_trusted(resume_path, "checkpoint")
    elif plan == "auto":
        resume_path = step.ckpt_path
        resume_ckpt = load_trusted(resume_path, "checkpoint")
        check_resumable(resume_ckpt, resume_path, opts, ctx.world_size)

    step.logger = None
    try:
        step.build(plan)
        logger = step.logger
        if plan == "test":
            test_path = opts.ckpt or step.ckpt_path
        else:
            step.build_model(prev_ckpt)
            del prev_ckpt
            trainer = Trainer(step.train_model, step.model_old, step.device, opts,
                              trainer_state=step.prev_trainer_state, classes=step.classes,
                              logger=logger)
            if opts.step > 0 and opts.regularizer and \
                    (step.prev_trainer_state or {}).get("regularizer") is None:
                logger.warning("the previous step saved no regulariser state: no penalty at "
                               "this step (run step 0 with the same --method)")
            start_epoch, best_score, val_results = 0, 0.0, None
            if resume_ckpt is not None:
                start_epoch, best_score, val_results = step.resume_from(
                    resume_ckpt, resume_path, trainer)
                resume_ckpt = None
            if ctx.is_main:
                logger.add_table("Opts", {k: v for k, v in vars(opts).items()
                                          if not k.startswith("_")})
            sample_ids = []
            if opts.sample_num > 0 and ctx.is_main:
                n_samples = min(opts.sample_num, len(step.val_loader))
                if n_samples < opts.sample_num:
                    logger.warning(f"--sample_num {opts.sample_num} is more than the "
                                   f"{n_samples} validation batches; logging {n_samples}")
                sample_ids = np.random.choice(len(step.val_loader), n_samples, replace=False)
            logger.debug(f"Random tensor: {torch.randint(0, 100, (1, 1))}")
            val_results = train_epochs(step, trainer, start_epoch, best_score, val_results,
                                       sample_ids, resume_path)
            test_path = step.ckpt_path
            trainer = None
        results = test_phase(step, test_path, StreamSegMetrics)
        if plan != "test":
            summary = {"mean_iou": float(results["Mean IoU"]),
                       "overall_acc": float(results["Overall Acc"])}
            distributed.on_main(lambda: manifest.mark_finished(
                opts.step, step.ckpt_path, summary,
                fingerprint=fingerprint(opts, ctx.world_size)))
        return results
    finally:
        if step.logger is not None:  # also when build() failed half-way: detach its handlers
            step.logger.close()


def train_epochs(step, trainer, start_epoch, best_score, val_results, sample_ids,
                 resume_path=None):
    """The epoch loop of §10.2: train, validate every --val_interval epochs, checkpoint."""
    from metrics import StreamSegMetrics
    from train import NonFiniteLossError
    opts, ctx, logger = step.opts, step.ctx, step.logger
    model = step.train_model
    val_metrics = StreamSegMetrics(step.n_classes)
    # the last good checkpoint: the file resumed from until this run writes its own
    last_saved = (resume_path, start_epoch - 1) if start_epoch > 0 else None
    for epoch in range(start_epoch, opts.epochs):
        model.train()
        logger.info(f"=====> Epoch {epoch}, lr = {step.optimizer.param_groups[0]['lr']:.6f}")
        step.train_loader.sampler.set_epoch(epoch)
        start = time.time()
        try:
            epoch_loss = trainer.train(epoch, step.optimizer, step.train_loader,
                                       scheduler=step.scheduler, print_int=opts.print_interval,
                                       logger=logger)
        except NonFiniteLossError as e:
            last = (f"last good checkpoint: {last_saved[0]} (after epoch {last_saved[1]})"
                    if last_saved is not None else "no checkpoint of this step was written yet")
            raise NonFiniteLossError(f"{e}; {last}") from e
        logger.info(f"End of Epoch {epoch}/{opts.epochs}, Average Loss={sum(epoch_loss)}, "
                    f"Class Loss={epoch_loss[0]}, Reg Loss={epoch_loss[1]} "
                    f"({time.time() - start:.1f} s)")
        logger.add_scalar("E-Loss", sum(epoch_loss), epoch)
        logger.add_scalar("E-Loss-reg", epoch_loss[1], epoch)
        logger.add_scalar("E-Loss-cls", epoch_loss[0], epoch)

        save = False
        score = best_score
        if (epoch + 1) % opts.val_interval == 0:
            logger.info("validate on val set...")
            model.eval()
            val_loss, val_score, samples = trainer.validate(step.val_loader, val_metrics,
                                                            ret_samples_ids=sample_ids,
                                                            logger=logger)
            logger.info(f"Done validation Epoch {epoch}")
            logger.info(val_metrics.to_str(val_score))
            score = float(val_score["Mean IoU"])
            val_results = {"Class IoU": val_score["Class IoU"],
                           "Class Acc": val_score["Class Acc"]}
            log_validation(step, epoch, val_loss, val_score, samples, sample_ids)
            save = True
        if (epoch + 1) % opts.ckpt_interval == 0:
            save = True
        if save:
            save_checkpoint(step, epoch, score, trainer, val_results)
            last_saved = (step.ckpt_path, epoch)
    save_checkpoint(step, opts.epochs, best_score, trainer, val_results)
    if trainer.skipped_batches:
        logger.warning(f"{trainer.skipped_batches} batches skipped for a non-finite loss")
    if trainer.scaler_skipped_steps:
        logger.info(f"the fp16 loss scaler skipped {trainer.scaler_skipped_steps} optimiser "
                    "steps (overflows; expected now and then)")
    distributed.barrier()
    step.val_results = val_results
    return val_results


def save_checkpoint(step, epoch, score, trainer, val_results):
    """Rank 0 writes the step's checkpoint; a failure stops every process."""
    def save():
        atomic_torch_save(step.checkpoint(epoch, score, trainer, val_results), step.ckpt_path)
        step.logger.info(f"[!] Checkpoint saved: {step.ckpt_path}")
    distributed.on_main(save)


def log_validation(step, epoch, val_loss, val_score, samples, sample_ids):
    from utils.colormap import colormap, sample_panel
    logger = step.logger
    logger.add_scalar("V-Loss", val_loss[0] + val_loss[1], epoch)
    logger.add_scalar("V-Loss-reg", val_loss[1], epoch)
    logger.add_scalar("V-Loss-cls", val_loss[0], epoch)
    logger.add_scalar("Val_Overall_Acc", val_score["Overall Acc"], epoch)
    logger.add_scalar("Val_MeanIoU", val_score["Mean IoU"], epoch)
    logger.add_table("Val_Class_IoU", val_score["Class IoU"], epoch)
    logger.add_table("Val_Acc_IoU", val_score["Class Acc"], epoch)
    cmap = colormap(step.opts.dataset)
    for k, (img, target, lbl) in enumerate(samples):
        logger.add_image(f"Sample_{k}", sample_panel(img, target, lbl, cmap), epoch)


def test_phase(step, path, metrics_cls):
    """Evaluate the trained checkpoint with a fresh model and a plain criterion (§10.8);
    ``--test`` goes through the same path, so it reproduces these figures exactly."""
    from segmentation_module import make_model
    from train import Trainer
    opts, ctx, logger = step.opts, step.ctx, step.logger
    ckpt = load_trusted(path, "checkpoint")
    check_checkpoint_fits(ckpt, path, opts, step.classes, "checkpoint")
    test_opts = copy.copy(opts)
    test_opts.no_pretrained = True  # every weight comes from the checkpoint
    model = make_model(test_opts, classes=step.classes)
    load_state_into(model, ckpt, path, strict=True, what="checkpoint")
    val_results = (ckpt.get("resume_state") or {}).get("val_results") or \
        getattr(step, "val_results", None)
    del ckpt
    memory_format = torch.channels_last if opts.channels_last == "on" else \
        torch.contiguous_format
    model.to(step.device, memory_format=memory_format)
    model = step._wrap(model)
    # the original tests a fresh model outside apex AMP: in fp32
    test_opts.amp = "off"
    trainer = Trainer(model, None, step.device, test_opts, logger=logger, regularize=False)
    metrics = metrics_cls(step.n_classes)
    logger.info(f"Testing {path} on {len(step.test_dst)} images")
    _, results, _ = trainer.validate(step.test_loader, metrics, logger=logger, desc="test")
    logger.info(metrics.to_str(results))
    logger.add_table("Test_Class_IoU", results["Class IoU"])
    logger.add_table("Test_Class_Acc", results["Class Acc"])
    if ctx.is_main and logger.writer is not None and "Confusion Matrix" in results:
        logger.add_figure("Test_Confusion_Matrix", results["Confusion Matrix"])
    table = {}
    if val_results:
        table["V-IoU"] = val_results["Class IoU"]
        table["V-Acc"] = val_results["Class Acc"]
    table["T-IoU"] = results["Class IoU"]
    table["T-Acc"] = results["Class Acc"]
    logger.add_results(table)
    logger.add_scalar("T_Overall_Acc", results["Overall Acc"], opts.step)
    logger.add_scalar("T_MeanIoU", results["Mean IoU"], opts.step)
    logger.add_scalar("T_MeanAcc", results["Mean Acc"], opts.step)
    distributed.on_main(lambda: write_results(step, results))
    logger.flush()
    return results


def write_results(step, results):
    """``results/step-<N>.json`` and ``.csv`` in the log dir, plus the per-class IoU bars."""
    from utils.results import class_iou_figure, write_step_results
    opts, logger = step.opts, step.logger
    options = {k: v for k, v in vars(opts).items() if not k.startswith("_")}
    json_path, csv_path = write_step_results(
        os.path.join(step.logdir, "results"), task=opts.task, dataset=opts.dataset,
        step=opts.step, name=opts.name, method=opts.method, seed=opts.random_seed, opts=options,
        labels_per_step=tasks.get_task_dict(opts.dataset, opts.task, opts.step),
        results=results)
    logger.info(f"Results written to {json_path} and {csv_path}")
    if logger.writer is not None:
        from utils.results import load_results
        logger.add_figure("Test_Class_IoU_Bars", class_iou_figure(load_results(json_path)))


def options_for_step(opts, step):
    step_opts = copy.copy(opts)
    step_opts.step = step
    step_opts.lr = argparser.lr_for_step(opts, step)
    if step != opts.steps[0]:
        step_opts.ckpt = None
        step_opts.step_ckpt = None
    return step_opts


def main(argv=None):
    try:
        opts = argparser.parse_options(argv)
    except argparser.OptionError as e:
        argparser.main_error(str(e))
    ctx = distributed.setup(opts.device, opts.local_rank)
    try:
        resolve_runtime_options(opts, ctx.device)
        for s in opts.steps:
            run_step(options_for_step(opts, s), ctx)
    except UserError as e:
        if opts.debug:
            raise
        argparser.main_error(str(e))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; rerun the same command to resume from the last "
                         "finished epoch\n")
        sys.exit(130)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
