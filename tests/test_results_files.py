"""Per-step result files (utils/results.py): fixed keys, per-class values, summaries worked
out by hand, nulls for absent classes, atomic writes and clear errors on damaged files."""
import argparse
import csv
import json
import math
import os

import numpy as np
import pytest

import tasks
from metrics import StreamSegMetrics
from metrics.summaries import BACKGROUND_CONVENTION
from utils import results as results_mod
from utils.checkpoint import CheckpointError
from utils.results import REQUIRED_KEYS, ResultsError, load_results, write_step_results


def _strict_load(path):
    """json.load that refuses NaN / Infinity, as strict JSON readers do."""
    def refuse(name):
        raise AssertionError(f"{path} contains {name}")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def _voc_15_5_results():
    """Class c has IoU c/100 and accuracy c/50, class 3 (bird) absent from the ground truth."""
    iou = {c: c / 100 for c in range(21)}
    acc = {c: c / 50 for c in range(21)}
    iou[3] = acc[3] = "X"
    return {"Overall Acc": 0.75, "Mean Acc": 0.4, "FreqW Acc": 0.6, "Mean IoU": 0.1035,
            "Class IoU": iou, "Class Acc": acc, "Total samples": np.int64(7)}


def _write(tmp_path, results, task="15-5", dataset="voc", step=1, opts=None, **kw):
    kw.setdefault("name", "MiB")
    kw.setdefault("method", "MiB")
    kw.setdefault("seed", 42)
    return write_step_results(
        tmp_path / "results", task=task, dataset=dataset, step=step,
        opts=opts if opts is not None else {"overlap": False}, results=results,
        labels_per_step=tasks.get_task_dict(dataset, task, step), **kw)


def test_json_has_fixed_keys_per_class_values_and_hand_computed_summaries(tmp_path):
    opts = argparse.Namespace(overlap=False, lr=np.float32(0.001), steps=(0, 1),
                              weight=float("nan"), _private="hidden")
    json_path, _ = _write(tmp_path, _voc_15_5_results(), opts=opts)
    assert json_path == str(tmp_path / "results" / "step-1.json")
    doc = _strict_load(json_path)

    assert set(REQUIRED_KEYS) <= set(doc)
    assert (doc["task"], doc["dataset"], doc["step"], doc["name"], doc["method"],
            doc["seed"]) == ("15-5", "voc", 1, "MiB", "MiB", 42)
    assert doc["labels_per_step"] == [list(range(16)), list(range(16, 21))]
    assert doc["opts"] == {"overlap": False, "lr": pytest.approx(0.001), "steps": [0, 1],
                           "weight": None}
    assert doc["class_iou"]["3"] is None and doc["class_acc"]["3"] is None
    assert doc["class_iou"]["17"] == pytest.approx(0.17)
    assert doc["class_acc"]["20"] == pytest.approx(0.4)
    assert doc["class_names"]["15"] == "person" and doc["class_names"]["20"] == "tvmonitor"
    assert (doc["overall_acc"], doc["mean_acc"], doc["n_images"]) == (0.75, 0.4, 7)
    # by hand: old = classes 0..15 without the absent 3: (120 - 3) / 15 = 7.8 %
    assert doc["miou_old"] == pytest.approx(0.078)
    assert doc["miou_old_no_bg"] == pytest.approx(1.17 / 14)     # class 0 (IoU 0) dropped
    assert doc["miou_new"] == pytest.approx(0.18)                # (16+...+20) / 5
    assert doc["miou_all"] == pytest.approx(2.07 / 20)           # (210 - 3) / 20
    assert doc["miou_per_step"] == pytest.approx([0.078, 0.18])
    assert doc["background_convention"] == BACKGROUND_CONVENTION


def test_csv_has_one_row_per_class_with_label_name_step_and_empty_absent_cells(tmp_path):
    _, csv_path = _write(tmp_path, _voc_15_5_results())
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class_index", "label_id", "class_name", "step_introduced", "iou",
                             "accuracy"]
    assert len(rows) == 21
    assert rows[3]["iou"] == "" and rows[3]["accuracy"] == ""
    assert rows[16] == {"class_index": "16", "label_id": "16", "class_name": "pottedplant",
                        "step_introduced": "1", "iou": "0.16", "accuracy": "0.32"}
    assert rows[0]["step_introduced"] == "0" and rows[0]["class_name"] == "background"


def test_channels_follow_the_task_order_not_the_label_ids(tmp_path):
    # 19-1b: step 1 adds label 5 (bottle), which becomes the last channel (20)
    results = {"Class IoU": {c: 0.5 for c in range(21)}, "Class Acc": {c: 0.5 for c in range(21)},
               "Overall Acc": 0.5, "Mean Acc": 0.5, "Mean IoU": 0.5}
    results["Class IoU"][20] = 0.1
    json_path, csv_path = _write(tmp_path, results, task="19-1b")
    doc = load_results(json_path)
    assert doc["class_labels"]["20"] == 5 and doc["class_names"]["20"] == "bottle"
    assert doc["class_labels"]["5"] == 6 and doc["class_names"]["5"] == "bus"
    assert doc["miou_new"] == pytest.approx(0.1)
    with open(csv_path, newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["label_id"], last["class_name"], last["step_introduced"]) == ("5", "bottle", "1")


def test_values_match_the_metrics_object_on_real_predictions(tmp_path):
    """The file repeats StreamSegMetrics' figures, for an ADE step where class 0 is absent."""
    rng = np.random.default_rng(0)
    metrics = StreamSegMetrics(111)          # ADE 100-10, step 1: 101 + 10 channels
    truth = rng.integers(1, 111, size=(2, 16, 16))
    truth[0, :4] = 255                       # void pixels are skipped
    pred = np.where(rng.random((2, 16, 16)) < 0.6, truth, rng.integers(0, 111, (2, 16, 16)))
    pred[pred == 255] = 0
    metrics.update(truth, pred)
    res = metrics.get_results(figure=False)
    json_path, _ = _write(tmp_path, res, task="100-10", dataset="ade")
    doc = _strict_load(json_path)
    for c in range(111):
        expected = res["Class IoU"][c]
        got = doc["class_iou"][str(c)]
        assert got is None if expected == "X" else got == pytest.approx(expected)
    assert doc["class_iou"]["0"] is None               # ADE void is never evaluated
    assert doc["mean_iou"] == pytest.approx(res["Mean IoU"])
    assert doc["miou_all"] == pytest.approx(res["Mean IoU"])
    assert doc["overall_acc"] == pytest.approx(res["Overall Acc"])
    assert doc["n_images"] == 2
    present_old = [res["Class IoU"][c] for c in range(101) if res["Class IoU"][c] != "X"]
    assert doc["miou_old"] == pytest.approx(sum(present_old) / len(present_old))
    assert doc["miou_old_no_bg"] == pytest.approx(doc["miou_old"])   # class 0 absent anyway
    assert doc["class_names"]["8"] == "bed"                         # trailing space dropped


def test_step_zero_has_no_old_classes(tmp_path):
    results = {"Class IoU": {c: 0.5 for c in range(16)}, "Class Acc": {c: 0.5 for c in range(16)},
               "Overall Acc": 0.9, "Mean Acc": 0.5, "Mean IoU": 0.5}
    doc = load_results(_write(tmp_path, results, step=0)[0])
    assert doc["miou_old"] is None and doc["miou_old_no_bg"] is None
    assert doc["miou_new"] == pytest.approx(0.5) and doc["miou_per_step"] == [0.5]


def test_labels_per_step_as_list_or_dict_give_the_same_file(tmp_path):
    kw = dict(task="15-5", dataset="voc", step=1, name="n", method=None, seed=1, opts={},
              results=_voc_15_5_results())
    a = write_step_results(tmp_path / "a", labels_per_step=tasks.get_task_dict("voc", "15-5", 1),
                           **kw)[0]
    b = write_step_results(tmp_path / "b", labels_per_step=[list(range(16)),
                                                            list(range(16, 21))], **kw)[0]
    assert open(a).read() == open(b).read()


def test_metrics_sized_for_another_step_are_refused(tmp_path):
    results = {"Class IoU": {c: 0.5 for c in range(16)}, "Class Acc": {c: 0.5 for c in range(16)},
               "Overall Acc": 0.9, "Mean Acc": 0.5, "Mean IoU": 0.5}
    with pytest.raises(ResultsError, match="21 channels"):
        _write(tmp_path, results, step=1)
    assert not (tmp_path / "results" / "step-1.json").exists()


def _leftovers(folder):
    return sorted(f for f in os.listdir(folder) if f not in ("step-1.json", "step-1.csv"))


def test_writes_leave_no_temporary_file(tmp_path):
    _write(tmp_path, _voc_15_5_results())
    assert _leftovers(tmp_path / "results") == []


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_a_failed_write_keeps_the_previous_files(tmp_path, monkeypatch, broken):
    json_path, csv_path = _write(tmp_path, _voc_15_5_results())
    before = (open(json_path).read(), open(csv_path).read())
    new_results = _voc_15_5_results()
    new_results["Class IoU"] = {c: 0.99 for c in range(21)}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, broken, fail)
    with pytest.raises(CheckpointError, match="untouched"):
        _write(tmp_path, new_results)
    monkeypatch.undo()
    assert (open(json_path).read(), open(csv_path).read()) == before
    assert _leftovers(tmp_path / "results") == []


def test_a_failure_while_encoding_writes_nothing(tmp_path, monkeypatch):
    json_path, csv_path = _write(tmp_path, _voc_15_5_results())
    before = (open(json_path).read(), open(csv_path).read())

    def fail(*args, **kwargs):
        raise ValueError("cannot encode")
    monkeypatch.setattr(results_mod.json, "dumps", fail)
    with pytest.raises(ValueError, match="cannot encode"):
        _write(tmp_path, {**_voc_15_5_results(), "Overall Acc": 0.1})
    monkeypatch.undo()
    assert (open(json_path).read(), open(csv_path).read()) == before


def test_damaged_file_gives_one_line_naming_it(tmp_path):
    json_path, _ = _write(tmp_path, _voc_15_5_results())
    text = open(json_path).read()
    with open(json_path, "w") as f:
        f.write(text[: len(text) // 2])                 # a truncated file
    with pytest.raises(ResultsError) as err:
        load_results(json_path)
    message = str(err.value)
    assert json_path in message and "damaged" in message and "\n" not in message


def test_file_without_the_fixed_keys_is_refused(tmp_path):
    path = tmp_path / "step-0.json"
    path.write_text(json.dumps({"task": "15-5", "dataset": "voc"}))
    with pytest.raises(ResultsError, match="lacks the keys step, name"):
        load_results(path)
    with pytest.raises(ResultsError, match="does not exist"):
        load_results(tmp_path / "step-9.json")


def test_nan_figures_become_null(tmp_path):
    results = _voc_15_5_results()
    results["Mean IoU"] = float("nan")
    results["Class IoU"][4] = math.nan
    doc = _strict_load(_write(tmp_path, results)[0])
    assert doc["mean_iou"] is None and doc["class_iou"]["4"] is None


def test_class_iou_figure_has_a_bar_per_class_coloured_by_step(tmp_path):
    from utils.results import class_iou_figure
    doc = load_results(_write(tmp_path, _voc_15_5_results())[0])
    fig = class_iou_figure(doc)
    ax = fig.axes[0]
    bars = ax.containers[0]
    assert len(bars) == 21
    heights = [b.get_height() for b in bars]
    assert heights[17] == pytest.approx(17.0) and heights[3] == 0.0     # percent; absent = 0
    assert [t.get_text() for t in ax.texts] == ["n/a"]                   # only class 3
    assert bars[15].get_facecolor() != bars[16].get_facecolor()          # step 0 vs step 1
    assert [t.get_text() for t in ax.get_xticklabels()][16] == "pottedplant"
