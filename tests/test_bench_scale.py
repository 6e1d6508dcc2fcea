"""bench/bench_scale.py: the runs it plans (one factor at a time around the base), how it
reads the epoch time from run.py's records (events.jsonl), and a tiny end-to-end run with 1
and 2 gloo processes under torchrun."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_scale  # noqa: E402


def test_runs_change_one_factor_at_a_time_base_first():
    runs = bench_scale.plan_runs([16, 32, 64], [64, 128], [1, 2], 32, 128)
    assert runs[0] == (32, 128, 1)
    assert runs == [(32, 128, 1), (16, 128, 1), (64, 128, 1), (32, 64, 1), (32, 128, 2)]


def test_epoch_time_and_training_set_come_from_the_run_records():
    records = [{"event": "start", "step": 0, "train_images": 62},
               {"event": "epoch", "step": 0, "epoch": 0, "seconds": 12.3}]
    assert bench_scale.epoch_seconds(records) == (12.3, 62)
    assert bench_scale.epoch_seconds([]) == (None, None)


def test_command_launches_run_py_through_torchrun():
    args = bench_scale.get_parser().parse_args(["--device", "cpu"])
    cmd = bench_scale.run_command(args, "/d", "/w", "n8-c32-p2", 32, 2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5].endswith("run.py")
    def value(option):
        return cmd[cmd.index(option) + 1]
    assert value("--epochs") == "1" and value("--crop_size") == "32"
    assert value("--task") == "offline" and value("--logdir") == "/w/logs"
    assert "--no_pretrained" in cmd


def test_repeats_keep_the_fastest_epoch_of_each_configuration(tmp_path, monkeypatch, capsys):
    epochs = iter([5.0, 3.0, 4.0, 8.0, 6.0, 7.0])
    made = []

    def fake_run(args, data_root, workdir, images, crop, procs, threads):
        made.append(workdir)
        t = next(epochs)
        return {"case": f"n{images}-c{crop}-p{procs}", "images": images, "crop": crop,
                "procs": procs, "epoch_s": t, "wall_s": t + 1, "iters": 2, "s_per_iter": t / 2,
                "images_per_s": 8 / t}

    monkeypatch.setattr(bench_scale, "one_run", fake_run)
    monkeypatch.setattr("dataset.synthetic.generate", lambda *a, **k: None)
    path = tmp_path / "r.json"
    assert bench_scale.main(["--images", "8", "--crops", "32", "--procs", "1,2", "--repeats",
                             "3", "--device", "cpu", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["procs"], r["epoch_s"], r["epoch_runs_s"]) for r in rows] == [
        (1, 3.0, [5.0, 3.0, 4.0]), (2, 6.0, [8.0, 6.0, 7.0])]
    assert rows[1]["x_base_epoch"] == pytest.approx(2.0)
    assert len(set(made)) == 6  # every run in a folder of its own


@pytest.mark.slow
@pytest.mark.distributed
def test_one_and_two_processes_report_epoch_times(tmp_path, capsys):
    path = tmp_path / "scale.json"
    code = bench_scale.main(["--images", "8", "--crops", "32", "--procs", "1,2", "--batch",
                             "2", "--device", "cpu", "--threads", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["images"], r["crop"], r["procs"]) for r in rows] == [(8, 32, 1), (8, 32, 2)]
    for r in rows:
        # the epoch is a part of the process's whole run
        assert 0 < r["epoch_s"] <= r["wall_s"] and r["train_set"] == 8 and not r.get("error")
        assert r["threads_per_proc"] == 2 // r["procs"]
        assert r["epoch_runs_s"] == [r["epoch_s"]]
    assert rows[0]["iters"] == 4 and rows[1]["iters"] == 2  # 8 images, batch 2 per process
    assert rows[0]["x_base_epoch"] == 1
    assert "n8-c32-p2" in out and "x base epoch" in out
