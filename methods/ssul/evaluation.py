"""SSUL's validation and test figures (docs/behaviour.md, SSUL: evaluation).

The confusion matrix is the project's (``metrics.StreamSegMetrics``: rows ground truth,
pixels with a label outside [0, N_t) left out, so classes not seen yet are not scored, S22).
SSUL's means then run over **every** class, a class absent from ground truth and prediction
counting 0 (the project's own figures average the present classes only).
"""
import math

import numpy as np

__all__ = ["ssul_scores", "before_after_lines", "current_class_score", "is_improvement",
           "validation_interval"]

EPS = 1e-6


def ssul_scores(confusion):
    """SSUL's metric dictionary from an n x n confusion matrix (float64)."""
    m = np.asarray(confusion, dtype=np.float64)
    diag, gt, pred = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    acc = diag / (gt + EPS)
    iou = diag / (gt + pred - diag + EPS)
    freq = gt / m.sum()
    return {"Overall Acc": float(diag.sum() / m.sum()), "Mean Acc": float(acc.mean()),
            "FreqW Acc": float((freq[freq > 0] * iou[freq > 0]).sum()),
            "Mean IoU": float(iou.mean()),
            "Class IoU": {c: float(v) for c, v in enumerate(iou)},
            "Class Acc": {c: float(v) for c, v in enumerate(acc)}}


def _mean(values):
    return float(np.mean(values)) if len(values) else math.nan


def before_after_lines(scores, first_cls):
    """SSUL's test summary: mean IoU and accuracy over classes [0, first_cls) (step 0, with
    background) and [first_cls, N_t) (every later class), as SSUL prints them."""
    iou = [scores["Class IoU"][c] for c in sorted(scores["Class IoU"])]
    acc = [scores["Class Acc"][c] for c in sorted(scores["Class Acc"])]
    n = len(iou)
    before, after = f"...from 0 to {first_cls - 1} :", f"...from {first_cls} to {n - 1}"
    return [f"{before} best/test_before_mIoU : {_mean(iou[:first_cls]):.6f}",
            f"{after} best/test_after_mIoU : {_mean(iou[first_cls:]):.6f}",
            f"{before} best/test_before_acc : {_mean(acc[:first_cls]):.6f}",
            f"{after} best/test_after_acc : {_mean(acc[first_cls:]):.6f}"]


def current_class_score(class_iou, curr_idx, *, with_background=False):
    """Mean IoU of the step's classes [curr_idx[0], curr_idx[1]) (step 0: background
    included), SSUL's model-selection score. ``with_background`` appends class 0 to the mean
    (a value SSUL computes and does not use)."""
    values = [class_iou[c] for c in range(curr_idx[0], curr_idx[1])]
    if with_background:
        values.append(class_iou[0])
    return float(np.mean(values))


def is_improvement(score, best):
    """SSUL keeps a new checkpoint only for a strictly better score (best starts at -1)."""
    return score > best


def validation_interval(iterations):
    """SSUL validates every max(100, I // 100) iterations of a step (S14: a step shorter than
    100 iterations is never validated, so its untrained checkpoint is the one kept)."""
    return max(100, iterations // 100)
