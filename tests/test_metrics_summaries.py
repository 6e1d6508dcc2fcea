"""Old / new / all summaries from per-class IoU, with the background convention."""
import math

import numpy as np
import pytest

from metrics import StreamSegMetrics
from metrics.summaries import BACKGROUND_CONVENTION, SummaryError, class_chunks, summarize_iou


def voc_15_5_step1():
    """21 classes: background 0.9, old classes 1..15 at 0.5 except class 7 absent,
    new classes 16..20 at 0.1, 0.2, 'X', 0.3, 0.4."""
    iou = {0: 0.9}
    iou.update({c: 0.5 for c in range(1, 16)})
    iou[7] = "X"
    iou.update({16: 0.1, 17: 0.2, 18: "X", 19: 0.3, 20: 0.4})
    return iou


def test_two_step_summaries():
    s = summarize_iou(voc_15_5_step1(), [16, 5])
    assert s["miou_old"] == pytest.approx((0.9 + 14 * 0.5) / 15)
    assert s["miou_old_no_bg"] == pytest.approx(0.5)
    assert s["miou_new"] == pytest.approx(0.25)
    assert s["miou_all"] == pytest.approx((0.9 + 14 * 0.5 + 1.0) / 19)
    assert s["miou_per_step"] == pytest.approx([(0.9 + 7) / 15, 0.25])
    assert s["miou_per_step_no_bg"] == pytest.approx([0.5, 0.25])
    assert s["background_convention"] == BACKGROUND_CONVENTION
    assert "background" in BACKGROUND_CONVENTION and "miou_old_no_bg" in BACKGROUND_CONVENTION


def test_step_zero_has_no_old_classes():
    iou = {0: 0.8, 1: 0.4, 2: "X", 3: 0.6}
    s = summarize_iou(iou, [4])
    assert s["miou_old"] is None and s["miou_old_no_bg"] is None
    assert s["miou_new"] == pytest.approx(0.6)
    assert s["miou_all"] == pytest.approx(0.6)
    assert s["miou_per_step"] == pytest.approx([0.6])
    assert s["miou_per_step_no_bg"] == pytest.approx([0.5])


def test_three_steps_and_absent_background_as_in_ade():
    # ADE: channel 0 never appears in the ground truth
    iou = ["X", 0.2, 0.4, 0.6, None, 0.8]
    s = summarize_iou(iou, [3, 2, 1])
    assert s["miou_old"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert s["miou_old_no_bg"] == s["miou_old"]
    assert s["miou_new"] == pytest.approx(0.8)
    assert s["miou_per_step"] == pytest.approx([0.3, 0.6, 0.8])
    assert s["miou_all"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.8) / 4)


def test_a_chunk_without_present_class_gives_none():
    s = summarize_iou({"0": 0.5, "1": 0.7, "2": "X", "3": float("nan")}, [2, 2])
    assert s["miou_new"] is None
    assert s["miou_per_step"][1] is None
    assert s["miou_old"] == pytest.approx(0.6)


def test_chunks_and_bad_input():
    assert class_chunks([16, 5]) == [range(0, 16), range(16, 21)]
    with pytest.raises(SummaryError, match="positive class count"):
        class_chunks([16, 0])
    with pytest.raises(SummaryError, match="outside"):
        summarize_iou({0: 0.5, 21: 0.3}, [16, 5])


def test_all_matches_the_metrics_mean_iou():
    matrix = np.array([[5, 1, 0, 0, 0], [0, 3, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 2, 1],
                       [0, 0, 0, 0, 4]])
    labels, preds = [], []
    for i in range(5):
        for j in range(5):
            labels += [i] * matrix[i, j]
            preds += [j] * matrix[i, j]
    metrics = StreamSegMetrics(5)
    metrics.update(np.array(labels)[None, None], np.array(preds)[None, None])
    results = metrics.get_results(figure=False)
    s = summarize_iou(results["Class IoU"], [3, 2])
    assert s["miou_all"] == pytest.approx(results["Mean IoU"], abs=1e-12)
    ious = results["Class IoU"]
    assert s["miou_old"] == pytest.approx((ious[0] + ious[1]) / 2)
    assert s["miou_new"] == pytest.approx((ious[3] + ious[4]) / 2)
    assert not math.isnan(s["miou_old_no_bg"])
