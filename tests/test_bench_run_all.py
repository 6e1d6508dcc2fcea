"""bench/run_all.py: which rows each section measures and against which baseline, the
ratios and the summary, the printed table and the JSON file (smoke runs at tiny sizes)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run_all  # noqa: E402

import bench_train  # noqa: E402
import common  # noqa: E402


def settings(*argv):
    return run_all.settings(run_all.get_parser().parse_args(list(argv)))


def planned_train_rows(monkeypatch, s):
    """The (case, precision, size, channels_last, baseline) section_train would measure."""
    seen = []

    def record(s, section, case, arch, precision, size, channels_last, batches, baseline):
        seen.append((case, precision, size, channels_last, baseline))
        return {"section": section, "case": case}

    monkeypatch.setattr(run_all, "_iteration", record)
    run_all.section_train(s, [])
    return seen


def test_cpu_defaults_are_the_issue_configuration():
    s = settings("--device", "cpu")
    assert (s.backbone, s.size, s.batches, s.output_stride) == ("resnet101", 512, [2], 16)
    assert s.precisions == ["fp32", "bf16"] and s.only == list(run_all.SECTIONS)
    assert s.methods == list(bench_train.METHODS) and s.methods_precision == "fp32"
    q = settings("--device", "cpu", "--quick")
    assert (q.backbone, q.size, q.iters, q.warmup) == ("resnet18", 64, 1, 0)
    assert q.methods == ["FT", "MiB"]
    # FT is always measured, first: it is the methods' baseline
    assert settings("--device", "cpu", "--methods", "rw,ft,pi").methods == ["FT", "RW", "PI"]


def test_bf16_is_measured_smaller_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    s = settings("--device", "cpu")
    assert s.bf16_size == 256
    plan = planned_train_rows(monkeypatch, s)
    assert plan == [
        ("fp32", "fp32", 512, False, None),
        ("fp32 channels_last", "fp32", 512, True, "fp32"),
        ("fp32 @256", "fp32", 256, False, None),
        ("bf16 @256", "bf16", 256, False, "fp32 @256"),
        ("bf16 channels_last @256", "bf16", 256, True, "fp32 @256"),
    ]
    assert any("no native bf16" in line for line in run_all.notes(s))
    busy = run_all.notes(s, load=(1.0, 2.0 * s.threads_used + 1))[0]
    assert "at the end (above" in busy and "noisy" in busy
    assert "noisy" not in run_all.notes(s, load=(0.1, 0.2))[0]
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    plan = planned_train_rows(monkeypatch, settings("--device", "cpu"))
    assert [p[0] for p in plan] == ["fp32", "fp32 channels_last", "bf16", "bf16 channels_last"]
    assert {p[4] for p in plan[1:]} == {"fp32"}


def test_unknown_section_is_one_clear_error(capsys):
    assert run_all.main(["--only", "train,speed"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown section 'speed'" in err and "methods" in err


def test_ratios_are_time_per_image_against_the_named_base_row():
    rows = [{"section": "train", "case": "fp32", "images_per_s": 4.0, "mfu": 0.125},
            {"section": "train", "case": "bf16", "images_per_s": 8.0, "baseline": "fp32"},
            {"section": "methods", "case": "FT", "images_per_s": 2.0},
            {"section": "methods", "case": "MiB", "images_per_s": 1.6, "baseline": "FT"},
            {"section": "methods", "case": "EWC", "baseline": "FT", "error": "out of memory"},
            {"section": "eval", "case": "validate fp32", "images_per_s": 16.0,
             "baseline": "train: fp32"}]
    run_all.add_ratios(rows)
    assert rows[1]["x_base"] == pytest.approx(0.5)
    assert rows[3]["x_base"] == pytest.approx(1.25)
    assert "x_base" not in rows[4] and rows[4]["error_short"] == "out of memory"
    assert rows[5]["x_base"] == pytest.approx(0.25)
    assert rows[0]["mfu_pct"] == pytest.approx(12.5)
    s = settings("--device", "cpu", "--size", "512")
    text = "\n".join(run_all.summary(s, rows))
    assert "train bf16: 2.00x the images/s of fp32" in text
    assert "MiB step 1: 1.25x the FT iteration time" in text


def test_plain_section_alternates_the_builds_and_keeps_the_best_of_each(monkeypatch):
    times = iter([3.0, 2.0, 1.5, 2.5])  # plain, ours, plain, ours
    calls = []

    def fake(s, section, case, arch, precision, size, channels_last, batches, baseline):
        calls.append((arch, tuple(batches)))
        t = next(times)
        return {"section": section, "case": case, "seconds": t, "batch": 2,
                "images_per_s": 2 / t, "baseline": baseline}

    monkeypatch.setattr(run_all, "_iteration", fake)
    s = settings("--device", "cpu", "--plain-repeats", "2")
    rows = []
    run_all.section_plain(s, rows)
    assert calls == [("plain", (2,)), ("ours", (2,))] * 2
    assert [(r["case"], r["seconds"]) for r in rows] == [("plain PyTorch fp32", 1.5),
                                                         ("ours fp32", 2.0)]
    assert rows[0]["runs_s"] == [3.0, 1.5] and rows[1]["runs_s"] == [2.0, 2.5]
    run_all.add_ratios(rows)
    assert rows[1]["x_base"] == pytest.approx(2.0 / 1.5)
    assert settings("--device", "cpu").plain_repeats == 2
    assert settings("--device", "cpu", "--quick").plain_repeats == 1


def check_row_keys(rows, keys):
    for r in rows:
        missing = [k for k in keys if r.get(k) is None]
        assert not missing, f"{r['section']} {r['case']} lacks {missing}: {r}"


@pytest.mark.slow
def test_quick_run_prints_one_table_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    code = run_all.main(["--quick", "--device", "cpu", "--threads", "1", "--no-isolate",
                         "--only", "train,methods,eval,plain", "--precisions", "fp32",
                         "--size", "32", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    cases = [(r["section"], r["case"]) for r in rows]
    assert cases == [("train", "fp32"), ("train", "fp32 channels_last"), ("methods", "FT"),
                     ("methods", "MiB"), ("eval", "validate fp32"),
                     ("plain", "plain PyTorch fp32"), ("plain", "ours fp32")]
    check_row_keys(rows, ["images_per_s", "seconds", "peak_mib", "size", "batch"])
    check_row_keys([r for r in rows if r["section"] in ("train", "plain")],
                   ["flops_per_image", "tflops"])
    check_row_keys([r for r in rows if r.get("baseline")], ["x_base"])
    assert all(r.get("mfu") is None for r in rows)  # no CPU peak without --peak-tflops
    assert {"created", "device", "torch", "settings", "memory", "notes", "rows",
            "summary", "load_average"} <= set(doc)
    assert doc["device"]["type"] == "cpu" and doc["settings"]["backbone"] == "resnet18"
    # the printed table has a header, a rule and one line per row, in the same order
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("section "))
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    body = lines[head + 2:head + 2 + len(rows)]
    assert [line.split()[0] for line in body] == [r["section"] for r in rows]
    assert "MiB step 1:" in out and "the plain PyTorch build" in out
    assert f"results written to {path}" in out


@pytest.mark.slow
def test_data_section_and_peak_override_give_utilisation(tmp_path, capsys):
    path = tmp_path / "data.json"
    assert run_all.main(["--quick", "--device", "cpu", "--only", "data,train",
                         "--precisions", "fp32", "--size", "32", "--workers", "1",
                         "--data-images", "8", "--peak-tflops", "0.5", "--json",
                         str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    data = [r for r in rows if r["section"] == "data"]
    assert [r["case"] for r in data] == ["pipeline, 1 worker", "loader, 1 workers"]
    check_row_keys(data, ["images_per_s", "size"])
    assert data[1]["baseline"] == "pipeline, 1 worker" and data[1]["x_base"] > 0
    train = [r for r in rows if r["section"] == "train"]
    for r in train:  # measured in a fresh process each (isolation is the default)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert r["peak_source"] == "--peak-tflops"
    assert "input pipeline: the loader with 1 workers" in capsys.readouterr().out


def test_json_goes_to_bench_results_by_default():
    path = run_all.default_json_path(torch.device("cpu"))
    assert Path(path).parent == Path(run_all.ROOT) / "bench" / "results"
    assert Path(path).name.endswith("-cpu.json")
