"""bench/device_check.py: the plan of parts and their limits, the summary, failed checks, time
limits and the budget turning into a non-zero exit, killing a torchrun-like process tree, the
bundle, the targets, and (slow) the whole CPU dry run as CI runs it."""
import json
import os
import select
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import device_check as dc  # noqa: E402

ROOT = Path(dc.ROOT)
BENCH = ["bench-train", "bench-methods", "bench-data", "bench-train-12", "bench-compile",
         "bench-iabn", "bench-swin"]


def names(parts):
    return [p.name for p in parts]


@pytest.mark.parametrize("cfg,e2e", [(dc.GPU, ["e2e-fp16", "e2e-bf16"]),
                                     (dc.DRY_RUN, ["e2e-fp32", "e2e-bf16"])])
def test_plan_has_every_part_in_priority_order_with_a_limit_each(cfg, e2e):
    parts = dc.plan(cfg)
    assert names(parts) == ["gpu-path", "env", "bundle", "data", "iabn-build", *e2e, "resume",
                            "norm", "e2e-iabn", "resume-iabn", *BENCH]
    kinds = [p.kind for p in parts]
    assert max(i for i, k in enumerate(kinds) if k == dc.CHECK) < kinds.index(dc.FIGURES)
    for i, p in enumerate(parts):
        assert 0 < p.limit_s <= cfg.budget_s, p
        assert set(p.needs) <= set(names(parts[:i])), p  # needs come earlier
    figures = [[b] for b in BENCH] if cfg.figures_alone else [BENCH[:-1], ["bench-swin"]]
    assert [names(b) for b in dc.batches(parts)] == [
        ["gpu-path", "env", "bundle", "data"], ["iabn-build"], [*e2e, "resume"], ["norm"],
        ["e2e-iabn", "resume-iabn"], *figures]
    assert [p.name for p in parts if p.background] == ["iabn-build"]


def test_the_gpu_run_is_the_issue_configuration_and_fits_a_short_device_call(tmp_path):
    cfg = dc.GPU
    assert (cfg.device, cfg.backend, cfg.backbone, cfg.crop) == ("cuda", "nccl", "resnet101", 512)
    assert cfg.precisions == ("fp16", "bf16") and cfg.cuda_arch == "9.0"
    assert cfg.iabn == "build" and not cfg.exact_resume
    assert cfg.budget_s <= 480  # one call of at most 8 minutes leaves room for a second
    assert cfg.figures_alone  # on the GPU no figure is taken beside other work
    args = dc.run_args(dc.Context(cfg, str(tmp_path), str(tmp_path), "", []), "x", "fp16",
                       "0,1")
    line = " ".join(args)
    for piece in ("--task 15-5 --step 0,1 --method MiB", "--output_stride 16 --norm_act "
                  "iabn_sync --no_pretrained --crop_size 512", "--epochs 1", "--amp fp16",
                  "--device cuda"):
        assert piece in line
    specs = {s.name: s for s in dc.bench_specs(cfg)}
    # from the memory estimate (0.8 GiB per image in fp32): no try that cannot fit 78 GiB
    assert "--batches 16,32,72" in " ".join(specs["bench-train"].invocations[0])
    assert "--precisions bf16,fp16" in " ".join(specs["bench-iabn"].invocations[0])
    assert "--batches 12" in " ".join(specs["bench-train-12"].invocations[0])
    assert [inv[inv.index("--workers") + 1] for inv in specs["bench-data"].invocations] == \
        ["8", "16"]
    assert "--compile" in specs["bench-compile"].invocations[0]
    assert "--norm_impl inplace_abn" in " ".join(specs["bench-iabn"].invocations[0])
    assert dc.DRY_RUN.compile_env == (("TORCHDYNAMO_DISABLE", "1"),)


def test_every_method_of_the_benchmark_is_timed_against_ft():
    import bench_train
    assert dc.METHODS.split(",") == list(bench_train.METHODS.values())


def test_only_adds_the_parts_needed_and_names_unknown_ones():
    parts = dc.plan(dc.GPU)
    assert names(dc.select(parts, ["bench-iabn"])) == ["bundle", "iabn-build", "norm",
                                                      "bench-iabn"]
    assert names(dc.select(parts, ["resume"])) == ["bundle", "data", "resume"]
    with pytest.raises(SystemExit, match="unknown part 'speed'.*bench-train"):
        dc.select(parts, ["speed"])


def test_summary_has_a_line_per_part_check_and_figure_and_the_result_last():
    doc = {"mode": "cuda", "seconds": 101.4, "budget_s": 420, "finished": True,
           "passed": False, "checks_total": 3, "checks_failed": 1, "failed_parts": ["resume"],
           "environment": {"gpus": [{"name": "NVIDIA H200"}]},
           "rerun": "bash bench/device_check.sh OUT --only resume",
           "comparisons": [{"text": "--compile: FT step 1 30 images/s vs 20 eager, 1.50x"}],
           "targets": [{"text": "MiB step-1 iteration <= 1.3x FT: 1.21 (met)"}],
           "parts": [
               {"name": "e2e-fp16", "status": "pass", "seconds": 60.2, "limit_s": 300,
                "note": "", "checks": [{"name": "train", "passed": True, "detail": "ok"},
                                       {"name": "test-exact", "passed": True, "detail": "same"}],
                "figures": [{"text": "run.py fp16 step 0: 27 images"}]},
               {"name": "resume", "status": "fail", "seconds": 30.0, "limit_s": 300,
                "note": "", "checks": [{"name": "continues", "passed": False,
                                        "detail": "at epoch 0"}], "figures": []},
               {"name": "bench-compile", "status": "skip", "seconds": 0, "limit_s": 0,
                "note": "out of budget (5 s left, the part may take up to 240 s)",
                "checks": [], "figures": []}]}
    assert dc.summary_lines(doc) == [
        "MiB device check (cuda, NVIDIA H200): 101 s of a 420 s budget",
        "[e2e-fp16] pass in 60 s of its 300 s limit",
        "  PASS train: ok",
        "  PASS test-exact: same",
        "  figure run.py fp16 step 0: 27 images",
        "[resume] fail in 30 s of its 300 s limit",
        "  FAIL continues: at epoch 0",
        "[bench-compile] skip in 0 s of its 0 s limit (out of budget (5 s left, the part may "
        "take up to 240 s))",
        "comparisons:",
        "  --compile: FT step 1 30 images/s vs 20 eager, 1.50x",
        "targets (figures, not checks):",
        "  MiB step-1 iteration <= 1.3x FT: 1.21 (met)",
        "rerun what failed or did not fit: bash bench/device_check.sh OUT --only resume",
        "RESULT: FAILED: 1 of 3 checks failed; parts failed or not run: resume",
    ]
    doc.update(passed=True, checks_failed=0, failed_parts=[], rerun=None, targets=[],
               comparisons=[])
    assert dc.summary_lines(doc)[-1] == "RESULT: all 3 checks passed"


def run_main(tmp_path, monkeypatch, parts, *extra):
    monkeypatch.setattr(dc, "plan", lambda cfg: parts)
    code = dc.main([str(tmp_path / "out"), "--cpu-dry-run", "--work", str(tmp_path / "w"),
                    *extra])
    doc = json.loads((tmp_path / "out" / dc.JSON_NAME).read_text())
    text = (tmp_path / "out" / dc.TEXT_NAME).read_text().splitlines()
    return code, doc, text


def passing(ctx, deadline, out):
    out.check("fine", True, "as planned")


def figures(ctx, deadline, out):
    out.figure("speed", "42 images/s")


def test_a_failed_check_makes_the_exit_code_non_zero(tmp_path, monkeypatch, capsys):
    def failing(ctx, deadline, out):
        out.check("planted", False, "a failure planted by the test")

    parts = [dc.Part("good", dc.CHECK, 30, passing), dc.Part("bad", dc.CHECK, 30, failing),
             dc.Part("figs", dc.FIGURES, 30, figures)]
    code, doc, text = run_main(tmp_path, monkeypatch, parts)
    assert code == 1 and doc["finished"] and doc["passed"] is False
    assert doc["failed_parts"] == ["bad"] and (doc["checks_total"], doc["checks_failed"]) == (2, 1)
    assert "  FAIL planted: a failure planted by the test" in text
    assert "  figure 42 images/s" in text and text[-1].startswith("RESULT: FAILED: 1 of 2")
    assert "--only bad --cpu-dry-run" in doc["rerun"]
    assert text[-1] in capsys.readouterr().out  # the summary is printed too
    assert (tmp_path / "out" / dc.LOGS_NAME).is_file()

    code, doc, text = run_main(tmp_path, monkeypatch, parts[:1] + parts[2:])
    assert code == 0 and doc["passed"] and text[-1] == "RESULT: all 1 checks passed"


def test_a_broken_figure_part_is_reported_but_does_not_fail_the_run(tmp_path, monkeypatch):
    def broken(ctx, deadline, out):
        raise KeyError("rows")

    code, doc, text = run_main(tmp_path, monkeypatch, [dc.Part("good", dc.CHECK, 30, passing),
                                                       dc.Part("figs", dc.FIGURES, 30, broken)])
    assert code == 0
    figs = doc["parts"][1]
    assert figs["status"] == "error" and "KeyError" in figs["note"] and figs["data"]["traceback"]


# a process that starts a child in a session of its own (as torchrun starts its workers),
# writes the child's pid, then waits
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Expired(dc.Deadline):
    """A part's deadline that has passed, whatever the clock says."""

    def left(self):
        return 0.0


def wait_until_ended(pid):
    """Block until the process ``pid`` (not a child of ours) has ended: its pidfd becomes
    readable then. The 600 s only turn a kill that never happens into a failure."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], 600)
    finally:
        os.close(fd)


def test_a_part_past_its_limit_is_killed_with_its_whole_process_tree(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"

    def sleepy(ctx, deadline, out):
        proc = ctx.start([sys.executable, "-c", SPAWNER, str(pid_file)], "sleepy")
        while not pid_file.is_file() or not pid_file.read_text():   # written at a fixed point
            assert proc.poll() is None
            time.sleep(0.01)
        ctx.wait(proc, Expired(1.0), "the sleeper")

    code, doc, text = run_main(tmp_path, monkeypatch, [dc.Part("slow", dc.CHECK, 30, sleepy)])
    part = doc["parts"][0]
    assert code == 1 and part["status"] == "timeout" and part["failed"]
    assert "the sleeper did not finish within" in part["note"]
    assert "  FAIL completed: the sleeper did not finish within the part's 1 s and was killed" \
        in text
    grandchild = int(pid_file.read_text())
    wait_until_ended(grandchild)        # SIGKILL is sent; the process ends moments later
    assert not alive(grandchild)


def test_a_check_that_does_not_fit_the_budget_fails_the_run(tmp_path, monkeypatch):
    code, doc, _ = run_main(tmp_path, monkeypatch, [dc.Part("late", dc.CHECK, 60, passing)],
                            "--budget", "5")
    assert code == 1 and doc["parts"][0]["status"] == "skip"
    assert doc["parts"][0]["note"].startswith("out of budget")
    assert doc["rerun"].endswith("--only late --cpu-dry-run")


def test_a_part_starts_only_when_the_budget_left_covers_its_whole_limit(tmp_path,
                                                                         monkeypatch):
    """Not with what is left of it: a figures part cut short is killed with nothing."""
    code, doc, _ = run_main(tmp_path, monkeypatch, [dc.Part("first", dc.CHECK, 30, passing),
                                                    dc.Part("figs", dc.FIGURES, 50, figures)],
                            "--budget", "40")
    first, figs = doc["parts"]
    assert first["status"] == "pass" and figs["status"] == "skip"
    assert figs["note"].startswith("out of budget") and not figs["figures"]
    assert doc["rerun"].endswith("--only figs --cpu-dry-run")


def test_each_part_is_in_the_report_on_disk_as_soon_as_it_ends(tmp_path, monkeypatch):
    """Also while the other parts of its group still run (before: after the whole group).
    The waiting part reads the file once a report was written (no polling clock); a report
    written only after the group would never come (the 600 s make that a failure)."""
    seen = {}
    written = threading.Event()
    write_report = dc.write_report

    def write_and_tell(*args, **kwargs):
        doc = write_report(*args, **kwargs)
        written.set()
        return doc

    monkeypatch.setattr(dc, "write_report", write_and_tell)

    def waits_for_the_report(ctx, deadline, out):
        if written.wait(600):
            doc = json.loads((Path(ctx.out) / dc.JSON_NAME).read_text())
            seen["parts"] = [(p["name"], [f["text"] for f in p["figures"]])
                             for p in doc["parts"]]

    run_main(tmp_path, monkeypatch, [dc.Part("figs", dc.FIGURES, 30, figures, group="g"),
                                     dc.Part("later", dc.CHECK, 30, waits_for_the_report,
                                             group="g")])
    assert seen["parts"] == [("figs", ["42 images/s"])]


def test_time_plan_names_what_would_not_start_in_the_worst_case():
    parts = [dc.Part("a", dc.CHECK, 60, passing, group="g"),
             dc.Part("b", dc.CHECK, 90, passing, group="g"),
             dc.Part("build", dc.BUILD, 300, passing, background=True),
             dc.Part("c", dc.CHECK, 100, passing), dc.Part("d", dc.FIGURES, 100, figures)]
    cfg = dc.dataclasses.replace(dc.DRY_RUN, budget_s=250)
    lines, late = dc.time_plan(cfg, parts)
    assert late == ["build", "d"]
    assert lines[0] == "     0 s  a, b (up to 90 s)"
    assert lines[2] == "    90 s  c (up to 100 s)"
    assert lines[-1].startswith("  worst case 190 s of a 250 s budget")
    _, late = dc.time_plan(dc.GPU, dc.plan(dc.GPU))
    checks = {p.name for p in dc.plan(dc.GPU) if p.kind == dc.CHECK}
    # every other check starts in the worst case
    assert checks & set(late) == {"e2e-iabn", "resume-iabn"}


@pytest.mark.parametrize("gib,ladder", [(78, "16,32,72"), (139, "32,64,136"), (8, "8")])
def test_batch_ladder_comes_from_the_memory_estimate(gib, ladder):
    assert dc.batch_ladder(gib, 0.8) == ladder


def test_a_failed_build_skips_only_what_needs_it(tmp_path, monkeypatch):
    def no_build(ctx, deadline, out):
        raise dc.PartFailed("nvcc: not found")

    parts = [dc.Part("build", dc.BUILD, 30, no_build, background=True),
             dc.Part("compare", dc.CHECK, 30, passing, needs=("build",)),
             dc.Part("good", dc.CHECK, 30, passing)]
    code, doc, _ = run_main(tmp_path, monkeypatch, parts)
    by_name = {p["name"]: p for p in doc["parts"]}
    assert code == 0
    assert by_name["build"]["status"] == "skip" and "nvcc" in by_name["build"]["note"]
    assert by_name["compare"]["status"] == "skip" and not by_name["compare"]["failed"]
    assert by_name["compare"]["note"] == "needs build" and by_name["good"]["status"] == "pass"


def fake_wheel(folder, name, version):
    """A minimal pure-Python wheel: one module with a version."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"__version__ = '{version}'\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                    "true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_bundle_wheels_install_offline_into_the_subprocesses_path(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    fake_wheel(bundle, "mibprobe", "1.0")
    ctx = dc.Context(dc.DRY_RUN, str(tmp_path), str(tmp_path / "w"), str(bundle), [])
    wheels, sdist = dc.find_bundle(str(bundle))
    assert sdist is None
    dc.install_wheels(ctx, wheels, dc.Deadline(120))
    found = ctx.probe("imports", dc.Deadline(120), "--modules", "mibprobe,no_such_module")
    assert found["mibprobe"]["version"] == "1.0"
    assert found["mibprobe"]["file"].startswith(ctx.site)
    assert "ModuleNotFoundError" in found["no_such_module"]["error"]


def test_bundle_check_names_what_is_missing_or_too_big(tmp_path):
    fake_wheel(tmp_path, "tensorboardx", "2.6.5")
    (tmp_path / "inplace-abn-1.1.0.tar.gz").write_bytes(b"x")
    problems, listing = dc.check_bundle(str(tmp_path))
    assert problems == [] and listing[-1].startswith("total 0.00 MiB")
    fake_wheel(tmp_path, "tensorboardx", "2.6.4")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(21 * 2 ** 20)
    (tmp_path / "inplace-abn-1.1.0.tar.gz").unlink()
    problems, _ = dc.check_bundle(str(tmp_path))
    assert problems == ["21.0 MiB is over the 20 MiB limit", "no inplace-abn source archive",
                        "two versions of tensorboardx (pip would refuse the install)"]
    assert dc.main(["--check-bundle", str(tmp_path)]) == 1


def test_results_compare_exactly_and_events_skip_an_unfinished_line(tmp_path):
    a = {"mean_iou": 0.5, "n_images": 10, "class_iou": {"0": 0.9, "1": 0.1, "2": None}}
    assert dc.compare_results(a, json.loads(json.dumps(a))) == []
    b = dict(a, class_iou={"0": 0.9, "1": 0.1000001, "2": None})
    assert dc.compare_results(a, b) == ["class 1 IoU 0.1 != 0.1000001"]
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "start", "start_epoch": 1}\n{"event": "epo')
    assert dc.read_events(path) == [{"event": "start", "start_epoch": 1}]
    assert dc.read_events(tmp_path / "missing.jsonl") == []


def test_comparisons_put_two_parts_side_by_side():
    rows = {"bench-methods": [{"section": "methods", "case": "FT", "images_per_s": 20.0}],
            "bench-compile": [{"section": "methods", "case": "FT", "images_per_s": 30.0}],
            "bench-train": [{"section": "train", "case": "bf16", "images_per_s": 100.0,
                             "batch": 64, "peak_mib": 40960.0}],
            "bench-iabn": [{"section": "train", "case": "bf16", "images_per_s": 110.0,
                            "batch": 96, "peak_mib": 30720.0}]}
    results = {part: {"data": {"rows": [dict(r, part=part) for r in part_rows]}}
               for part, part_rows in rows.items()}
    assert [c["text"] for c in dc.comparisons(dc.GPU, results)] == [
        "--compile: FT step 1 30 images/s vs 20 eager, 1.50x",
        "compiled norm layers, train bf16: batch 96 vs 64, 1.10x the images/s, peak 30.0 GiB "
        "vs 40.0 GiB"]
    assert dc.comparisons(dc.DRY_RUN, results)[0]["text"].endswith(
        "(compiling is off in this mode: TORCHDYNAMO_DISABLE=1)")


def test_targets_have_a_verdict_on_the_gpu_only():
    rows = [{"section": "train", "case": "bf16 channels_last", "precision": "bf16", "size": 512,
             "batch": 96, "images_per_s": 300.0, "part": "bench-train"},
            {"section": "methods", "case": "MiB", "images_per_s": 10.0, "x_base": 1.4},
            {"section": "data", "case": "loader, 16 workers", "images_per_s": 500.0}]
    results = {"bench": {"data": {"rows": rows}}}
    found = dc.targets(dc.GPU, results)
    assert [t["met"] for t in found] == [True, False, False]
    assert found[0]["text"] == ("bf16 training >= 250 images/s (bench-train: bf16 "
                                "channels_last, batch 96): 300 (met)")
    assert found[2]["value"] == pytest.approx(500 / 300)
    assert [t["met"] for t in dc.targets(dc.DRY_RUN, {"b": {"data": {"rows": [
        dict(rows[0], size=64)]}}})] == [None]


def test_the_last_line_names_the_error_not_torchruns_banner():
    out = ("INFO starting\nerror: --test takes one step; give --step N\nTraceback\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\n")
    assert dc.last_line(out) == "error: --test takes one step; give --step N"
    assert dc.last_line("x\nRuntimeError: CUDA error: out of memory\n===\n") == \
        "RuntimeError: CUDA error: out of memory"
    assert dc.last_line("") == "(no output)"


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check_and_takes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), str(out),
                           "--cpu-dry-run"], env=env, capture_output=True, text=True,
                          timeout=1500)
    doc = json.loads((out / dc.JSON_NAME).read_text())
    text = (out / dc.TEXT_NAME).read_text().splitlines()
    assert proc.returncode == 0, "\n".join(text)
    assert doc["finished"] and doc["passed"] and doc["mode"] == "cpu-dry-run"
    parts = {p["name"]: p for p in doc["parts"]}
    assert list(parts) == names(dc.plan(dc.DRY_RUN))
    checks = [c for p in doc["parts"] for c in p["checks"]]
    assert checks and all(c["passed"] for c in checks)
    assert doc["checks_total"] == len([c for p in doc["parts"] if p["kind"] == dc.CHECK
                                       for c in p["checks"]])
    iabn = parts["iabn-build"]["status"] == "pass"
    for name in ("gpu-path", "env", "bundle", "data", "e2e-fp32", "e2e-bf16", "resume"):
        assert parts[name]["status"] == "pass", parts[name]
    assert [c["name"] for c in parts["gpu-path"]["checks"]] == [
        "fp16-overflow", "penalty-skip", "resume-strides"]   # rng-fewer-gpus needs CUDA
    for name in ("e2e-iabn", "resume-iabn", "norm"):
        assert parts[name]["status"] == ("pass" if iabn else "skip"), parts[name]
    for name, check in (("e2e-fp32", "test-exact"), ("e2e-bf16", "test-exact"),
                        ("resume", "continues"), ("resume", "same-result")) + (
            (("resume-iabn", "same-result"), ("resume-iabn", "package")) if iabn else ()):
        assert check in [c["name"] for c in parts[name]["checks"]]
    if iabn:  # the sync layer also through its synchronising code, on a real gloo group
        assert "process group of gloo, 1 process" in parts["norm"]["checks"][0]["detail"]
        assert "iabn_sync train-sync: saved" in parts["norm"]["figures"][0]["text"]
    swin = parts["bench-swin"]
    assert swin["status"] == "ok" and [r["backbone"] for r in swin["data"]["backbones"]] == \
        ["resnet18", "swin_t"]
    assert swin["figures"][1]["text"].endswith("the memory per image of resnet18")
    # the figures: every run_all row measured, and the comparisons
    run_all_parts = [n for n in BENCH if n not in ("bench-iabn", "bench-swin")]
    for name in run_all_parts + (["bench-iabn"] if iabn else []):
        rows = parts[name]["data"]["rows"]
        assert parts[name]["status"] == "ok" and rows
        assert all(r.get("images_per_s") for r in rows), rows
    methods = [r["case"] for r in parts["bench-methods"]["data"]["rows"]]
    assert methods == ["FT", "LwF", "ILT", "LwF-MC", "MiB", "EWC", "PI", "RW", "PLOP",
                       "validate fp32"]
    loaders = [r for r in parts["bench-data"]["data"]["rows"] if r["case"].startswith("loader")]
    assert [r["workers"] for r in loaders] == [1, 2]
    compared = [c["name"] for c in doc["comparisons"]]
    assert compared[0] == "compile" and (len(compared) == 3) == iabn  # fp32, fp32 channels_last
    # no bf16 rows among the toy figures (emulated bf16 is 10x slower on most CPUs)
    assert [t["target"].split()[0] for t in doc["targets"]] == ["MiB", "input"]
    assert doc["rerun"] is None
    # the text: one line per check and per figure, the result last
    assert sum(line.startswith("  PASS ") for line in text) == len(checks)
    assert sum(line.startswith("  figure ") for line in text) == \
        sum(len(p["figures"]) for p in doc["parts"])
    assert text[-1] == f"RESULT: all {doc['checks_total']} checks passed"
    with tarfile.open(out / dc.LOGS_NAME) as tar:
        logs = tar.getnames()
    assert "MiB-bf16-train.log" in logs and "resume-killed.log" in logs


def test_the_cpu_dry_run_starts_every_part_even_in_the_worst_case():
    # the slow dry-run test asserts every figure; a part left out for time would make it
    # depend on the machine's speed
    _, late = dc.time_plan(dc.DRY_RUN, dc.plan(dc.DRY_RUN))
    assert late == []


def test_the_swin_part_runs_the_papers_batch_and_fails_without_a_swin_figure():
    args = " ".join(dc.GPU.swin_args)
    for piece in ("--device cuda", "--size 512", "--batch 6", "--precision fp16",
                  "--backbones resnet101,swin_b"):
        assert piece in args
    import bench_backbones
    flags = {a for a in dc.DRY_RUN.swin_args + dc.GPU.swin_args if a.startswith("--")}
    known = {o for a in bench_backbones.get_parser()._actions for o in a.option_strings}
    assert flags <= known
    rows = [{"backbone": "resnet101", "size": 512, "batch": 6, "s_per_image": 0.05,
             "peak_mib_per_image": 2000.0, "time_ratio": 1.0, "memory_ratio": 1.0},
            {"backbone": "swin_b", "size": 512, "batch": 6, "s_per_image": 0.08,
             "peak_mib_per_image": 3000.0, "time_ratio": 1.6, "memory_ratio": 1.5}]
    doc = {"argv": [], "device": "GPU", "precision": "fp16", "rows": rows}
    out = dc.Outcome()
    dc.backbone_figures(out, doc, ["resnet101", "swin_b"])
    assert [f["text"] for f in out.figures] == [
        "resnet101 (fp16, crop 512, batch 6): 0.0500 s/image, peak 2000 MiB/image",
        "swin_b (fp16, crop 512, batch 6): 0.0800 s/image, peak 3000 MiB/image; 1.60x the "
        "time and 1.50x the memory per image of resnet101"]
    rows[1] = {"backbone": "swin_b", "size": 512, "batch": 6, "oom": True,
               "error": "OutOfMemoryError: CUDA out of memory", "time_ratio": None,
               "memory_ratio": None}
    with pytest.raises(dc.PartFailed, match="no swin_b figure .*images per GPU do not fit"):
        dc.backbone_figures(dc.Outcome(), doc, ["resnet101", "swin_b"])
    with pytest.raises(dc.PartFailed, match="no swin_b figure"):
        dc.backbone_figures(dc.Outcome(), dict(doc, rows=rows[:1]), ["resnet101", "swin_b"])
