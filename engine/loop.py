"""The epoch loop of a step (docs/behaviour.md §10.2): train, validate every
``--val_interval`` epochs, write the step checkpoint after each validation (and every
``--ckpt_interval`` epochs, for resuming) and once more after the last epoch, after the
method's ``after_step`` hooks (and the memory they keep, written beside it first)."""
import os

from metrics import StreamSegMetrics
from train import NonFiniteLossError, format_seconds
from utils import distributed
from utils.checkpoint import atomic_torch_save, build_checkpoint, cuda_rng_state, sha256_of
from utils.colormap import colormap, sample_panel
from utils.eta import sequence_left
from utils.events import finite_or_none, peak_memory

from . import build
from .evaluate import evaluate


def memory_path(ckpt_path):
    """Where a step's kept memory (``memory_state`` of its parts) is: beside its checkpoint."""
    return os.path.splitext(ckpt_path)[0] + ".memory.pth"


def after_step_ran(ckpt):
    """Whether a checkpoint was written after its step's ``after_step`` hooks."""
    return bool((ckpt.get("resume_state") or {}).get("after_step"))


def train_epochs(opts, ctx, logger, events, trainer, models, data, ckpt_path, meta, *,
                 start_epoch=0, best_score=0.0, val_results=None, sample_ids=(),
                 resume_path=None, after_step_done=False, cost=None):
    """Epochs ``start_epoch`` .. ``opts.epochs - 1``, then the method's ``after_step``
    (unless ``after_step_done`` and no epoch was left); returns the last validation's
    per-class results (for the test phase's table)."""
    val_metrics = StreamSegMetrics(data.n_classes)
    optimizer = models.optimizer

    def save(epoch, score, note=None, final=False):
        """Rank 0 writes the checkpoint (with every process's CUDA RNG state); a failure
        there stops every process. ``note``: the log line's reason (None: no line, the file
        is written again at once). The final one records that ``after_step`` ran, and the
        SHA-256 of the memory written before it."""
        cuda_rng = distributed.all_gather_object(cuda_rng_state(ctx.device))

        def write():
            step_meta = meta
            if final and kept is not None:
                atomic_torch_save(kept, memory_path(ckpt_path))
                step_meta = dict(meta, memory_sha256=sha256_of(memory_path(ckpt_path)))
            ckpt = build_checkpoint(
                epoch=epoch, model=models.model, optimizer=optimizer,
                scheduler=models.scheduler, best_score=score, trainer=trainer, meta=step_meta,
                val_results=val_results, cuda_rng_by_rank=cuda_rng)
            if final:
                ckpt["resume_state"]["after_step"] = True
            atomic_torch_save(ckpt, ckpt_path)
            if note is not None:
                logger.info(f"[!] Checkpoint saved: {ckpt_path} ({note})")
        distributed.on_main(write)

    kept = None     # what the parts keep for the next step (memory_state), at the end

    # the last good checkpoint: the file resumed from until this run writes its own
    last_saved = (resume_path, start_epoch - 1) if start_epoch > 0 else None
    trained_s = 0.0
    for epoch in range(start_epoch, opts.epochs):
        lr = optimizer.param_groups[0]["lr"]
        logger.info(f"=====> epoch {epoch + 1} of {opts.epochs}, lr = {lr:.6f}")
        try:
            result = trainer.train(epoch, optimizer, data.train_loader,
                                   scheduler=models.scheduler, print_int=opts.print_interval,
                                   logger=logger)
        except NonFiniteLossError as e:
            last = (f"last good checkpoint: {last_saved[0]} (after epoch {last_saved[1] + 1})"
                    if last_saved is not None else "no checkpoint of this step was written yet")
            raise NonFiniteLossError(f"{e}; {last}") from e
        if cost is not None:
            cost.add_epoch(result.images, result.seconds)
        total = result.main + result.reg
        trained_s += result.seconds
        per_epoch = trained_s / (epoch + 1 - start_epoch)
        eta = format_seconds(per_epoch * (opts.epochs - epoch - 1))
        if trainer.later_share is not None:     # the later steps of the sequence: estimated
            eta += ", all steps ~" + format_seconds(per_epoch * sequence_left(
                opts.epochs - epoch - 1, opts.epochs, trainer.later_share))
        logger.info(f"end of epoch {epoch + 1} of {opts.epochs}, Average Loss={total}, "
                    f"Class Loss={result.main}, Reg Loss={result.reg} "
                    f"({result.seconds:.1f} s, "
                    f"{result.images / max(result.seconds, 1e-9):.1f} images/s, "
                    f"step ETA {eta} of training)")
        logger.add_scalar("E-Loss", total, epoch)
        logger.add_scalar("E-Loss-reg", result.reg, epoch)
        logger.add_scalar("E-Loss-cls", result.main, epoch)
        memory, kind = peak_memory(ctx.device)
        events.write("epoch", step=opts.step, epoch=epoch, seconds=round(result.seconds, 3),
                     images=result.images,
                     images_per_s=round(result.images / max(result.seconds, 1e-9), 3),
                     lr=lr, losses={k: finite_or_none(v) for k, v in result.terms.items()},
                     peak_memory_mib=round(memory, 1), memory=kind)

        save_now = False
        score = best_score
        if (epoch + 1) % opts.val_interval == 0:
            logger.info("validate on val set...")
            evaluation = evaluate(models.train_model, data.val_loader, val_metrics,
                                  sample_ids=sample_ids, **trainer.validation_settings())
            val_loss, val_score = evaluation.loss, evaluation.score
            logger.info(f"Validation, Class Loss={val_loss[0]}, Reg Loss={val_loss[1]} "
                        "(only rank 0)")
            logger.info(f"done validation, epoch {epoch + 1} of {opts.epochs}")
            logger.info(val_metrics.to_str(val_score))
            score = float(val_score["Mean IoU"])
            val_results = {"Class IoU": val_score["Class IoU"],
                           "Class Acc": val_score["Class Acc"]}
            log_validation(logger, opts.dataset, epoch, evaluation)
            events.write("eval", split="val", step=opts.step, epoch=epoch,
                         **eval_figures(evaluation), loss=[finite_or_none(v) for v in val_loss])
            save_now = True
        if (epoch + 1) % opts.ckpt_interval == 0:
            save_now = True
        if save_now:
            last = epoch + 1 == opts.epochs   # written again just below: logged once, there
            save(epoch, score, None if last else f"after epoch {epoch + 1} of {opts.epochs}")
            last_saved = (ckpt_path, epoch)
    if not (after_step_done and start_epoch >= opts.epochs):
        trainer.method.after_step(build.step_state(opts, ctx, models.model, models.model_old,
                                                   data, logger))
    kept = trainer.method.memory_state()
    save(opts.epochs, best_score, "step finished", final=True)
    trainer.log_skips(logger)
    distributed.barrier()
    return val_results


def eval_figures(evaluation):
    """The figures of an evaluation pass for ``events.jsonl``."""
    score = evaluation.score
    return {"seconds": round(evaluation.seconds, 3), "images": evaluation.images,
            "images_per_s": round(evaluation.images / max(evaluation.seconds, 1e-9), 3),
            "mean_iou": finite_or_none(score["Mean IoU"]),
            "overall_acc": finite_or_none(score["Overall Acc"]),
            "mean_acc": finite_or_none(score["Mean Acc"])}


def log_validation(logger, dataset, epoch, evaluation):
    val_loss, val_score = evaluation.loss, evaluation.score
    logger.add_scalar("V-Loss", val_loss[0] + val_loss[1], epoch)
    logger.add_scalar("V-Loss-reg", val_loss[1], epoch)
    logger.add_scalar("V-Loss-cls", val_loss[0], epoch)
    logger.add_scalar("Val_Overall_Acc", val_score["Overall Acc"], epoch)
    logger.add_scalar("Val_MeanIoU", val_score["Mean IoU"], epoch)
    logger.add_table("Val_Class_IoU", val_score["Class IoU"], epoch)
    logger.add_table("Val_Acc_IoU", val_score["Class Acc"], epoch)
    cmap = colormap(dataset)
    for k, (img, target, lbl) in enumerate(evaluation.samples):
        logger.add_image(f"Sample_{k}", sample_panel(img, target, lbl, cmap), epoch)
