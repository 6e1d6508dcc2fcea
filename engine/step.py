"""One incremental step from start to end: the plan, the checkpoints it starts from, the
step's parts, the epoch loop, the test phase, the result files and the run manifest."""
import os
import sys

import numpy as np
import torch

import methods
import tasks
from metrics import StreamSegMetrics
from utils import distributed
from utils.checkpoint import (
    CheckpointError,
    check_resumable,
    checkpoint_meta,
    load_trusted,
    restore_checkpoint,
    restore_rng_states,
    rng_states,
    sha256_of,
)
from utils.cost import StepCost
from utils.errors import UserError
from utils.events import EventLog
from utils.logger import Logger
from utils.manifest import Manifest
from utils.results import class_iou_figure, load_results, result_paths, write_results

from . import build
from .evaluate import test_phase
from .loop import after_step_ran, eval_figures, memory_path, train_epochs
from .plan import preflight, run_fingerprint, step_paths
from .summary import print_summary


def run_step(opts, ctx):
    """Train and test one step. Returns the test figures (valid on rank 0), or None when
    the step was finished already."""
    paths = step_paths(opts)
    manifest = Manifest(paths.logdir)
    plan = preflight(opts, paths, manifest, ctx.world_size)
    if plan == "done":
        if ctx.is_main:
            sys.stderr.write(f"INFO:rank0: step {opts.step} of {opts.task_name}/{opts.name} is "
                             f"already finished ({paths.ckpt}); skipping it "
                             "(--resume never trains it again)\n")
            done = result_paths(os.path.join(paths.logdir, "results"), opts.step)[0]
            if os.path.isfile(done):
                print_summary(done)
        return None
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    fingerprint_now = run_fingerprint(opts, ctx.world_size)

    # the checkpoints this run starts from: clear errors before anything is built
    prev_ckpt = None
    if plan != "test" and paths.prev is not None and os.path.isfile(paths.prev):
        prev_ckpt = load_trusted(paths.prev, "previous-step checkpoint")
        if opts.step_ckpt is None:
            manifest.check_previous_step(opts.step, paths.prev, prev_ckpt)
    resume_ckpt, resume_path = None, None
    if plan in ("ckpt", "auto"):
        resume_path = opts.ckpt if plan == "ckpt" else paths.ckpt
        resume_ckpt = load_trusted(resume_path, "checkpoint")
        if plan == "auto":
            check_resumable(resume_ckpt, resume_path, fingerprint_now)
            if after_step_ran(resume_ckpt):
                # killed after the final checkpoint was written: what is left is the test
                plan, resume_ckpt = "test", None

    logger = Logger(paths.logdir, rank=ctx.rank, debug=opts.debug, summary=opts.visualize,
                    step=opts.step, hold_file=True,    # log.txt: from logger.keep() on
                    tag_prefix="Retest_" if plan == "test" else "")
    events = EventLog(paths.logdir, enabled=ctx.is_main)
    try:
        logger.info(f"Device: {ctx.device}, processes: {ctx.world_size}, "
                    f"precision: {opts.amp}, norm: {opts.norm_act} ({opts.norm_impl})")
        for w in opts.warnings:
            logger.warning(w)
        # the method first: the data may depend on it (extra maps, a replay memory)
        method = methods.assemble(build.step_info(opts, ctx, classes, logger))
        if plan != "test":
            method.load_memory(previous_memory(prev_ckpt, paths.prev))
        data = build.build_data(opts, ctx, logger, training=plan != "test", method=method)
        val_results, cost = None, None
        if plan == "test":
            # PLOP's protocol tests the step's own checkpoint, also when --ckpt names one (P19)
            test_path = paths.ckpt if opts.protocol == "plop" else (opts.ckpt or paths.ckpt)
        else:
            models = build.build_models(opts, ctx, classes, data, method, logger,
                                        prev_ckpt=prev_ckpt, prev_path=paths.prev)
            del prev_ckpt
            trainer = build.build_trainer(opts, ctx, classes, models, method, logger)
            cost = StepCost(models.model, ctx.device, ctx.world_size, opts.batch_size,
                            opts.accumulate)
            start_epoch, best_score, resumed_rng, after_step_done = 0, 0.0, None, False
            if resume_ckpt is not None:
                after_step_done = after_step_ran(resume_ckpt)
                start_epoch, best_score, val_results = restore_checkpoint(
                    resume_ckpt, resume_path, model=models.model, optimizer=models.optimizer,
                    scheduler=models.scheduler, trainer=trainer)
                if plan == "ckpt" and opts.protocol == "plop":
                    start_epoch = 0   # PLOP's --ckpt restores the states, then trains anew (P19)
                logger.info(f"[!] Model restored from {resume_path}; continuing at epoch "
                            f"{start_epoch + 1} of {opts.epochs}")
                resume_ckpt = None
                resumed_rng = rng_states()
            if ctx.is_main:
                logger.add_table("Opts", {k: v for k, v in vars(opts).items()
                                          if not k.startswith("_")})
            sample_ids = pick_sample_ids(opts, ctx, len(data.val_loader), logger)
            # the original prints a random tensor here; drawing it keeps the RNG stream
            logger.debug(f"Random tensor: {torch.randint(0, 100, (1, 1))}")
            if resumed_rng is not None:
                # the draws above belong to the step's start: a resumed epoch continues the
                # RNG streams of the checkpoint (drop path, dropout draw from them)
                restore_rng_states(resumed_rng)
            logger.keep()
            events.write("start", step=opts.step, method=opts.method, epochs=opts.epochs,
                         start_epoch=start_epoch, iterations=len(data.train_loader),
                         train_images=len(data.train), world_size=ctx.world_size,
                         parts=method.names())
            val_results = train_epochs(
                opts, ctx, logger, events, trainer, models, data, paths.ckpt,
                checkpoint_meta(opts, classes, fingerprint_now), start_epoch=start_epoch,
                best_score=best_score, val_results=val_results, sample_ids=sample_ids,
                resume_path=resume_path, after_step_done=after_step_done, cost=cost)
            cost.finish()
            test_path = paths.ckpt
            del trainer, models
        evaluation, val_results = test_phase(opts, ctx, classes, data.test_loader,
                                             data.n_classes, test_path, logger, val_results,
                                             method=method, on_loaded=logger.keep)
        report_test(opts, logger, evaluation.score, val_results)
        events.write("eval", split="test", step=opts.step, epoch=None,
                     **eval_figures(evaluation))
        distributed.on_main(lambda: save_results(opts, paths.logdir, evaluation.score, logger,
                                                      cost))
        logger.flush()
        if not opts.test:
            summary = {"mean_iou": float(evaluation.score["Mean IoU"]),
                       "overall_acc": float(evaluation.score["Overall Acc"])}
            distributed.on_main(lambda: manifest.mark_finished(
                opts.step, paths.ckpt, summary, fingerprint=fingerprint_now))
        return evaluation.score
    except (Exception, KeyboardInterrupt) as e:
        logger.error("interrupted" if isinstance(e, KeyboardInterrupt) else
                     f"error: {e}" if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        logger.close()    # also when a step fails half-way: detach its handlers


def previous_memory(prev_ckpt, prev_path):
    """What the previous step's parts kept (``memory_state``), from the file beside its
    checkpoint, checked against the SHA-256 that checkpoint records; None if it kept none."""
    expected = ((prev_ckpt or {}).get("meta") or {}).get("memory_sha256")
    if expected is None:
        return None
    path = memory_path(prev_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"the memory of the previous step {path} is missing (its "
                              f"checkpoint {prev_path} records one); train step again or "
                              "restore the file")
    if sha256_of(path) != expected:
        raise CheckpointError(f"the memory of the previous step {path} does not match its "
                              f"checkpoint {prev_path} (another run's file?); train that step "
                              "again or restore the file")
    return load_trusted(path, "memory of the previous step")


def pick_sample_ids(opts, ctx, n_batches, logger):
    """The validation batches whose first image goes to TensorBoard (rank 0)."""
    if opts.sample_num <= 0 or not ctx.is_main:
        return []
    n = min(opts.sample_num, n_batches)
    if n < opts.sample_num:
        logger.warning(f"--sample_num {opts.sample_num} is more than the {n} validation "
                       f"batches; logging {n}")
    return np.random.choice(n_batches, n, replace=False)


def report_test(opts, logger, results, val_results):
    """The test figures in the log and TensorBoard, with the original's tags."""
    logger.info(StreamSegMetrics.to_str(results))
    logger.add_table("Test_Class_IoU", results["Class IoU"])
    logger.add_table("Test_Class_Acc", results["Class Acc"])
    if logger.writer is not None and "Confusion Matrix" in results:
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


def save_results(opts, logdir, results, logger, cost=None):
    json_path, csv_path = write_results(logdir, opts, results,
                                        cost=None if cost is None else cost.record())
    logger.info(f"Results written to {json_path} and {csv_path}")
    print_summary(json_path)
    if logger.writer is not None:
        logger.add_figure("Test_Class_IoU_Bars", class_iou_figure(load_results(json_path)))
