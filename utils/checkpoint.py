"""Checkpoint and result-file I/O: atomic writes, loads that name the file and the reason.

Every file is written to a temporary file in the same folder, flushed to disk and renamed
into place, so a crash or a full disk never leaves a truncated file where a good one was."""
import hashlib
import json
import os
import tempfile

import torch
from .errors import UserError

# mkstemp creates files readable by the owner only; give them the usual permissions
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


# every state-dict key in a checkpoint file carries the prefix of the DDP wrapper the
# original saves through
PREFIX = "module."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or belongs to another run."""


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
            os.unlink(tmp)
        except OSError:
            pass
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
