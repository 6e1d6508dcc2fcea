"""Evaluation: one function for validation and for the test phase, and the test phase itself
(docs/behaviour.md §10.6, §10.8)."""
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dataset.loader import images_and_labels
from metrics import StreamSegMetrics
from utils import distributed
from utils.checkpoint import check_checkpoint_fits, load_model_state, load_trusted
from utils.runtime import Runtime

from .build import make_network, network_classes, runtime_of, wrap_ddp

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    score: dict                  # StreamSegMetrics.get_results() (valid on rank 0)
    loss: tuple = None           # (main, other terms) per batch over all processes, or None
    samples: list = field(default_factory=list)   # (image, target, prediction) numpy arrays
    images: int = 0              # images evaluated by all processes (padding included)
    seconds: float = 0.0


def evaluate(model, loader, metrics, device, amp_dtype=None, *, channels_last=False,
             losses=None, forward_kwargs=None, sample_ids=(), progress=True, desc="validate",
             predict=None):
    """Predictions of ``model`` (eval mode, ``torch.inference_mode``, autocast to
    ``amp_dtype`` if given) on every batch of ``loader``, counted in ``metrics`` and summed
    over processes on rank 0. ``device`` is the step's ``utils.runtime.Runtime`` (its
    precision and memory format; ``amp_dtype`` and ``channels_last`` then unused) or a plain
    device with those two. ``losses(images, labels, outputs, features) -> (main, reg)``
    adds the loss figures; ``sample_ids`` are the batch indices whose first image is kept;
    ``predict(outputs)`` gives the label map (the method's rule; default argmax)."""
    ctx = distributed.context()
    runtime = device if isinstance(device, Runtime) else \
        Runtime(torch.device(device), amp_dtype, channels_last)
    device = runtime.device
    metrics.reset()
    model.eval()
    _warn_if_padded(loader, ctx)
    wanted = {int(i) for i in sample_ids}
    samples = []
    main_sum = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    images_seen = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i, item in enumerate(tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                      disable=not (progress and ctx.is_main))):
            images, labels = images_and_labels(item)
            images, labels = runtime.images(images), runtime.labels(labels)
            images_seen += images.shape[0]
            with runtime.autocast():
                outputs, features = model(images, **(forward_kwargs or {}))
                if losses is not None:
                    main, reg = losses(images, labels, outputs, features)
                    main_sum += main
                    reg_sum += reg
            prediction = outputs.argmax(dim=1) if predict is None else predict(outputs)
            metrics.update(labels, prediction)
            if i in wanted:
                samples.append((images[0].float().cpu().numpy(), labels[0].cpu().numpy(),
                                prediction[0].cpu().numpy()))
        metrics.synch(device)
        score = metrics.get_results()
        loss = None
        if losses is not None:
            both = torch.stack([main_sum, reg_sum])
            distributed.reduce_sum_to_main(both)
            denom = ctx.world_size * max(len(loader), 1)
            loss = tuple(v / denom for v in both.tolist())
    return Evaluation(score, loss, samples, images_seen * ctx.world_size,
                      time.perf_counter() - start)


def _warn_if_padded(loader, ctx):
    """Several processes evaluate a padded split: some images count twice (Q17)."""
    sampler = getattr(loader, "sampler", None)
    total = len(sampler) * ctx.world_size if sampler is not None else 0
    extra = total - len(loader.dataset) if sampler is not None else 0
    if ctx.is_main and extra > 0:
        log.warning(f"{extra} image(s) of {len(loader.dataset)} are evaluated twice: the split "
                    f"is padded to a multiple of the {ctx.world_size} processes (as the "
                    "original; a single process scores every image once)")


def test_phase(opts, ctx, classes, test_loader, n_classes, ckpt_path, logger,
               val_results=None, method=None, on_loaded=None):
    """The test phase: a fresh network (as ``method`` builds its ``final`` network) loaded
    strictly from the step's checkpoint (or ``--ckpt``), evaluated in fp32 as the original
    tests outside apex AMP, with the method's ``predict``, so ``--test`` reproduces the
    figures of the training run exactly. Returns (Evaluation, val_results recorded in the
    checkpoint). ``on_loaded()`` is called once the checkpoint is loaded."""
    ckpt = load_trusted(ckpt_path, "checkpoint")
    model = make_network(opts, classes, pretrained=False, method=method, role="final")
    check_checkpoint_fits(ckpt, ckpt_path, opts, network_classes(model), "checkpoint")
    load_model_state(model, ckpt["model_state"], strict=True, source=f"checkpoint {ckpt_path}")
    if on_loaded is not None:
        on_loaded()
    recorded = (ckpt.get("resume_state") or {}).get("val_results") or val_results
    del ckpt
    runtime = runtime_of(opts, ctx).full_precision()
    model = wrap_ddp(runtime.place(model), ctx)
    logger.info(f"Testing {ckpt_path} on {len(test_loader.dataset)} images")
    result = evaluate(model, test_loader, StreamSegMetrics(n_classes), runtime,
                      progress=not opts.no_progress,
                      desc="test", predict=method.predict if method is not None else None)
    return result, recorded
