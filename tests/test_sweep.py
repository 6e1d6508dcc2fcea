"""tools/sweep.py: the sweep file and its one-line errors, the plan (run names, step-0
sharing), the table maths on hand-written result files, the lock per run folder, the SLURM
parameters, and end to end on synthetic data: the issue's sweep (3 methods x 15-5 and 15-1
overlapped x 2 seeds) through ``run`` with a Ctrl-C in the middle, and a smaller one through
submitit's local executor with a time-limit requeue, a killed job, a failing cell and a
retry through the debug executor."""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

import tasks
from conftest import ROOT
from tools import sweep as sweep_cli
from tools.sweeps import executors, plan, spec
from utils import run_lock as lock
from utils.events import read_events
from utils.results import write_step_results

TINY = """
[options]
backbone = "resnet18"
no_pretrained = true
crop_size = 32
batch_size = 2
num_workers = 0
val_interval = 100
visualize = true

[datasets.voc]
epochs = 1
lr = [0.01, 0.001]
"""


def write_sweep(folder, text, data_root="data"):
    path = folder / "sweep.toml"
    path.write_text(f'out = "runs"\ndata_root = "{data_root}"\n' + text)
    return path


def cli(args, capsys):
    code = sweep_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def call(args):
    """``tools/sweep.py`` in this process (no second start of torch): (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep_cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# --- the sweep file ---------------------------------------------------------------------------

GOOD = 'methods = ["FT"]\n[[tasks]]\ntask = "15-5"\n'


@pytest.mark.parametrize("text, expected", [
    ("methods = [", "is not valid TOML"),
    ('method = ["FT"]\n[[tasks]]\ntask = "15-5"\n', "unknown key 'method' in the top level (did "
                                                   "you mean methods?)"),
    ('methods = ["MiBB"]\n[[tasks]]\ntask = "15-5"\n', "unknown method 'MiBB' (did you mean MiB?)"),
    ('methods = ["FT"]\n', "'tasks' is missing"),
    ('methods = ["FT", "ft"]\n[[tasks]]\ntask = "15-5"\n', "method entry FT is listed twice"),
    ('methods = ["FT"]\n[[tasks]]\ntask = "15-7"\n', "tasks[0]"),
    ('methods = ["FT"]\n[[tasks]]\ntask = "15-5"\n[[tasks]]\ntask = "15-5"\n', "listed twice"),
    ('methods = ["FT"]\n[[tasks]]\ntask = "15-5"\noverlap = "yes"\n', "overlap must be"),
    ('methods = ["FT"]\nseeds = []\n[[tasks]]\ntask = "15-5"\n', "seeds must be a non-empty"),
    ('methods = ["FT"]\nseeds = [1, 1]\n[[tasks]]\ntask = "15-5"\n', "seeds lists a value twice"),
    (GOOD + "[options]\nlossk_d = 10\n", "'lossk_d' is not a run.py option (did you mean "
                                         "loss_kd?)"),
    (GOOD + "[options]\nrandom_seed = 3\n", "'random_seed' is set by the sweep (list the seeds"),
    (GOOD + "[options]\nno_pretrained = 1\n", "no_pretrained is a flag; give true or false"),
    (GOOD + "[options]\nepochs = 0\n", "epochs must be a whole number >= 1"),
    (GOOD + '[options]\nbatch_size = "abc"\n', "run FT-15-5-s42: argument --batch_size: invalid "
                                               "int value: 'abc'"),
    (GOOD + "[options]\nbatch_size = 0\n", "--batch_size must be at least 1"),
    (GOOD + "[datasets.vox]\nepochs = 1\n", "[datasets.vox]: unknown dataset (did you mean voc?)"),
    ('methods = ["FT"]\n[[tasks]]\ndataset = "ade"\ntask = "100-50"\nclass_orders = [2]\n',
     "tasks[0]:"),
    (GOOD + "[slurm]\npartion = \"gpu\"\n", "unknown key 'partion' in [slurm] (did you mean "
                                            "partition?)"),
])
def test_sweep_file_mistakes_are_one_error_line(tmp_path, capsys, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)           # messages name the file as given: sweep.toml
    write_sweep(tmp_path, text)
    code, out, err = cli(["plan", "sweep.toml"], capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: sweep.toml") and err.count("\n") == 1
    assert expected in err, err


def test_command_line_mistakes_are_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["plan", "missing.toml"], capsys)
    assert code == 1 and err == "error: sweep file missing.toml does not exist\n"
    path = write_sweep(tmp_path, GOOD)
    for args, expected in ((["run", path, "--jobs", "0"], "--jobs must be at least 1"),
                           (["run", path, "--executor", "slurm", "--time", "10"],
                            "srun is not on PATH"),
                           (["run", path, "--executor", "slurm"], "needs a time limit")):
        code, _, err = cli(args, capsys)
        assert code == 1 and err.count("\n") == 1 and expected in err, err
    with pytest.raises(SystemExit) as e:
        sweep_cli.main(["plot", str(path)])
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: argument COMMAND")


def test_options_become_run_py_arguments():
    args = spec.option_args({"lr": [0.01, 0.001], "no_pretrained": True, "overlap_in_names": False,
                             "epochs": [30, 20], "fusion_mode": "max", "batch_size": 12})
    assert args == ["--lr", "0.01,0.001", "--no_pretrained", "--fusion-mode", "max",
                    "--batch_size", "12"]
    assert spec.epochs_per_step({"epochs": [30, 20]}, 4) == [30, 20, 20, 20]
    assert spec.epochs_per_step({}, 2) == [30, 30]


# --- the plan ---------------------------------------------------------------------------------

def names(units):
    return [u.name for u in units]


def test_plan_names_runs_and_shares_step0_per_task_and_seed(tmp_path, capsys):
    path = write_sweep(tmp_path, 'methods = ["FT", "LWF", "MiB"]\nseeds = [1, 2]\n'
                       '[[tasks]]\ntask = "15-5"\noverlap = true\n'
                       '[[tasks]]\ntask = "15-1"\noverlap = true\n' + TINY)
    p = plan.build_plan(spec.load_sweep(path))
    assert names(p.step0) == ["step0-FT-15-5-ov-s1", "step0-FT-15-5-ov-s2",
                              "step0-FT-15-1-ov-s1", "step0-FT-15-1-ov-s2"]
    assert names(p.cells)[:3] == ["FT-15-5-ov-s1", "LWF-15-5-ov-s1", "MiB-15-5-ov-s1"]
    assert len(p.cells) == 12 and p.step0_saved() == 8
    mib = p.unit("MiB-15-1-ov-s2")
    assert mib.after == "step0-FT-15-1-ov-s2" and mib.steps == [1, 2, 3, 4, 5]
    assert mib.logdir == str(tmp_path / "runs" / "logs" / "15-5s-voc" / "MiB-15-1-ov-s2")
    [first] = mib.commands      # one command: --step_ckpt applies to the first of its steps
    assert first.args[first.args.index("--step_ckpt") + 1] == str(
        tmp_path / "runs" / "checkpoints" / "15-5s-voc_step0-FT-15-1-ov-s2_0.pth")
    assert first.args[first.args.index("--step") + 1] == "1,2,3,4,5"
    assert "--overlap" in first.args and first.args[first.args.index("--lr") + 1] == "0.01,0.001"
    code, out, _ = cli(["plan", path], capsys)
    assert code == 0
    assert "3 methods x 2 settings x 2 seeds x 1 class order = 12 cells" in out
    assert "step 0: 4 trainings for 12 cells (8 saved by sharing)" in out
    assert "to run: 16 of 16 runs" in out


def test_step0_sharing_follows_the_step0_signature(tmp_path):
    path = write_sweep(tmp_path, 'methods = ["MiB", "LWF-MC", "EWC", "PI", "ILT", '
                       '{name = "MiB-kd100", method = "MiB", options = {loss_kd = 100.0, '
                       'explicit_overrides_preset = true}}, '
                       '{name = "FT-bce", method = "FT", options = {bce = true}}]\n'
                       'class_orders = [0, 3]\n[[tasks]]\ntask = "15-5"\n'
                       '[[tasks]]\ntask = "offline"\n' + TINY)
    p = plan.build_plan(spec.load_sweep(path))
    first = [u for u in p.step0 if u.name.endswith("-15-5-s42")]
    labels = [u.name.split("-15-5-")[0] for u in first]
    # MiB, ILT and the MiB variant train step 0 as FT does; LwF-MC, EWC, PI each their own;
    # an option that changes step 0 (bce) gets its own run, named with a digest of its key
    assert labels[:4] == ["step0-FT", "step0-LWF-MC", "step0-EWC", "step0-PI"]
    assert len(labels) == 5 and labels[4].startswith("step0-FT-bce-")
    assert set(first[0].shared_by) == {"MiB-15-5-s42", "ILT-15-5-s42", "MiB-kd100-15-5-s42"}
    assert p.unit("MiB-15-5-s42-o3").after == "step0-FT-15-5-s42-o3"
    assert "--class_order" in p.unit("MiB-15-5-s42-o3").commands[0].args
    offline = p.unit("MiB-offline-s42")        # one step: nothing to share
    assert offline.after is None and offline.steps == [0]
    assert p.step0_saved() == 2 * (7 - 5)


def test_the_documented_example_plans(capsys):
    """docs/sweep_example.toml (the MiB paper's tables) is a valid sweep, as docs/sweeps.md
    says: 189 cells, 105 step-0 runs."""
    code, out, err = cli(["plan", ROOT / "docs" / "sweep_example.toml"], capsys)
    assert code == 0, err
    assert "9 methods x 7 settings x 3 seeds x 1 class order = 189 cells" in out
    assert "step 0: 105 trainings for 189 cells (84 saved by sharing)" in out


# --- the table --------------------------------------------------------------------------------

def fake_result(unit, step, old, new, seed, order):
    """Result file of ``unit`` at ``step`` whose old classes (background included) have IoU
    ``old`` and the classes of the step ``new``."""
    labels = tasks.get_task_dict("voc", "15-5", step)
    n_old = sum(len(labels[s]) for s in range(step))
    n_all = n_old + len(labels[step])
    iou = {c: (old if c < n_old else new) for c in range(n_all)}
    results = {"Class IoU": iou, "Class Acc": dict(iou), "Overall Acc": 0.9, "Mean Acc": 0.5,
               "Mean IoU": 0.5, "Total samples": 4}
    write_step_results(unit.results_dir, task="15-5", dataset="voc", step=step, name=unit.name,
                       method=unit.label, seed=seed, opts={"overlap": False, "class_order": order,
                                                           "random_seed": seed},
                       labels_per_step=labels, results=results)


def test_table_maths_over_seeds_and_orders(tmp_path, capsys):
    path = write_sweep(tmp_path, 'methods = ["MiB", "FT"]\nseeds = [1, 2]\n'
                       'class_orders = [0, 5]\n[[tasks]]\ntask = "15-5"\n' + TINY)
    p = plan.build_plan(spec.load_sweep(path))
    olds = {"FT": [0.10, 0.20, 0.30, 0.40], "MiB": [0.50, 0.60, 0.55, 0.65]}
    step0_all = [0.70, 0.72, 0.74, 0.76]
    for label in ("FT", "MiB"):
        cells = [c for c in p.cells if c.label == label]
        for cell, old, all0 in zip(cells, olds[label], step0_all):
            fake_result(cell, 0, None, all0, cell.seed, cell.order)
            fake_result(cell, 1, old, 0.5, cell.seed, cell.order)
    code, out, err = cli(["table", path], capsys)
    assert code == 0, err
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in out.split("Table: cost")[0].splitlines()
            if line.startswith("| ") and "method" not in line}
    assert list(rows) == ["MiB", "FT"]               # the order of the sweep file

    def stat(values):
        return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
    for label in ("MiB", "FT"):
        alls = [(16 * o + 5 * 0.5) / 21 for o in olds[label]]
        hiou = [2 * o * 0.5 / (o + 0.5) for o in olds[label]]
        avg = [(a0 + a1) / 2 for a0, a1 in zip(step0_all, alls)]
        assert rows[label] == [stat(olds[label]), "50.0 ± 0.0", stat(alls), stat(avg),
                               stat(hiou), "4"], label
    assert rows["FT"][0] == "25.0 ± 12.9"            # old 10, 20, 30, 40: sample std
    assert "hIoU = harmonic mean of old and new" in out
    assert "with the background class" in out and "over seeds and class orders" in out
    tables = tmp_path / "runs" / "tables"
    latex = (tables / "table.tex").read_text()
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\multicolumn{5}{c}{VOC 15-5 "
                  "disjoint}", r"\textbf{57.5} $\pm$ 6.5", "hIoU"):
        assert piece in latex, piece
    csv_head = (tables / "table.csv").read_text().splitlines()[0]
    assert "VOC 15-5 disjoint step 1 hIoU std" in csv_head
    assert (tables / "miou_all_voc_15-5_disjoint.png").stat().st_size > 1000


def test_table_without_results_is_one_error_line(tmp_path, capsys):
    code, _, err = cli(["table", write_sweep(tmp_path, GOOD)], capsys)
    assert code == 1 and err.count("\n") == 1 and "has results yet; run" in err


# --- the lock ---------------------------------------------------------------------------------

def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, age=0.0, **owner):
    path = folder / lock.SWEEP_LOCK
    path.write_text(json.dumps({"token": "old", **owner}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_lock_is_exclusive_and_given_back(tmp_path):
    first, second = lock.RunLock(tmp_path), lock.RunLock(tmp_path)
    assert first.try_acquire()
    owner = json.loads((tmp_path / lock.SWEEP_LOCK).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert not second.try_acquire() and second.busy()["token"] == owner["token"]
    first.set_child(os.getpid())
    assert json.loads((tmp_path / lock.SWEEP_LOCK).read_text())["child"] == os.getpid()
    first.release()
    assert not (tmp_path / lock.SWEEP_LOCK).exists() and second.try_acquire()
    second.release()


@pytest.mark.parametrize("owner, age, stale", [
    (lambda: {"host": socket.gethostname(), "pid": dead_pid()}, 0, True),
    (lambda: {"host": socket.gethostname(), "pid": dead_pid(), "child": os.getpid()}, 0, False),
    (lambda: {"host": socket.gethostname(), "pid": os.getpid(), "start": "1"}, 0, True),  # reused
    (lambda: {"host": "elsewhere", "pid": 1}, lock.STALE_SECONDS + 5, True),
    (lambda: {"host": "elsewhere", "pid": 1}, 5, False),
])
def test_stale_locks_are_taken_over(tmp_path, owner, age, stale):
    write_lock(tmp_path, age, **owner())
    assert lock.RunLock(tmp_path).try_acquire() is stale


def test_two_contenders_for_a_stale_lock_get_it_once(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    won, start = [], threading.Barrier(6)

    def contend():
        start.wait()
        won.append(lock.RunLock(tmp_path).try_acquire())
    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 5 + [True]


# --- the SLURM path, without a cluster ----------------------------------------------------------

def test_slurm_jobs_get_partition_gpus_time_and_torchrun(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    settings = executors.ClusterSettings(partition="gpu", gpus_per_job=4, cpus_per_job=32,
                                         mem_gb=64, time=90, setup=("module load cuda",),
                                         additional={"account": "proj"})
    executor = executors.make_executor("slurm", str(tmp_path / "submitit"), settings)
    script = executor._executor._make_submission_file_text("python job.py", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --mem=64GB", "#SBATCH --account=proj",
                 "#SBATCH --ntasks-per-node=1", "module load cuda"):
        assert line in script, line
    resources = executors.job_resources("slurm", settings, None, 0)
    assert resources.threads == 8 and resources.env == {}
    assert resources.launcher() == ["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=4"]


def test_local_places_are_pinned_to_their_cores_and_gpus():
    where = executors.Placement(jobs=2, threads=2, gpus_per_job=1, gpus=["0", "1"],
                                cores=[0, 1, 2, 3])
    assert where.for_slot(1).cores == (2, 3)
    assert where.for_slot(1).env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert executors.Placement(2, 2, 0, [], [0, 1]).for_slot(0).cores == ()   # too few cores


def test_signals_stop_a_sweep_unless_ignored_by_nohup_and_sigint_is_always_heard():
    from tools.sweep import stop_on_signals
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM,
                                                      signal.SIGHUP)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a script's background job
        signal.signal(signal.SIGHUP, signal.SIG_IGN)     # nohup
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# --- end to end -------------------------------------------------------------------------------

def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_sweep(args, cwd):
    """``tools/sweep.py`` in the background (output into files: nothing blocks on a pipe),
    started as a shell script's background job is: with SIGINT ignored, which the sweep and
    the run.py it starts must not inherit (it is how they are stopped)."""
    out, err = open(cwd / "sweep.out", "w"), open(cwd / "sweep.err", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sweep.py"), *map(str, args)],
                            cwd=cwd, stdout=out, stderr=err, preexec_fn=ignore_sigint,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    return proc, out, err


def wait_for(condition, proc, what):
    """Until ``condition()`` holds, which the sweep's files show at a fixed point of its
    work; no clock: a sweep that ends first fails the test (a hang, pytest's timeout)."""
    while not condition():
        assert proc.poll() is None, f"the sweep ended before {what}"
        time.sleep(0.2)


def finished_steps(logdir):
    manifest = logdir / "manifest.json"
    if not manifest.is_file():
        return []
    return sorted(int(s) for s, e in json.loads(manifest.read_text())["steps"].items()
                  if e["status"] == "finished")


ISSUE_SWEEP = ('methods = ["FT", "LWF", "MiB"]\nseeds = [1, 2]\n'
               '[[tasks]]\ntask = "15-5"\noverlap = true\n'
               '[[tasks]]\ntask = "15-1"\noverlap = true\n' + TINY)


@pytest.fixture(scope="module")
def voc64(tmp_path_factory):
    """64 training images: the fewest that give step 1 of 15-1 overlapped (class 16) two
    images, a batch of 2; 32 px, as small as the crop."""
    from dataset.synthetic import generate
    root = tmp_path_factory.mktemp("voc64")
    generate("voc", str(root), n_train=64, n_val=20, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def issue_sweep(tmp_path_factory, voc64):
    """The issue's sweep through ``run --jobs 2``, stopped by Ctrl-C once a step-0 run has
    finished, then run again to the end: (folder, sweep file, (exit code, stderr) of the
    first run, (exit code, stdout, stderr) of the second)."""
    folder = tmp_path_factory.mktemp("issue_sweep")
    path = write_sweep(folder, ISSUE_SWEEP, data_root=voc64)
    logs = folder / "runs" / "logs"
    proc, out, err = start_sweep(["run", path, "--jobs", "2"], folder)
    wait_for(lambda: any(finished_steps(d) == [0] for d in logs.glob("*/step0-*")), proc,
             "a step-0 run finished")
    proc.send_signal(signal.SIGINT)
    done_before = [d.name for d in logs.glob("*/step0-*") if finished_steps(d) == [0]]
    proc.wait()
    out.close()
    err.close()
    first = (proc.returncode, (folder / "sweep.err").read_text(), done_before)
    second = call(["run", path, "--jobs", "2"])
    yield folder, path, first, second
    shutil.rmtree(folder, ignore_errors=True)   # 16 runs' checkpoints: gigabytes


@pytest.mark.slow
def test_issue_sweep_runs_and_trains_each_step0_once(issue_sweep):
    folder, _, (code, err, done_before), (code2, out2, err2) = issue_sweep
    assert code == 130 and "interrupted: every run stopped at its last finished epoch" in err
    assert "tools/sweep.py run sweep.toml' continues them" in err
    assert code2 == 0, err2[-3000:]
    assert "every run finished" in out2
    logs = folder / "runs" / "logs"
    assert not list(logs.glob("*/*/sweep.lock"))
    trained0 = sorted(d.name for d in logs.glob("*/*")
                      if any(r["step"] == 0 for r in read_events(str(d), "epoch")))
    assert trained0 == ["step0-FT-15-1-ov-s1", "step0-FT-15-1-ov-s2", "step0-FT-15-5-ov-s1",
                        "step0-FT-15-5-ov-s2"]
    # a step-0 run finished before the Ctrl-C is not trained again (one epoch each); one
    # stopped by it may have logged its epoch before its checkpoint was saved, and trains it
    # again
    epochs = {d.name: len(read_events(str(d), "epoch")) for d in logs.glob("*/step0-*")}
    assert done_before and all(epochs[name] == 1 for name in done_before), (done_before, epochs)
    assert all(1 <= n <= 2 for n in epochs.values()), epochs
    for task, task_dir, steps in (("15-5", "15-5-voc", [1]), ("15-1", "15-5s-voc",
                                                             [1, 2, 3, 4, 5])):
        for method in ("FT", "LWF", "MiB"):
            for seed in (1, 2):
                run = logs / task_dir / f"{method}-{task}-ov-s{seed}"
                step0 = f"step0-FT-{task}-ov-s{seed}"
                assert finished_steps(run) == steps
                manifest = json.loads((run / "manifest.json").read_text())
                assert manifest["step0"]["run"] == step0
                copied = json.loads((run / "results" / "step-0.json").read_text())
                assert copied["name"] == step0
                step1 = json.loads((run / "results" / "step-1.json").read_text())
                assert step1["opts"]["step_ckpt"] == manifest["step0"]["checkpoint"]
                assert step1["method"] == method and step1["seed"] == seed


@pytest.mark.slow
def test_issue_sweep_status_table_and_a_rerun_that_trains_nothing(issue_sweep):
    folder, path, _, _ = issue_sweep
    code, status, _ = call(["status", path])
    assert code == 0
    assert "cells: 12 finished" in status and "step-0 runs: 4 finished" in status
    code, table, err = call(["table", path])
    assert code == 0, err
    miou, cost = table.split("Table: cost")
    lines = [line for line in miou.splitlines() if line.startswith("| ")]
    assert "VOC 15-5 overlapped · hIoU" in lines[0] and "VOC 15-5s overlapped · avg" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["FT", "LWF", "MiB"]
    assert all(line.count("±") == 10 for line in lines[1:])
    assert "background" in table
    # the cost table: each method's steps and sequences, every step with its cost
    cost_rows = [line.split("|") for line in cost.splitlines() if line.startswith("| ")][1:]
    assert {r[1].strip() for r in cost_rows} == {"FT", "LWF", "MiB"}
    assert all("–" not in r[4] for r in cost_rows)        # training time of every line
    for name in ("table.md", "table.csv", "table.tex", "cost.md",
                 "miou_all_voc_15-5_overlapped.png",
                 "miou_all_voc_15-5s_overlapped.png"):
        assert (folder / "runs" / "tables" / name).is_file(), name
    code, again, _ = call(["run", path])
    assert code == 0 and "every run of sweep sweep is finished" in again


LOCAL_SWEEP = """seeds = [1]
[[methods]]
method = "FT"
[[methods]]
method = "MiB"
[[methods]]                  # a variant that diverges at its first step-1 iteration
name = "LWF-broken"
method = "LWF"
options = {loss_kd = 1e39, explicit_overrides_preset = true}
[[tasks]]
task = "15-5"
overlap = true
""" + TINY.replace("epochs = 1", "epochs = [3, 1]")


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    """Fewer images than ``synthetic_voc``: enough for every step of 15-5 with batch 2 (not
    for 15-1, whose step 1 needs the 64 images of ``synthetic_voc``)."""
    from dataset.synthetic import generate
    root = tmp_path_factory.mktemp("small_voc")
    generate("voc", str(root), n_train=24, n_val=20, size=32, seed=0)
    return root


@pytest.mark.slow
def test_submitit_local_requeue_kill_failing_cell_and_debug_retry(tmp_path, small_voc):
    path = write_sweep(tmp_path, LOCAL_SWEEP, data_root=small_voc)
    logs = tmp_path / "runs" / "logs" / "15-5-voc"
    step0, mib = logs / "step0-FT-15-5-ov-s1", logs / "MiB-15-5-ov-s1"
    checkpoint = tmp_path / "runs" / "checkpoints" / "15-5-voc_step0-FT-15-5-ov-s1_0.pth"
    proc, out, err = start_sweep(["run", path, "--executor", "local", "--jobs", "2"], tmp_path)

    def owner(folder):
        path = folder / lock.SWEEP_LOCK
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    # the time limit: submitit's signal to the job after the first epoch of step 0 was saved
    wait_for(lambda: read_events(str(step0), "epoch") and checkpoint.exists() and owner(step0),
             proc, "the first epoch of step 0")
    os.kill(owner(step0)["pid"], signal.SIGUSR2)
    wait_for(lambda: len(read_events(str(step0), "start")) == 2, proc, "the requeued job")
    # a job killed outright (node lost, scancel -s KILL) while it trains MiB's step 1
    wait_for(lambda: (owner(mib) or {}).get("child"), proc, "MiB's run")
    killed = owner(mib)
    for pid in (killed["child"], killed["pid"]):
        os.kill(pid, signal.SIGKILL)
    proc.wait()             # the sweep ends by itself: its jobs ended
    out.close()
    err.close()
    stderr = (tmp_path / "sweep.err").read_text()
    assert proc.returncode == 1, stderr[-3000:]
    starts = [r["start_epoch"] for r in read_events(str(step0), "start")]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 1   # resumed where it stopped
    assert [r["epoch"] for r in read_events(str(step0), "epoch")] == [0, 1, 2]
    assert finished_steps(step0) == [0] and finished_steps(logs / "FT-15-5-ov-s1") == [1]
    assert "failed LWF-broken-15-5-ov-s1 (exit 1): error: the training loss is not finite" in \
        stderr
    assert "failed MiB-15-5-ov-s1: job " in stderr and "ended without a result" in stderr
    status = call(["status", path])[1]
    broken = next(line for line in status.splitlines() if "LWF-broken" in line)
    assert "failed" in broken and "log: " + str(tmp_path / "runs" / "console" /
                                                "LWF-broken-15-5-ov-s1.txt") in broken
    assert "cells: 1 finished, 2 failed" in status

    ft_console = tmp_path / "runs" / "console" / "FT-15-5-ov-s1.txt"
    before = ft_console.stat().st_mtime_ns
    code, _, retry = call(["run", path, "--executor", "debug"])
    assert code == 1
    assert "finished MiB-15-5-ov-s1" in retry and "failed LWF-broken" in retry
    assert "1 of 2 runs did not finish" in retry
    assert finished_steps(mib) == [1] and ft_console.stat().st_mtime_ns == before
    assert not list(logs.glob("*/sweep.lock"))



def test_plan_commands_run_as_printed_from_any_folder(tmp_path, capsys):
    """Issue 28, row 12: each printed command changes to the repository root and names this
    interpreter; pasted into a shell elsewhere (here with --help added, so that it parses
    every option and stops) it runs."""
    path = write_sweep(tmp_path, GOOD + TINY)
    code, out, _ = cli(["plan", path, "--commands"], capsys)
    commands = [line.strip() for line in out.splitlines() if "run.py" in line]
    assert code == 0 and commands
    for command in commands:
        assert command.startswith(f"cd {ROOT} && {sys.executable} run.py --")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(["bash", "-c", commands[0] + " --help"], cwd=elsewhere,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: run.py" in done.stdout


def test_a_task_file_adds_its_tasks_to_the_sweep(tmp_path):
    (tmp_path / "splits.toml").write_text(
        "[voc.mine]\n0 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]\n"
        "1 = [16, 17, 18]\n2 = [19, 20]\n")
    path = write_sweep(tmp_path, 'task_file = "splits.toml"\nmethods = ["MiB"]\n'
                       '[[tasks]]\ntask = "mine"\noverlap = true\n' + TINY)
    p = plan.build_plan(spec.load_sweep(path))
    mib = p.unit("MiB-mine-ov-s42")
    assert mib.steps == [1, 2]
    [first] = mib.commands
    assert first.args[first.args.index("--task_file") + 1] == str(tmp_path / "splits.toml")
    # a mistake in the file is the sweep's one error line
    (tmp_path / "splits.toml").write_text("[voc.mine]\n0 = [0, 1]\n1 = [2]\n")
    with pytest.raises(spec.SweepError, match="labels 3, 4, .* in no step"):
        spec.load_sweep(path)
    tasks.TASKS["voc"].pop("mine", None)
