"""PLOP end to end through run.py on synthetic VOC data: the six steps of 15-1 (15-5s)
overlapped in one command, result files and records, --test reproducing the figures, a
SIGKILL in the middle of a step then the same command finishing with the same figures, two
processes on gloo with the thresholds summed over processes, and PLOP's protocol."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_run_e2e import STANDALONE

from conftest import ROOT, run_entry

pytestmark = pytest.mark.slow

TASK_NAME = "15-5s-voc"
STEPS = 6


def plop_args(data_root, *extra):
    return ["--data_root", data_root, "--dataset", "voc", "--task", "15-5s", "--overlap",
            "--method", "PLOP", "--backbone", "resnet18", "--no_pretrained", "--crop_size",
            "32", "--batch_size", "2", "--epochs", "2", "--val_interval", "2", "--lr",
            "0.01,0.001", "--num_workers", "0", "--no_progress", *map(str, extra)]


# run.py, but the process kills itself with SIGKILL when the KILL_AT-th call of a training
# epoch 1 starts (step KILL_AT - 1, right after its epoch-0 checkpoint)
KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
real_train = train.Trainer.train
seen = []
def train_or_die(self, epoch, *args, **kwargs):
    if epoch == 1:
        seen.append(1)
        if len(seen) == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_train(self, epoch, *args, **kwargs)
train.Trainer.train = train_or_die
import run
run.main(sys.argv[1:])
"""


def results(workdir, step):
    path = workdir / "logs" / TASK_NAME / "PLOP" / "results" / f"step-{step}.json"
    return json.loads(path.read_text())


def records(workdir):
    path = workdir / "logs" / TASK_NAME / "PLOP" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sequence(synthetic_voc, tmp_path_factory):
    """The six steps of PLOP in one command (uninterrupted)."""
    workdir = tmp_path_factory.mktemp("plop")
    out = run_entry(plop_args(synthetic_voc, "--name", "PLOP", "--step", "all"), workdir,
                    timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out.stderr


def test_six_steps_write_results_and_records(sequence):
    workdir, log = sequence
    for step in range(STEPS):
        doc = results(workdir, step)
        assert doc["method"] == "PLOP" and doc["opts"]["pod"] == "local"
        assert len(doc["class_iou"]) == 16 + step
    epochs = [r for r in records(workdir) if r["event"] == "epoch"]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(s, e) for s in range(STEPS)
                                                         for e in (0, 1)]
    assert all("pod" not in r["losses"] for r in epochs if r["step"] == 0)
    assert all(r["losses"]["pod"] > 0 for r in epochs if r["step"] > 0)
    starts = {r["step"]: r["parts"] for r in records(workdir) if r["event"] == "start"}
    assert starts[0] == ["CrossEntropy"]
    assert starts[3] == ["CrossEntropy", "BackgroundInit", "PseudoLabels", "LocalPOD"]
    assert log.count("PLOP thresholds of step") == STEPS - 1
    ckpt = torch.load(workdir / "checkpoints/step" / f"{TASK_NAME}_PLOP_5.pth",
                      weights_only=False)
    assert ckpt["trainer_state"] == {"regularizer": None}     # thresholds are recomputed


def test_test_reproduces_the_figures_of_the_run(sequence, synthetic_voc):
    workdir, _ = sequence
    trained = results(workdir, STEPS - 1)
    out = run_entry(plop_args(synthetic_voc, "--name", "PLOP", "--step", STEPS - 1, "--test"),
                    workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    tested = results(workdir, STEPS - 1)
    assert tested["class_iou"] == trained["class_iou"]
    assert tested["mean_iou"] == trained["mean_iou"]


def test_a_killed_sequence_finishes_with_the_same_figures(sequence, synthetic_voc, tmp_path):
    workdir, _ = sequence
    args = plop_args(synthetic_voc, "--name", "PLOP", "--step", "all")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", KILL_AT="3")
    with open(tmp_path / "killed.err", "w") as err:
        code = subprocess.run([sys.executable, "-c", KILLED.format(root=str(ROOT)), *args],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=900).returncode
    assert code == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-3000:]
    assert torch.load(tmp_path / "checkpoints/step" / f"{TASK_NAME}_PLOP_2.pth",
                      weights_only=False)["epoch"] == 0
    out = run_entry(args, tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1 of 15-5s-voc/PLOP is already finished" in out.stderr
    assert "continuing at epoch 2 of 2" in out.stderr
    for step in range(2, STEPS):
        assert results(tmp_path, step)["class_iou"] == results(workdir, step)["class_iou"], step


@pytest.mark.distributed
def test_two_processes_sum_the_histograms_and_train_a_step(sequence, synthetic_voc, tmp_path):
    workdir, _ = sequence
    step0 = workdir / "checkpoints/step" / f"{TASK_NAME}_PLOP_0.pth"
    out = run_entry(plop_args(synthetic_voc, "--name", "PLOP", "--step", "1", "--step_ckpt",
                              step0, "--sync_thresholds", "--epochs", "1", "--batch_size", "1"),
                    tmp_path, timeout=600,
                    launcher=["-m", "torch.distributed.run", "--nproc_per_node=2",
                              STANDALONE])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "processes: 2" in out.stderr and "PLOP thresholds of step 1" in out.stderr
    assert results(tmp_path, 1)["opts"]["sync_thresholds"] is True


def test_plop_protocol_restarts_epochs_after_ckpt_and_tests_the_step_checkpoint(
        sequence, synthetic_voc, tmp_path):
    workdir, _ = sequence
    ckpt_dir = workdir / "checkpoints/step"
    out = run_entry(plop_args(synthetic_voc, "--name", "P19", "--step", "1", "--epochs", "1",
                              "--protocol", "plop", "--step_ckpt",
                              ckpt_dir / f"{TASK_NAME}_PLOP_0.pth", "--ckpt",
                              ckpt_dir / f"{TASK_NAME}_PLOP_1.pth"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # PLOP's --ckpt restores the states and trains the epochs anew (this project: resumes)
    assert "continuing at epoch 1 of 1" in out.stderr
    doc = json.loads((tmp_path / "logs" / TASK_NAME / "P19" / "results" /
                      "step-1.json").read_text())
    assert doc["opts"]["protocol"] == "plop"
