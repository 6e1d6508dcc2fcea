"""DKD's prediction rule and scores (docs/behaviour.md §19.7).

Prediction: s = sigmoid(z); the first argmax of s over the class channels (the auxiliary
channel 0 ignored), background (0) where no class channel has s > 0.5 (s = 0.5 exactly does
not count).

Scores on the confusion matrix M (rows ground truth, columns prediction, labels outside
[0, num_class) skipped), x100:

    IoU_c = M_cc / (row_c + col_c - M_cc - 1e-6)      (an absent class gets -0 and counts, D13)
    Acc_c = M_cc / row_c                               (NaN when absent, counted as 0)
    old / new / overall = means over the old, new, old + new indices; harmonic = 2 o n / (o + n)
    PA = trace / sum; PA_old = sum over old of M_cc / sum over old of row_c (new alike)

Without new indices (step 0) only ``overall`` (and ``by_class``) is reported.
"""
import numpy as np
import torch

from metrics import StreamSegMetrics

__all__ = ["predict", "DKDEvaluator", "dkd_scores", "log_strings", "evaluator_layout",
           "IOU_EPS"]

IOU_EPS = 1e-6
METRIC_NAMES = ("Pixel_Accuracy", "Pixel_Accuracy_Class", "Mean_Intersection_over_Union")


def predict(logits, threshold=0.5):
    """B x C x H x W logits (channel 0 auxiliary) -> B x H x W predicted labels."""
    scores = torch.sigmoid(logits[:, 1:])
    pred = scores.argmax(dim=1) + 1
    return torch.where((scores > threshold).any(dim=1), pred, torch.zeros_like(pred))


def _harmonic(a, b):
    return 2 * a * b / (a + b)


def _summary(by_class, old, new):
    values = np.nan_to_num(by_class)
    out = {"overall": float(np.mean(values[list(old) + list(new)])), "by_class": by_class}
    if old and new:
        o, n = float(np.mean(values[list(old)])), float(np.mean(values[list(new)]))
        out.update(old=o, new=n, harmonic=_harmonic(o, n))
    return out


def dkd_scores(matrix, old, new):
    """The three result dicts DKD reports, from a confusion matrix and the old / new indices."""
    m = np.asarray(matrix, dtype=np.float64)
    old, new = list(old), list(new)
    diag, rows, cols = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    pa = {"overall": diag.sum() / m.sum() * 100}
    if old and new:
        pa["old"] = diag[old].sum() / rows[old].sum() * 100
        pa["new"] = diag[new].sum() / rows[new].sum() * 100
        pa["harmonic"] = _harmonic(pa["old"], pa["new"])
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = diag / rows * 100
        iou = diag / (rows + cols - (diag + IOU_EPS)) * 100
    return {"Pixel_Accuracy": pa, "Pixel_Accuracy_Class": _summary(acc, old, new),
            "Mean_Intersection_over_Union": _summary(iou, old, new)}


def log_strings(scores):
    """The per-metric lines DKD logs: ``<metric>_<old|new|harmonic|overall>`` as ``%.2f``."""
    return {f"{metric}_{key}": f"{scores[metric][key]:.2f}"
            for metric in METRIC_NAMES for key in ("old", "new", "harmonic", "overall")
            if key in scores[metric]}


class DKDEvaluator:
    """Accumulates images (``add_batch(gt, pred)``) and scores them as DKD does; the
    confusion matrix is the project's (``StreamSegMetrics``, float64)."""

    def __init__(self, num_class, old_classes_idx, new_classes_idx):
        self.num_class = int(num_class)
        self.old, self.new = list(old_classes_idx), list(new_classes_idx)
        self._matrix = StreamSegMetrics(self.num_class)

    def add_batch(self, gt, pred):
        self._matrix.update(gt, pred)

    @property
    def confusion_matrix(self):
        return self._matrix.confusion_matrix

    def reset(self):
        self._matrix.reset()

    def scores(self):
        return dkd_scores(self.confusion_matrix, self.old, self.new)


def evaluator_layout(task_labels, kind="test"):
    """(num_class, old indices, new indices) of DKD's evaluators for the per-step class lists
    ``task_labels`` (steps 0..t, sorted ids): validation scores [0] as old and the current
    step's classes as new; the test scores 0 and step 0's classes as old, the later ones as
    new. ``num_class`` = seen classes + 1 (class ids assumed contiguous, D15)."""
    seen = sum(len(labels) for labels in task_labels)
    if kind == "val":
        return seen + 1, [0], list(task_labels[-1])
    if kind == "test":
        return seen + 1, [0] + list(task_labels[0]), [c for ls in task_labels[1:] for c in ls]
    raise ValueError(f"kind must be 'val' or 'test', got {kind!r}")
