"""tools/results_table.py on fabricated result files: several methods, tasks, seeds and
steps; means, sample stds, the avg column, layout (Markdown and CSV), --step, old-class
convention, plots, and one-line errors."""
import csv
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

import tasks
from tools.results_table import main, strip_seed_suffix
from utils.results import write_step_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_step(root, *, name, seed, step, blocks, dataset="voc", task="15-5", method=None,
              overlap=False, bg=None):
    """A result file whose classes of step k all have IoU ``blocks[k]`` (background: ``bg``,
    default blocks[0]; ADE's channel 0 is absent, as in real ADE runs)."""
    labels = tasks.get_task_dict(dataset, task, step)
    counts = [len(labels[s]) for s in range(step + 1)]
    iou, c = {}, 0
    for k, count in enumerate(counts):
        for _ in range(count):
            iou[c] = blocks[k]
            c += 1
    iou[0] = "X" if dataset == "ade" else (blocks[0] if bg is None else bg)
    results = {"Class IoU": iou, "Class Acc": dict(iou), "Overall Acc": 0.9, "Mean Acc": 0.5,
               "Mean IoU": 0.5, "Total samples": 4}
    folder = os.path.join(root, f"{task}-{dataset}", name, "results")
    write_step_results(folder, task=task, dataset=dataset, step=step, name=name, method=method,
                       seed=seed, opts={"overlap": overlap, "random_seed": seed},
                       labels_per_step=labels, results=results)
    return folder


@pytest.fixture
def logs(tmp_path):
    """VOC 15-5 disjoint: FT (names FT-s1, FT-s2; steps 0 and 1) and MiB (one name, seeds 1..3
    in three log folders; seed 3 lacks step 0). VOC 15-5 overlapped: MiB seed 1.
    ADE 100-50: FT, step 1 only."""
    root = tmp_path / "logs"
    for seed, (old, new) in {1: (0.10, 0.30), 2: (0.20, 0.40)}.items():
        fake_step(root, name=f"FT-s{seed}", method="FT", seed=seed, step=0, blocks=[0.70])
        fake_step(root, name=f"FT-s{seed}", method="FT", seed=seed, step=1, blocks=[old, new])
    for seed, old in {1: 0.60, 2: 0.62, 3: 0.64}.items():
        if seed != 3:
            fake_step(root / f"seed{seed}", name="MiB", method="MiB", seed=seed, step=0,
                      blocks=[0.70 + seed / 100])
        fake_step(root / f"seed{seed}", name="MiB", method="MiB", seed=seed, step=1,
                  blocks=[old, 0.30])
    fake_step(root / "ov", name="MiB", method="MiB", seed=1, step=1, blocks=[0.70, 0.40],
              overlap=True)
    fake_step(root, name="FT", method="FT", seed=1, step=1, blocks=[0.30, 0.10],
              dataset="ade", task="100-50")
    return root


def run_tool(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def markdown_cells(out):
    """{row: [cells]} and the header of the printed Markdown table."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]
    return header, {r[0]: r[1:] for r in body}


def test_markdown_layout_means_and_sample_stds(logs, capsys):
    code, out, err = run_tool([logs], capsys)
    assert code == 0
    header, rows = markdown_cells(out)
    settings = ["VOC 15-5 disjoint", "VOC 15-5 overlapped", "ADE 100-50 disjoint"]
    assert header == ["method"] + [f"{s} · {m}" for s in settings
                                   for m in ("old", "new", "all", "avg")] + ["seeds"]
    assert list(rows) == ["FT", "MiB"]              # paper order, seed suffixes stripped
    ft, mib = rows["FT"], rows["MiB"]
    # FT 15-5: old 10 and 20 -> 15.0 ± 7.1 (sample std: |20 - 10| / sqrt(2) = 7.07)
    assert ft[0:2] == ["15.0 ± 7.1", "35.0 ± 7.1"]
    # all = (16 old + 5 new) / 21: (1.6 + 1.5) / 21 and (3.2 + 2.0) / 21 -> 19.8 ± 7.1
    assert ft[2] == "19.8 ± 7.1"
    # avg = mean over steps 0, 1 of all: (0.70 + 3.1/21) / 2 = 42.4 %, (0.70 + 5.2/21) / 2 = 47.4 %
    # -> mean 44.9, sample std 5.0 / sqrt(2) = 3.5
    assert ft[3] == "44.9 ± 3.5"
    # MiB 15-5: old 60, 62, 64 -> 62.0 ± 2.0; new 30 for every seed -> std 0
    assert mib[0:2] == ["62.0 ± 2.0", "30.0 ± 0.0"]
    # avg: seed 3 has no step 0 -> seeds 1, 2 only: step-0 all 71, 72; step-1 all
    # (16*0.60 + 1.5)/21 = 52.86, (16*0.62 + 1.5)/21 = 54.38 -> 61.93, 63.19
    assert mib[3] == "62.6 ± 0.9"
    # one run: no ± ; overlapped MiB old 70, new 40, all (11.2 + 2.0)/21 = 62.9; no step 0
    assert mib[4:8] == ["70.0", "40.0", "62.9", "–"]
    # ADE FT: background absent, old 30, new 10, all (100*30 + 50*10)/150 = 23.3, no step 0
    assert ft[8:12] == ["30.0", "10.0", "23.3", "–"]
    assert mib[8:12] == ["–"] * 4 and ft[4:8] == ["–"] * 4
    assert ft[12] == "1-2" and mib[12] == "1-3"
    assert "sample std" in out and "after step 1" in out and "with the background" in out
    assert "no result for step(s) 0" in err          # the runs left out of an avg are named


def test_csv_keeps_the_layout_with_unrounded_mean_std_and_n(logs, tmp_path, capsys):
    out_csv = tmp_path / "table.csv"
    code, _, _ = run_tool([logs, "--csv", out_csv], capsys)
    assert code == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["FT", "MiB"]
    ft = rows[0]
    col = "VOC 15-5 disjoint step 1"
    assert float(ft[f"{col} old"]) == pytest.approx(15.0)
    assert float(ft[f"{col} old std"]) == pytest.approx(10 / math.sqrt(2))
    assert ft[f"{col} old n"] == "2"
    assert float(ft[f"{col} all"]) == pytest.approx(100 * 8.3 / 42)
    assert float(ft[f"{col} avg"]) == pytest.approx(100 * (1.4 + 8.3 / 21) / 4)
    mib = rows[1]
    assert mib[f"{col} avg n"] == "2" and mib[f"{col} all n"] == "3"
    assert mib["VOC 15-5 overlapped step 1 old std"] == ""          # a single run
    assert mib["ADE 100-50 disjoint step 1 old"] == "" and \
        mib["ADE 100-50 disjoint step 1 old n"] == "0"
    assert len(rows[0]) == 1 + 3 * 4 * 3


def test_markdown_file_matches_stdout(logs, tmp_path, capsys):
    out_md = tmp_path / "table.md"
    code, out, _ = run_tool([logs, "--markdown", out_md], capsys)
    assert code == 0 and out_md.read_text() == out


def test_step_option_picks_another_step(logs, capsys):
    code, out, err = run_tool([logs, "--step", "0"], capsys)
    assert code == 0
    header, rows = markdown_cells(out)
    # ADE has no step-0 file: its columns are gone, and the skipped run is named
    assert all("ADE" not in h for h in header) and "no step-0 result" in err
    # step 0: no old classes; new = all = the step-0 classes
    assert rows["FT"][0:4] == ["–", "70.0 ± 0.0", "70.0 ± 0.0", "70.0 ± 0.0"]
    assert rows["MiB"][0:4] == ["–", "71.5 ± 0.7", "71.5 ± 0.7", "71.5 ± 0.7"]
    assert "after step 0" in out


def test_step_no_run_reached_is_one_error_line(logs, capsys):
    code, out, err = run_tool([logs, "--step", "3"], capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: no run has a step-3 result") and err.count("\n") == 1


def test_unfinished_runs_need_an_explicit_step(tmp_path, capsys):
    fake_step(tmp_path, name="FT", seed=1, step=0, blocks=[0.5])
    code, _, err = run_tool([tmp_path], capsys)
    assert code == 1 and "--step N" in err and err.count("\n") == 1
    assert run_tool([tmp_path, "--step", "0"], capsys)[0] == 0


def test_old_without_background(tmp_path, capsys):
    fake_step(tmp_path, name="MiB", seed=1, step=1, blocks=[0.10, 0.50], bg=0.90)
    _, with_bg = markdown_cells(run_tool([tmp_path], capsys)[1])
    code, out, _ = run_tool([tmp_path, "--old-without-bg"], capsys)
    _, without_bg = markdown_cells(out)
    assert with_bg["MiB"][0] == "15.0"       # (0.90 + 15 * 0.10) / 16
    assert without_bg["MiB"][0] == "10.0"
    assert without_bg["MiB"][2] == with_bg["MiB"][2]   # all keeps the background
    assert "without the background" in out


def test_group_by_method(tmp_path, capsys):
    for name, old in (("MiB-lr1", 0.5), ("run7", 0.7)):
        fake_step(tmp_path / name, name=name, method="MiB", seed=1 if old == 0.5 else 2,
                  step=1, blocks=[old, 0.2])
    _, by_name = markdown_cells(run_tool([tmp_path], capsys)[1])
    assert set(by_name) == {"MiB-lr1", "run7"}
    _, by_method = markdown_cells(run_tool([tmp_path, "--group-by", "method"], capsys)[1])
    assert list(by_method) == ["MiB"] and by_method["MiB"][0] == "60.0 ± 14.1"


def test_two_runs_of_one_cell_with_the_same_seed_are_refused(tmp_path, capsys):
    for name in ("MiB-a", "MiB-b"):
        fake_step(tmp_path, name=name, method="MiB", seed=42, step=1, blocks=[0.5, 0.2])
    code, out, err = run_tool([tmp_path, "--group-by", "method"], capsys)
    assert code == 1 and "seed 42" in err and "--group-by name" in err
    assert err.count("\n") == 1


def test_the_same_folder_given_twice_counts_once(logs, capsys):
    _, once = markdown_cells(run_tool([logs], capsys)[1])
    _, twice = markdown_cells(run_tool([logs, logs / "seed1", logs / "seed1" / "15-5-voc" /
                                        "MiB" / "results" / "step-1.json"], capsys)[1])
    assert once == twice


def test_paper_task_alias_is_the_same_setting(tmp_path, capsys):
    fake_step(tmp_path / "a", name="FT", seed=1, step=1, blocks=[0.1, 0.2], task="15-5s")
    fake_step(tmp_path / "b", name="FT", seed=2, step=1, blocks=[0.3, 0.2], task="15-1")
    code, out, _ = run_tool([tmp_path, "--step", "1"], capsys)
    header, rows = markdown_cells(out)
    assert header[1] == "VOC 15-5s disjoint · old" and rows["FT"][0] == "20.0 ± 14.1"


@pytest.mark.parametrize("argv, expected", [
    (["MiB-s1", 1], "MiB"), (["MiB_seed2", 2], "MiB"), (["MiB-3", 3], "MiB"),
    (["MiB-s3", 1], "MiB-s3"), (["LwF-100", 42], "LwF-100"), (["MiB", None], "MiB")])
def test_seed_suffix_is_stripped_only_when_it_is_the_seed(argv, expected):
    assert strip_seed_suffix(*argv) == expected


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    with Image.open(path) as im:
        return head == b"\x89PNG\r\n\x1a\n" and im.size[0] > 100 and im.size[1] > 100


def test_plots_per_setting_and_per_class_bars(logs, tmp_path, capsys):
    plots = tmp_path / "plots"
    run = logs / "seed1" / "15-5-voc" / "MiB" / "results"
    code, _, err = run_tool([logs, "--plots", plots, "--run", run], capsys)
    assert code == 0
    assert sorted(os.listdir(plots)) == [
        "class_iou_MiB_step1.png", "miou_steps_ade_100-50_disjoint.png",
        "miou_steps_voc_15-5_disjoint.png", "miou_steps_voc_15-5_overlapped.png"]
    assert all(_is_png(plots / f) for f in os.listdir(plots))
    assert err.count("plot: ") == 4


def test_run_bars_alone_land_beside_the_file(logs, capsys):
    step0 = logs / "seed2" / "15-5-voc" / "MiB" / "results" / "step-0.json"
    code, _, _ = run_tool(["--run", step0], capsys)
    assert code == 0 and _is_png(step0.parent / "class_iou_MiB_step0.png")


def test_plot_write_failure_keeps_the_previous_png(logs, tmp_path, capsys, monkeypatch):
    plots = tmp_path / "plots"
    assert run_tool([logs / "ov", "--plots", plots], capsys)[0] == 0
    target = plots / "miou_steps_voc_15-5_overlapped.png"
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    code, _, err = run_tool([logs / "ov", "--plots", plots], capsys)
    monkeypatch.undo()
    assert code == 1 and f"no space left in {plots}" in err
    assert target.read_bytes() == before
    assert not [f for f in os.listdir(plots) if f.startswith(".tmp")]


def test_no_result_files_is_one_error_line(tmp_path, capsys):
    code, _, err = run_tool([tmp_path], capsys)
    assert code == 1 and "no results/step-<N>.json" in err and err.count("\n") == 1
    code, _, err = run_tool([tmp_path / "missing"], capsys)
    assert code == 1 and "does not exist" in err


@pytest.mark.slow    # a fresh interpreter imports torch (several seconds on a busy machine)
def test_script_reports_a_damaged_file_in_one_line(logs):
    """Run as a user would (script mode: the project must import without installation)."""
    bad = logs / "seed2" / "15-5-voc" / "MiB" / "results" / "step-1.json"
    bad.write_text(bad.read_text()[:200])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "results_table.py"),
                           str(logs)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: results file ")
    assert str(bad) in lines[0] and "damaged" in lines[0]


def test_joint_training_is_the_upper_bound_row_of_each_setting(tmp_path, capsys):
    # two methods on VOC 15-5 and 19-1, and a joint (offline) run whose classes 0..15 have
    # IoU 0.8, 16..19 0.6 and 20 0.4
    root = tmp_path / "logs"
    for name, blocks in (("FT", [0.1, 0.3]), ("MiB", [0.6, 0.3])):
        for task in ("15-5", "19-1"):
            fake_step(root, name=name, method=name, seed=1, step=1, blocks=blocks, task=task)
    labels = tasks.get_task_dict("voc", "offline", 0)
    iou = {c: 0.8 if c <= 15 else 0.6 if c <= 19 else 0.4 for c in range(21)}
    write_step_results(root / "offline-voc" / "Joint-run" / "results", task="offline",
                       dataset="voc", step=0, name="Joint-run", method="FT", seed=1,
                       opts={"overlap": False}, labels_per_step=labels,
                       results={"Class IoU": iou, "Class Acc": iou, "Overall Acc": 0.9,
                                "Mean Acc": 0.5, "Mean IoU": 0.7})
    code, out, _ = run_tool([root], capsys)
    assert code == 0
    header, rows = markdown_cells(out)
    assert list(rows) == ["FT", "MiB", "Joint"]          # the upper bound comes last
    assert not any("offline" in h for h in header)        # not a column of its own
    joint = rows["Joint"]
    col = {h: i for i, h in enumerate(header[1:])}
    # 15-5: old = classes 0..15 (0.8), new = 16..20 (4 x 0.6 + 0.4) / 5
    assert joint[col["VOC 15-5 disjoint · old"]] == "80.0"
    assert joint[col["VOC 15-5 disjoint · new"]] == f"{100 * (4 * 0.6 + 0.4) / 5:.1f}"
    # 19-1: old = 0..19, new = class 20; all is the joint run's mean over every class
    assert joint[col["VOC 19-1 disjoint · old"]] == f"{100 * (16 * 0.8 + 4 * 0.6) / 20:.1f}"
    assert joint[col["VOC 19-1 disjoint · new"]] == "40.0"
    assert joint[col["VOC 19-1 disjoint · all"]] == f"{100 * (16 * 0.8 + 4 * 0.6 + 0.4) / 21:.1f}"
    assert joint[col["VOC 19-1 disjoint · avg"]] == "–"
    assert "Joint = joint training" in out
