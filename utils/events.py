"""Machine-readable run records: ``<logdir>/events.jsonl``, one JSON object per line.

Rank 0 appends a ``start`` record when a step starts training, an ``epoch`` record after
every training epoch and an ``eval`` record after every validation and test pass (``split``
``val`` or ``test``). Tools read this file; people read ``log.txt`` and TensorBoard.

Every record has ``event``, ``time`` (Unix seconds) and ``step``. ``epoch`` records: ``epoch``,
``seconds``, ``images``, ``images_per_s``, ``lr``, ``losses`` (mean per iteration by term:
``main``, the method's terms by name, ``reg`` for a penalty), ``peak_memory_mib`` and
``memory`` (``cuda``: peak allocated on the GPU since the previous epoch record; ``rss``:
peak resident size of the process since it started). ``eval`` records: ``split``, ``epoch``
(None for the test), ``seconds``, ``images``, ``images_per_s``, ``mean_iou``,
``overall_acc``, ``mean_acc``, and for validation ``loss``."""
import json
import os
import resource
import sys
import time

import torch

EVENTS_NAME = "events.jsonl"


def events_path(logdir):
    return os.path.join(logdir, EVENTS_NAME)


class EventLog:
    """Appends records to ``<logdir>/events.jsonl`` (only where ``enabled``: rank 0)."""

    def __init__(self, logdir, enabled=True):
        self.path = events_path(logdir)
        self.enabled = enabled

    def write(self, event, **fields):
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, allow_nan=False, default=_plain) + "\n"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # one write of a whole line in append mode: a reader never sees half a record
        # unless the process dies in the middle of it (read_events skips such a line)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_events(logdir_or_path, event=None):
    """The records of a run (a log dir or the file itself), optionally of one ``event``;
    an unfinished last line is skipped."""
    path = logdir_or_path
    if os.path.isdir(path):
        path = events_path(path)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is None or record.get("event") == event:
                records.append(record)
    return records


def peak_memory(device):
    """(MiB, kind): the peak GPU memory allocated on CUDA since the last reading (the
    counter is reset here), else the process's peak RSS (which cannot be reset)."""
    if device.type == "cuda":
        mib = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        return mib, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return (rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10), "rss"


def finite_or_none(value):
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None
