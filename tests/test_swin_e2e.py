"""MiB and PLOP on a Swin body end to end through run.py on synthetic VOC data: two steps
(15-5, overlapped), the checkpoints, ``--test`` reproducing the figures, and a SIGKILL at the
start of step 1's second epoch followed by the same command finishing with the same figures.

Swin-T (``--backbone swin_t``, window 7) stands in for Swin-B: the same code with fewer and
narrower blocks, fast enough on a CPU; Swin-B itself is checked against NeST's module in
test_swin_vectors.py. Crop 32: stage 1 is 8x8 tokens, the smallest crop that fills one
window of 7 (the padding of every stage is exercised)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_plop_e2e import KILLED

from conftest import ROOT, run_entry

pytestmark = pytest.mark.slow

TASK_NAME = "15-5-voc"


def swin_args(data_root, method, *extra):
    return ["--data_root", data_root, "--dataset", "voc", "--task", "15-5", "--overlap",
            "--method", method, "--backbone", "swin_t", "--no_pretrained", "--crop_size", "32",
            "--batch_size", "4", "--epochs", "2", "--val_interval", "2", "--lr", "0.01,0.001",
            "--num_workers", "0", "--no_progress", "--name", method, *map(str, extra)]


def results(workdir, method, step):
    path = workdir / "logs" / TASK_NAME / method / "results" / f"step-{step}.json"
    return json.loads(path.read_text())


def checkpoint(workdir, method, step):
    return torch.load(workdir / "checkpoints/step" / f"{TASK_NAME}_{method}_{step}.pth",
                      weights_only=False)


@pytest.fixture(scope="module", params=["MiB", "PLOP"])
def trained(request, synthetic_voc, tmp_path_factory):
    method = request.param
    workdir = tmp_path_factory.mktemp(f"swin_{method}")
    out = run_entry(swin_args(synthetic_voc, method, "--step", "all"), workdir, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return method, workdir


def test_two_steps_train_on_swin_and_checkpoint_its_body(trained):
    method, workdir = trained
    for step in (0, 1):
        assert len(results(workdir, method, step)["class_iou"]) == 16 + 5 * step
    ckpt = checkpoint(workdir, method, 1)
    assert ckpt["meta"]["backbone"] == "swin_t"
    assert ckpt["meta"]["fingerprint"]["backbone"] == "swin_t"
    keys = list(ckpt["model_state"])
    assert any(k.endswith("body.norm0.weight") for k in keys)
    assert any(".body.layers.1.downsample.reduction.weight" in k for k in keys)
    assert not any("relative_position_index" in k for k in keys)   # W10 not reproduced


def test_test_reproduces_the_figures_of_the_run(trained, synthetic_voc):
    method, workdir = trained
    before = results(workdir, method, 1)
    out = run_entry(swin_args(synthetic_voc, method, "--step", 1, "--test"), workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    after = results(workdir, method, 1)
    assert after["class_iou"] == before["class_iou"]
    assert after["mean_iou"] == before["mean_iou"]


def test_a_killed_run_finishes_with_the_same_figures(trained, synthetic_voc, tmp_path):
    method, workdir = trained
    args = swin_args(synthetic_voc, method, "--step", "all")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", KILL_AT="2")
    with open(tmp_path / "killed.err", "w") as err:
        code = subprocess.run([sys.executable, "-c", KILLED.format(root=str(ROOT)), *args],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=900).returncode
    assert code == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-3000:]
    assert checkpoint(tmp_path, method, 1)["epoch"] == 0
    out = run_entry(args, tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at epoch 2 of 2" in out.stderr   # epoch 1 was saved: the second
    assert results(tmp_path, method, 1)["class_iou"] == results(workdir, method, 1)["class_iou"]
    assert torch.equal(checkpoint(tmp_path, method, 1)["model_state"]["module.body.norm3.weight"],
                       checkpoint(workdir, method, 1)["model_state"]["module.body.norm3.weight"])
