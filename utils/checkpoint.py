"""Checkpoints: atomic file I/O, the ``module.`` key prefix, and the schema of a step
checkpoint (its entries, the record of the run that wrote it, the checks before it is used,
and what an exact resume needs).

Every file is written to a temporary file in the same folder, flushed to disk and renamed
into place, so a crash or a full disk never leaves a truncated file where a good one was.

A step checkpoint holds the original's entries (``epoch``, ``model_state`` with ``module.``
keys, ``optimizer_state``, ``scheduler_state``, ``best_score``, ``trainer_state``), so files
move both ways between the original and this project, plus ``scaler_state``, ``meta`` (format
tag, task, classes, epochs, the options' fingerprint) and ``resume_state`` (RNG states, the
trainer's full state, the last validation figures) for an exact resume."""
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections import OrderedDict

import numpy as np
import torch

from . import distributed
from .compile import unwrap
from .errors import UserError

# mkstemp creates files readable by the owner only; give them the usual permissions
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

log = logging.getLogger(__name__)


# every state-dict key in a checkpoint file carries the prefix of the DDP wrapper the
# original saves through
PREFIX = "module."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or belongs to another run."""


def _disk_full(error):
    """True when ``error`` or an exception it was raised from is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def _mib(size):
    return f"{max(size, 0) / 2 ** 20:.1f} MiB"


def _atomic_write(path, write):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e} "
                              f"(is the folder writable?)") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            written = os.path.getsize(tmp)
            os.unlink(tmp)
        except OSError:
            written = 0
        if _disk_full(e):
            # torch.save's zip writer reports a full disk as "RuntimeError: unexpected pos"
            # raised while handling the OSError: both mean the same to the user
            # the previous file of the same name is the best guess of the size (the same
            # network); else more than was written when the disk ran out
            needed = f"about {_mib(os.path.getsize(path))} (the size of the previous file)" \
                if os.path.isfile(path) else f"more than {_mib(written)}"
            raise CheckpointError(
                f"no space left in {folder} to write {os.path.basename(path)}, which needs "
                f"{needed}; {_mib(shutil.disk_usage(folder).free)} free: free some space or "
                "choose another folder, then rerun (the previous file, if any, is "
                "untouched)") from e
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {path}: {e.strerror or e}; "
                                  "the previous file, if any, is untouched") from e
        raise


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_trusted(path, what="checkpoint"):
    """``torch.load`` of a file the user named (``weights_only=False``: old checkpoints hold
    optimiser and scheduler states and plain Python objects), on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for damaged files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {what} {path}: {reason} "
                              "(truncated or not a PyTorch checkpoint?)") from e


def read_json(path, what="file"):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from e


def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def classes_in_state(model_state):
    """Classes per step of a model state dict, read from the shapes of ``cls.<k>.weight``
    (keys with or without ``module.``; empty for a body-only file)."""
    sizes = {}
    for key, value in model_state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "cls" and parts[-1] == "weight" and \
                parts[-2].isdigit():
            sizes[int(parts[-2])] = int(value.shape[0])
    return [sizes[k] for k in sorted(sizes)]


def step_checkpoint_path(checkpoint_dir, task_name, name, step):
    """The original's file name: ``<dir>/<task>-<dataset>_<name>_<step>.pth``."""
    return os.path.join(checkpoint_dir, f"{task_name}_{name}_{step}.pth")


# --- model state dicts: the module. prefix ------------------------------------------------

def strip_module_prefix(state):
    """Keys without the leading ``module.`` (keys without it are kept as they are)."""
    return OrderedDict((k[len(PREFIX):] if k.startswith(PREFIX) else k, v)
                       for k, v in state.items())


def add_module_prefix(state):
    """Keys with a leading ``module.`` (keys that have it are kept as they are)."""
    return OrderedDict((k if k.startswith(PREFIX) else PREFIX + k, v) for k, v in state.items())


def _examples(keys, limit=3):
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_state(model, state, strict=True, source="checkpoint"):
    """Load ``state`` (keys with or without ``module.``; ``num_batches_tracked`` ignored)
    into ``model`` (wrapped or not). ``strict=False`` tolerates missing and unexpected keys,
    e.g. the newest classifier when loading the previous step; the result lists them
    (``.missing_keys``, ``.unexpected_keys``). Shape mismatches are always an error."""
    target = unwrap(model)
    state = OrderedDict((k, v) for k, v in strip_module_prefix(state).items()
                        if not k.endswith("num_batches_tracked"))
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {list(v.shape)} vs model {list(own[k].shape)}"
                   for k, v in state.items()
                   if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with another shape ({_examples(wrong_shape)})")
    if strict and missing:
        problems.append(f"{len(missing)} missing ({_examples(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: keys " + "; ".join(problems)
                              + " - check --backbone, --dataset, --task and --step")
    return target.load_state_dict(state, strict=strict)


def model_state_for_checkpoint(model):
    """The model's state dict as the original writes it (every key prefixed ``module.``),
    so files move both ways between the two projects."""
    return add_module_prefix(unwrap(model).state_dict())


# --- the schema of a step checkpoint ------------------------------------------------------

CHECKPOINT_FORMAT = "mib-port/1"

# Options common to every method that change what a step trains; an interrupted run resumes,
# and a finished step is skipped, only when they match. Each method family adds its own
# (``FINGERPRINT_KEYS`` of its module, ``methods.fingerprint_keys()``).
FINGERPRINT_KEYS = (
    "task", "dataset", "step", "epochs", "batch_size", "crop_size", "lr", "momentum",
    "weight_decay", "lr_policy", "lr_power", "lr_decay_step", "lr_decay_factor", "backbone",
    "output_stride", "norm_act", "overlap", "no_mask", "fix_bn", "freeze", "random_seed",
    "cross_val", "train_void_as_ignore",
    "amp", "no_pretrained", "protocol", "class_order",
    "swin_shift_order", "swin_norm3_from_file", "head_rates_from_body", "body_lr_factor",
    "no_decay_norms",
)


def fingerprint(opts, world_size, extra_keys=()):
    """The options that shape a step's training, the method and the number of processes."""
    fp = {k: getattr(opts, k) for k in FINGERPRINT_KEYS + tuple(extra_keys)}
    fp["method"] = opts.method
    fp["world_size"] = world_size
    # the batch per optimiser step (--accumulate); not compared with older records
    fp["accumulate"] = opts.accumulate
    fp["total_batch"] = opts.batch_size * world_size * fp["accumulate"]
    return fp


def fingerprint_changes(recorded, now):
    """``option: before -> now`` for every option that differs. An option the record does
    not have (a file written before the option existed) is not compared."""
    return [f"{k}: {recorded[k]!r} -> {now[k]!r}" for k in now
            if k in recorded and recorded[k] != now[k]]


def checkpoint_meta(opts, classes, fingerprint_now):
    return {"format": CHECKPOINT_FORMAT, "task": opts.task, "dataset": opts.dataset,
            "step": opts.step, "name": opts.name, "backbone": opts.backbone,
            "output_stride": opts.output_stride, "norm_act": opts.norm_act,
            "classes": list(classes), "epochs": opts.epochs, "fingerprint": fingerprint_now}


def cuda_rng_state(device):
    """The CUDA RNG state of this process's GPU (None for a CPU process)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_rng_state(device)


def rng_states(cuda_by_rank=None):
    """The RNG states to resume with; ``cuda_by_rank``: each process's own GPU state, in
    rank order (``distributed.all_gather_object``), this process's alone when not given."""
    if cuda_by_rank is None:
        cuda_by_rank = [cuda_rng_state(distributed.context().device)]
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda_by_rank": cuda_by_rank}


def restore_rng_states(states, rank=0, world_size=1):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if not torch.cuda.is_available():
        return
    by_rank = states.get("cuda_by_rank")
    if by_rank is not None:
        if len(by_rank) != world_size:
            log.warning(f"the checkpoint holds the CUDA RNG states of {len(by_rank)} processes, "
                        f"{world_size} here: the resumed run draws other random numbers on "
                        "the GPU than an uninterrupted one would")
        if rank < len(by_rank) and by_rank[rank] is not None:
            torch.cuda.set_rng_state(by_rank[rank])
    elif states.get("cuda") is not None:      # earlier files: rank 0's states of every GPU
        saved, count = states["cuda"], torch.cuda.device_count()
        if len(saved) != count:
            log.warning(f"the checkpoint holds the CUDA RNG states of {len(saved)} GPUs, "
                        f"{count} here: only the first {min(len(saved), count)} are restored")
        for index in range(min(len(saved), count)):
            torch.cuda.set_rng_state(saved[index], index)


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


def check_resumable(ckpt, path, fingerprint_now):
    """An unfinished step continues only from a checkpoint of this project written with the
    same options."""
    meta = ckpt.get("meta")
    if meta is None or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} exists but has no record of the run that wrote it (made "
                              "by the original code?); pass --ckpt to resume from it, or "
                              "--resume never to train from scratch and replace it")
    diff = fingerprint_changes(meta["fingerprint"], fingerprint_now)
    if diff:
        raise CheckpointError(f"{path} is an unfinished run with other options "
                              f"({'; '.join(diff)}); rerun with the same options to resume it, "
                              "or with --resume never to start over and replace it")


def is_unfinished(ckpt):
    """A checkpoint written before the last epoch of its step (per-epoch resume points)."""
    meta = ckpt.get("meta") or {}
    return "epochs" in meta and ckpt.get("epoch", meta["epochs"]) < meta["epochs"]


def build_checkpoint(*, epoch, model, optimizer, scheduler, best_score, trainer, meta,
                     val_results, cuda_rng_by_rank=None):
    """A step checkpoint: the original's entries and ``module.`` names, plus what an exact
    resume needs."""
    return {
        "epoch": epoch,
        "model_state": model_state_for_checkpoint(model),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "best_score": best_score,
        "trainer_state": trainer.state_dict(),
        "scaler_state": trainer.scaler_state(),
        "meta": meta,
        "resume_state": {"rng": rng_states(cuda_rng_by_rank), "trainer": trainer.full_state(),
                         "val_results": val_results},
    }


def match_parameter_layout(optimizer):
    """Per-parameter optimiser state (momentum buffers) in its parameter's strides: loading
    keeps the saved ones, e.g. contiguous buffers from a run without channels-last, and
    CUDA's fused SGD kernel refuses buffers whose strides differ from the parameter's."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if (torch.is_tensor(value) and value.shape == p.shape
                    and value.stride() != p.stride()):
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def restore_checkpoint(ckpt, path, *, model, optimizer, scheduler, trainer):
    """Continue a step from its checkpoint: strict model load, optimiser, scheduler; the
    trainer state exactly when this project wrote the file (with the RNG states), else as
    the original resumes it. Returns (next epoch, best score, last validation results)."""
    load_model_state(model, ckpt["model_state"], strict=True, source=f"checkpoint {path}")
    optimizer.load_state_dict(ckpt["optimizer_state"])
    match_parameter_layout(optimizer)
    scheduler.load_state_dict(ckpt["scheduler_state"])
    resume = ckpt.get("resume_state")
    if resume is not None:
        trainer.load_full_state(resume["trainer"])
        ctx = distributed.context()
        restore_rng_states(resume["rng"], rank=ctx.rank, world_size=ctx.world_size)
    else:
        if ckpt.get("trainer_state"):
            trainer.load_state_dict(ckpt["trainer_state"])
        if ckpt.get("scaler_state"):
            trainer.load_scaler_state(ckpt["scaler_state"])
    return ckpt["epoch"] + 1, ckpt.get("best_score", 0.0), (resume or {}).get("val_results")
