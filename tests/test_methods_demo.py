"""The demo and the method benchmark (tools/experiment.py): progress read from a run's
records (events.jsonl), a tiny demo end to end (table, plots, result files, console logs), a
rerun that trains nothing, and the benchmark's step-0 sharing between methods."""
import json

import pytest

from tools import demo
from tools import experiment as ex

TINY = dict(n_train=40, n_val=12, size=32, crop_size=32, batch_size=4, epochs0=1, epochs1=1,
            lr0=0.01, lr1=0.01)


def test_progress_is_read_from_the_run_records():
    records = [{"event": "start", "step": 0, "start_epoch": 0},
               {"event": "epoch", "step": 0, "epoch": 0},
               {"event": "eval", "step": 0, "split": "val", "epoch": 0}]
    assert ex.epochs_done(records, 0) == 1.0
    assert ex.epochs_done(records, 1) == 0.0          # another step's records do not count
    resumed = [{"event": "start", "step": 1, "start_epoch": 3},
               {"event": "epoch", "step": 1, "epoch": 3}]
    assert ex.epochs_done(resumed, 1) == 4.0


@pytest.mark.slow
def test_demo_prints_the_table_and_a_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO", TINY)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out)]) == 0
    first = capsys.readouterr().out
    for row in ("FT", "MiB"):
        assert any(line.startswith(row + " ") for line in first.splitlines()), row
    assert "| FT " in first and "| MiB " in first        # the Markdown table
    plots = [line.strip() for line in first.splitlines() if line.strip().endswith(".png")]
    assert len(plots) == 3
    for name in ("miou_steps_voc_15-5_disjoint.png", "class_iou_FT_step1.png",
                 "class_iou_MiB_step1.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    for name in ("FT", "MiB"):
        results = out / "logs" / "15-5-voc" / name / "results"
        # step 0 is the shared run's result, copied so that tables and plots have both steps
        assert json.loads((results / "step-0.json").read_text())["name"] == "step0-FT"
        step1 = json.loads((results / "step-1.json").read_text())
        assert step1["method"] == name
        assert step1["opts"]["step_ckpt"].endswith("15-5-voc_step0-FT_0.pth")
        console = (out / "console" / f"{name}.txt").read_text()
        assert console.startswith(ex.command_text([]).rstrip()) and \
            "Results written" in console

    def no_training(*args, **kwargs):
        raise AssertionError("a finished step was trained again")

    monkeypatch.setattr(ex, "run_job", no_training)
    assert demo.main(["--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert "data: reused" in second and "already finished" in second
    table = first[first.index("| method"):first.index("FT forgets")]
    assert table in second


@pytest.mark.slow
def test_benchmark_shares_step0_within_a_group_only(tmp_path):
    cfg = ex.Config(out=str(tmp_path), lr1_of={"EWC": 0.001}, **TINY)
    ex.ensure_data(cfg)
    first, second = ex.plan(cfg, ["FT", "MiB", "EWC"], [7])
    assert [j.name for j in first] == ["step0-FT", "step0-EWC"]
    ex.run_jobs(first, parallel=2)
    ex.run_jobs(second, parallel=2)
    opts = {j.name: json.loads((tmp_path / "logs" / "15-5-voc" / j.name / "results" /
                                "step-1.json").read_text())["opts"] for j in second}
    assert opts["FT"]["step_ckpt"] == opts["MiB"]["step_ckpt"] != opts["EWC"]["step_ckpt"]
    assert opts["EWC"]["lr"] == 0.001 and opts["MiB"]["lr"] == 0.01
    assert all(o["random_seed"] == 7 for o in opts.values())


def test_data_made_with_other_settings_drops_what_was_trained_on_the_old_data(tmp_path):
    cfg = ex.Config(out=str(tmp_path), n_train=24, n_val=12, size=32)
    assert ex.ensure_data(cfg)
    ckpt = tmp_path / "checkpoints" / "15-5-voc_FT_1.pth"
    result = tmp_path / "logs" / "15-5-voc" / "FT" / "results" / "step-1.json"
    for f in (ckpt, result):
        f.parent.mkdir(parents=True)
        f.write_text("{}")
    assert not ex.ensure_data(cfg)  # same settings: data and runs kept
    assert ckpt.exists() and result.exists()
    other = ex.Config(out=str(tmp_path), n_train=24, n_val=12, size=32, data_seed=1)
    assert ex.ensure_data(other)  # other data: nothing may pass for finished on it
    assert not ckpt.exists() and not result.exists()
