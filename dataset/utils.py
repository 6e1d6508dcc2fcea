"""Image selection for an incremental step (``filter_images``) and the mask scan behind it.

The scan reads only the masks (not the images), asks PIL for each mask's histogram, and can
run in worker processes. Its result, one row of "value present" flags per mask, is kept in
memory for the rest of the process, so the train, validation and test sets of several steps
need one scan per split.
"""
import logging
import multiprocessing
import os
from collections import OrderedDict

import numpy as np
from tqdm import tqdm

from .io import PRESENCE_COLUMNS, mask_presence

log = logging.getLogger(__name__)

_CHUNK = 32          # masks per task sent to a worker
_MEMO_SPLITS = 4     # scans kept in memory
_memo = OrderedDict()
_reported = set()    # splits whose unknown mask values were already reported


def _scan_chunk(paths):
    return np.stack([mask_presence(p) for p in paths]) if paths else \
        np.zeros((0, PRESENCE_COLUMNS), dtype=bool)


def _signature(paths):
    """Size and modification time of every mask: a rescan happens if any file changed."""
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append((st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append(None)
    return tuple(sig)


def scan_masks(paths, num_workers=0, progress=True, desc="scanning masks"):
    """(len(paths), 257) bool array: row i flags the raw values present in mask i
    (column 256: any value above 255)."""
    paths = list(paths)
    key = tuple(paths)
    signature = _signature(paths)
    if key in _memo and _memo[key][0] == signature:
        _memo.move_to_end(key)
        return _memo[key][1]
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    rows = []
    with tqdm(total=len(paths), desc=desc, unit="mask", disable=not progress,
              mininterval=1.0) as bar:
        workers = min(num_workers, len(chunks))
        if workers <= 1:
            for chunk in chunks:
                rows.append(_scan_chunk(chunk))
                bar.update(len(chunk))
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for block in pool.imap(_scan_chunk, chunks):
                    rows.append(block)
                    bar.update(len(block))
    presence = np.concatenate(rows) if rows else np.zeros((0, PRESENCE_COLUMNS), bool)
    _memo[key] = (signature, presence)
    while len(_memo) > _MEMO_SPLITS:
        _memo.popitem(last=False)
    return presence


def select_indices(presence, labels, labels_old=None, overlap=True):
    """Indices (increasing) of the masks kept for a step, from their presence rows.

    overlapped: the mask holds a current label. disjoint: it also holds nothing outside
    old labels, current labels, 0 and 255.
    """
    labels = [lab for lab in labels if lab != 0]
    labels_old = [lab for lab in (labels_old or []) if lab != 0]
    current = np.zeros(PRESENCE_COLUMNS, dtype=bool)
    current[[lab for lab in labels if 0 <= lab < 256]] = True
    keep = (presence & current).any(axis=1)
    if not overlap:
        allowed = np.zeros(PRESENCE_COLUMNS, dtype=bool)
        allowed[[lab for lab in labels + labels_old + [0, 255] if 0 <= lab < 256]] = True
        keep &= ~(presence & ~allowed).any(axis=1)
    return np.flatnonzero(keep).tolist()


def report_unknown_values(presence, known_labels, mask_paths, split_name):
    """Log once how many masks hold values outside the dataset's labels (and 255)."""
    known = np.zeros(PRESENCE_COLUMNS, dtype=bool)
    known[list(known_labels) + [255]] = True
    odd = presence & ~known
    rows = np.flatnonzero(odd.any(axis=1))
    if len(rows) == 0:
        return 0
    first = rows[0]
    value = int(np.flatnonzero(odd[first])[0])
    value_text = "a value above 255" if value == 256 else f"value {value}"
    log.warning("%d of %d masks of %s hold values outside the dataset's labels (first: %s in "
                "%s); they are treated as unknown classes: disjoint selection skips those "
                "images and their pixels take the masking value", len(rows), len(presence),
                split_name, value_text, mask_paths[first])
    return len(rows)


def filter_images(dataset, labels, labels_old=None, overlap=True, num_workers=0,
                  progress=True):
    """Indices of the images of ``dataset`` (a split reader with ``images``: (image, mask)
    path pairs) kept for a step with current ``labels`` and previous ``labels_old``."""
    mask_paths = [mask for _, mask in dataset.images]
    name = getattr(dataset, "split_name", "the split")
    presence = scan_masks(mask_paths, num_workers=num_workers, progress=progress,
                          desc=f"scanning masks of {name}")
    known = getattr(dataset, "known_labels", None)
    key = hash(tuple(mask_paths))
    if known is not None and key not in _reported:
        _reported.add(key)
        report_unknown_values(presence, known, mask_paths, name)
    return select_indices(presence, labels, labels_old, overlap)
