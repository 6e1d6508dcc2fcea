"""Index lists of a step's images, cached under the file names of the original.

A list written here has a record beside it (``<list>.json``) naming what it was computed
from (data root, split, number of entries, a digest of the split, the selection rule) and a
digest of the list itself. On the next use the list is reused if the record still matches,
and recomputed (with a log line) if not. A list without a record, or whose content no longer
matches its record, was put there by the user (e.g. copied from the original project's
``data/`` folder): it is used as given, with a log line, and never overwritten.
"""
import hashlib
import io
import json
import logging
import os

import numpy as np

from utils.checkpoint import atomic_write_bytes, atomic_write_text

from .errors import IndexListError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
RECORD_FORMAT = 1


def list_digest(indices):
    """SHA-1 of the list as little-endian int64 bytes (what ``np.save`` stores)."""
    return hashlib.sha1(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def record_path(idxs_path):
    return idxs_path + RECORD_SUFFIX


def load_list(idxs_path):
    try:
        return np.load(idxs_path, allow_pickle=False).astype(np.int64).reshape(-1).tolist()
    except (OSError, ValueError) as e:
        raise IndexListError(f"cannot read the index list {idxs_path}: {e}; delete it to "
                             "have it recomputed") from None


def _load_record(idxs_path):
    path = record_path(idxs_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable record: treated as not matching


def save_list(idxs_path, indices, source):
    """Write the list (int64 .npy, as the original) and then its record, each atomically.

    The list goes first: a reader that sees the new list with the old record finds the
    digests differ and uses the list as given, which is then the right list anyway.
    """
    array = np.asarray(indices, dtype=np.int64)
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(idxs_path, buffer.getvalue())
    record = {"format": RECORD_FORMAT, "list_sha1": list_digest(array), "source": source}
    atomic_write_text(record_path(idxs_path), json.dumps(record, sort_keys=True) + "\n")


def _differences(old, new):
    keys = sorted(set(old) | set(new))
    return [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k)]


def cached_indices(idxs_path, compute, source, save=True):
    """The index list at ``idxs_path`` if it is valid for ``source``, else ``compute()``.

    ``source`` is a JSON-able dict describing the split and the selection rule. With
    ``save`` (rank 0), a computed list is written with its record; other ranks compute the
    same list and write nothing.
    """
    if idxs_path is None:
        return compute()
    if os.path.exists(idxs_path):
        indices = load_list(idxs_path)
        record = _load_record(idxs_path)
        if record is None:
            log.info("using the index list %s as given (no record beside it, e.g. copied "
                     "from the original project); it is not checked against the data",
                     idxs_path)
            return indices
        if record.get("list_sha1") != list_digest(indices):
            log.info("using the index list %s as given (it was replaced after this project "
                     "wrote it); it is not checked against the data", idxs_path)
            return indices
        if record.get("format") == RECORD_FORMAT and record.get("source") == source:
            return indices
        why = _differences(record.get("source") or {}, source)
        log.info("index list %s is stale (%s); recomputing it", idxs_path,
                 "; ".join(why) or "unknown record format")
    indices = compute()
    if save:
        save_list(idxs_path, indices, source)
    return indices
