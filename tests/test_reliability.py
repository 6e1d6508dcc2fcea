"""Reliability: task sequences in one command, reruns that skip finished steps, resume after
SIGKILL with the same final figures, atomic writes, non-finite losses."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import methods
import run
from conftest import ROOT
from utils.checkpoint import CheckpointError, atomic_torch_save

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4",
        "--lr", "0.01", "--num_workers", "0", "--no_progress"]


def voc(data_root, *extra):
    return ["--data_root", str(data_root), "--dataset", "voc", *TINY, *extra]


def run_here(argv):
    try:
        run.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def read_results(workdir, task_name, name, step):
    path = workdir / "logs" / task_name / name / "results" / f"step-{step}.json"
    return json.loads(path.read_text())


@pytest.mark.slow
def test_three_steps_in_one_command_then_a_rerun_skips_them(synthetic_voc, workdir, capsys):
    args = voc(synthetic_voc, "--task", "10-5-5", "--step", "all", "--epochs", "1",
               "--name", "seq", "--lr", "0.01,0.005")
    assert run_here(args) == 0
    ckpts = [workdir / f"checkpoints/step/10-5-5-voc_seq_{s}.pth" for s in range(3)]
    for step, path in enumerate(ckpts):
        assert path.is_file()
        r = read_results(workdir, "10-5-5-voc", "seq", step)
        assert r["step"] == step and len(r["class_iou"]) == [11, 16, 21][step]
        # the per-step learning rate: 0.01 at step 0, then 0.005
        assert r["opts"]["lr"] == (0.01 if step == 0 else 0.005)
    manifest = json.loads((workdir / "logs/10-5-5-voc/seq/manifest.json").read_text())
    assert [manifest["steps"][str(s)]["status"] for s in range(3)] == ["finished"] * 3
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in ckpts]
    capsys.readouterr()
    assert run_here(args) == 0
    err = capsys.readouterr().err
    assert err.count("already finished") == 3 and "Epoch" not in err
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in ckpts] == before


@pytest.mark.slow
def test_changed_checkpoint_of_a_finished_step_is_not_skipped_silently(synthetic_voc, workdir):
    args = voc(synthetic_voc, "--task", "15-5", "--step", "0", "--epochs", "1", "--name", "x")
    assert run_here(args) == 0
    path = workdir / "checkpoints/step/15-5-voc_x_0.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["best_score"] = 0.5
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as e:
        run.main([str(a) for a in args])
    assert e.value.code == 1


# run.py, but the process kills itself with SIGKILL when step 1 starts its epoch 1, that is
# right after the checkpoint of its epoch 0: a crash at a fixed point, whatever the speed
KILLED_AT_STEP1_EPOCH1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
real_train = train.Trainer.train
def train_or_die(self, epoch, *args, **kwargs):
    if self.model_old is not None and epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_train(self, epoch, *args, **kwargs)
train.Trainer.train = train_or_die
import run
run.main(sys.argv[1:])
"""


def _run(args, cwd, stderr_path, kill_at_step1_epoch1=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    entry = (["-c", KILLED_AT_STEP1_EPOCH1.format(root=str(ROOT))] if kill_at_step1_epoch1
             else [str(ROOT / "run.py")])
    with open(stderr_path, "w") as err:
        return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=900).returncode


@pytest.mark.slow
def test_sigkill_during_step1_then_rerun_reaches_the_same_figures(synthetic_voc, tmp_path):
    args = voc(synthetic_voc, "--task", "15-5", "--step", "0,1", "--epochs", "2",
               "--name", "K", "--method", "MiB")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir()
    killed.mkdir()
    assert _run(args, reference, tmp_path / "reference.err") == 0, \
        (tmp_path / "reference.err").read_text()[-3000:]

    code = _run(args, killed, tmp_path / "killed.err", kill_at_step1_epoch1=True)
    assert code == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-3000:]
    interrupted = torch.load(killed / "checkpoints/step/15-5-voc_K_1.pth", weights_only=False)
    assert interrupted["epoch"] == 0

    assert _run(args, killed, tmp_path / "resumed.err") == 0, \
        (tmp_path / "resumed.err").read_text()[-3000:]
    resumed_log = (tmp_path / "resumed.err").read_text()
    assert "step 0 of 15-5-voc/K is already finished" in resumed_log
    assert "continuing at epoch 2 of 2" in resumed_log
    a = read_results(reference, "15-5-voc", "K", 1)
    b = read_results(killed, "15-5-voc", "K", 1)
    assert b["class_iou"] == a["class_iou"] and b["mean_iou"] == a["mean_iou"]


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial bytes of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=f"no space left in {tmp_path} to write ckpt.pth, "
                       f"which needs about {len(good) / 2 ** 20:.1f} MiB"):
        atomic_torch_save({"epoch": 2}, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind


def test_a_damaged_checkpoint_names_the_file(tmp_path):
    from utils.checkpoint import load_trusted
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint .*broken.pth"):
        load_trusted(path)




@pytest.mark.slow
def test_non_finite_loss_stops_naming_iteration_parts_and_last_checkpoint(synthetic_voc,
                                                                          workdir, monkeypatch,
                                                                          capsys):
    real = methods.ft.CrossEntropy.per_pixel
    count = {"n": 0}

    def per_pixel(self, batch):
        loss = real(self, batch)
        if torch.is_grad_enabled():          # training, not validation
            count["n"] += 1
            if count["n"] == 8 + 3:  # epoch 1 (8 iterations per epoch), iteration 2
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(methods.ft.CrossEntropy, "per_pixel", per_pixel)
    code = run_here(voc(synthetic_voc, "--task", "15-5", "--step", "0", "--epochs", "2",
                        "--name", "nan"))
    err = capsys.readouterr().err
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("error:")][0]
    assert "not finite at epoch 2, iteration 2" in line and "main nan" in line
    assert "last good checkpoint: checkpoints/step/15-5-voc_nan_0.pth (after epoch 1)" in line
    assert torch.load(workdir / "checkpoints/step/15-5-voc_nan_0.pth",
                      weights_only=False)["epoch"] == 0

    count["n"] = 0
    assert run_here(voc(synthetic_voc, "--task", "15-5", "--step", "0", "--epochs", "2",
                        "--name", "skip", "--skip_nonfinite")) == 0
    log = (workdir / "logs/15-5-voc/skip/log.txt").read_text()
    assert "skipped batch 2 of epoch 2: non-finite loss" in log
    assert "1 batches skipped for a non-finite loss" in log
    ckpt = torch.load(workdir / "checkpoints/step/15-5-voc_skip_0.pth", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values()
               if v.is_floating_point())
