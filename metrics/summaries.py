"""Old / new / all summaries of an incremental step, from the per-class IoU of the metrics.

Class indices are the remapped ones: the classes of step 0 (background = channel 0 first),
then those of step 1, and so on, in blocks of ``classes_per_step`` (e.g. [16, 5] at step 1 of
VOC 15-5). Absent classes (no ground-truth pixel: ``'X'``, None or NaN) count in no mean."""
import math
from collections.abc import Mapping

from utils.errors import UserError

__all__ = ["BACKGROUND_CONVENTION", "SummaryError", "class_chunks", "summarize_iou"]

BACKGROUND_CONVENTION = (
    "miou_old averages the classes of all previous steps with the background (channel 0) "
    "included; miou_old_no_bg is the same without channel 0. miou_new averages the classes "
    "added at this step (at step 0: all of step 0's classes, background included; miou_old "
    "is then null). miou_all averages every class seen so far, background included (the "
    "metrics' Mean IoU). miou_per_step has one mean per step's class block, block 0 with "
    "the background; miou_per_step_no_bg is the same with block 0 without it. Classes "
    "absent from the ground truth (e.g. ADE channel 0) count in no mean; a mean over no "
    "present class is null.")


class SummaryError(UserError, ValueError):
    """Per-class values and class counts per step do not fit together."""


def class_chunks(classes_per_step):
    """The remapped class indices of each step, e.g. [16, 5] -> [range(0, 16), range(16, 21)]."""
    counts = list(classes_per_step)
    if not counts or any(int(c) != c or c < 1 for c in counts):
        raise SummaryError(f"classes_per_step must list one positive class count per step, "
                           f"got {counts!r}")
    chunks, start = [], 0
    for c in counts:
        chunks.append(range(start, start + int(c)))
        start += int(c)
    return chunks


def _present_values(class_iou, n_total):
    """{class index: float} of the classes present in the ground truth."""
    items = class_iou.items() if isinstance(class_iou, Mapping) else enumerate(class_iou)
    values = {}
    for c, v in items:
        c = int(c)
        if not 0 <= c < n_total:
            raise SummaryError(f"class {c} is outside the {n_total} classes of "
                               f"classes_per_step; pass the class counts of the evaluated step")
        if v is None or isinstance(v, str):
            continue                      # 'X': absent from the ground truth
        v = float(v)
        if not math.isnan(v):
            values[c] = v
    return values


def _mean(values, classes):
    picked = [values[c] for c in classes if c in values]
    return math.fsum(picked) / len(picked) if picked else None


def summarize_iou(class_iou, classes_per_step):
    """The paper's summaries for the step ``len(classes_per_step) - 1``.

    ``class_iou``: {class index (int or digit string): IoU, 'X' or None} or a sequence indexed
    by class. Returns ``miou_old``, ``miou_old_no_bg``, ``miou_new``, ``miou_all``,
    ``miou_per_step``, ``miou_per_step_no_bg`` (None where no class is present) and
    ``background_convention``."""
    chunks = class_chunks(classes_per_step)
    n_total = chunks[-1].stop
    values = _present_values(class_iou, n_total)
    old = [c for chunk in chunks[:-1] for c in chunk]
    per_step = [_mean(values, chunk) for chunk in chunks]
    per_step_no_bg = [_mean(values, [c for c in chunk if c != 0]) for chunk in chunks]
    return {
        "miou_old": _mean(values, old) if old else None,
        "miou_old_no_bg": _mean(values, [c for c in old if c != 0]) if old else None,
        "miou_new": per_step[-1],
        "miou_all": _mean(values, range(n_total)),
        "miou_per_step": per_step,
        "miou_per_step_no_bg": per_step_no_bg,
        "background_convention": BACKGROUND_CONVENTION,
    }
