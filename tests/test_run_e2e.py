"""End to end through ``run.py`` on synthetic data with a tiny network (ResNet-18, crop 32):
step 0 then step 1 on VOC and ADE, files where the original puts them, ``--test`` giving the
figures of the training run, ``--ckpt`` resume, bf16 autocast, torchrun and the legacy
launcher on gloo."""
import json

import pytest
import torch

import engine.loop
import run
from conftest import run_entry
from tb_events import scalars, tags
from utils.events import read_events

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4",
        "--epochs", "1", "--lr", "0.01", "--num_workers", "0", "--no_progress"]
ORIGINAL_CHECKPOINT_KEYS = {"epoch", "model_state", "optimizer_state", "scheduler_state",
                            "best_score", "trainer_state"}

pytestmark = pytest.mark.slow


def voc_args(data_root, *extra):
    return ["--data_root", data_root, "--dataset", "voc", "--task", "15-5", *TINY, *extra]


def run_here(argv):
    """``python run.py argv`` in this process (saves the interpreter start)."""
    try:
        run.main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), f"run.py exited with {e.code}"


def results(workdir, task_name, name, step):
    with open(workdir / "logs" / task_name / name / "results" / f"step-{step}.json") as f:
        return json.load(f)


# Launched processes meet with ``--standalone``: the launcher binds a free port itself (a port
# found free here and passed on could be taken by a test on another xdist worker meanwhile).
STANDALONE = "--standalone"


def test_voc_step0_then_step1_as_the_original_lays_out_files(synthetic_voc, workdir):
    for step in (0, 1):
        out = run_entry(voc_args(synthetic_voc, "--name", "FT", "--step", step,
                                 "--print_interval", 2, "--sample_num", 2), workdir)
        assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(workdir / "checkpoints/step/15-5-voc_FT_1.pth", weights_only=False)
    assert ORIGINAL_CHECKPOINT_KEYS <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["trainer_state"] == {"regularizer": None}
    state = ckpt["model_state"]
    assert all(k.startswith("module.") for k in state)
    assert state["module.cls.0.weight"].shape[0] == 16 and state["module.cls.1.bias"].shape == (5,)
    assert "module.body.mod1.conv1.weight" in state and "module.head.red_bn.running_var" in state
    assert (workdir / "checkpoints/step/15-5-voc_FT_0.pth").is_file()
    # index lists in data/<dataset>/<task>/ relative to the working directory, as the original
    for f in ("train-1.npy", "val-1.npy", "test_on_val-1.npy"):
        assert (workdir / "data/voc/15-5" / f).is_file()
    logdir = workdir / "logs/15-5-voc/FT"
    found = tags(logdir)
    for tag in ("Loss/0", "E-Loss/0", "Val_MeanIoU/0", "T_MeanIoU/0", "E-Loss/1", "V-Loss/1",
                "Val_Overall_Acc/1", "T_MeanIoU/1", "T_Overall_Acc/1", "Opts/1", "Results/1",
                "Test_Class_IoU/1", "Sample_0/0", "Sample_1/1", "Test_Confusion_Matrix/1",
                "Test_Class_IoU_Bars/1"):
        assert tag in found, tag
    # the test scalar sits at x = step and equals the result file
    r1 = results(workdir, "15-5-voc", "FT", 1)
    [(x, value)] = scalars(logdir, "T_MeanIoU/1")
    assert x == 1 and value == pytest.approx(r1["mean_iou"], abs=1e-6)
    assert len(r1["class_iou"]) == 21 and r1["labels_per_step"] == [list(range(16)),
                                                                    [16, 17, 18, 19, 20]]
    manifest = json.loads((logdir / "manifest.json").read_text())
    assert set(manifest["steps"]) == {"0", "1"}
    assert (logdir / "log.txt").read_text().count("Checkpoint saved") >= 2


def test_test_mode_reproduces_the_training_run_figures(synthetic_voc, workdir):
    run_here(voc_args(synthetic_voc, "--name", "MiB", "--method", "MiB", "--step", "0,1"))
    trained = results(workdir, "15-5-voc", "MiB", 1)
    run_here(voc_args(synthetic_voc, "--name", "MiB", "--method", "MiB", "--step", "1",
                      "--test"))
    tested = results(workdir, "15-5-voc", "MiB", 1)
    assert tested["class_iou"] == trained["class_iou"]
    assert tested["mean_iou"] == trained["mean_iou"] and tested["n_images"] == trained["n_images"]


def test_ckpt_resumes_model_optimizer_scheduler_and_epoch(synthetic_voc, workdir, monkeypatch):
    saved = []
    real_save = engine.loop.atomic_torch_save

    def keep_copies(obj, path):  # remember every checkpoint the run writes
        real_save(obj, path)
        saved.append(torch.load(path, weights_only=False))

    monkeypatch.setattr(engine.loop, "atomic_torch_save", keep_copies)
    run_here(voc_args(synthetic_voc, "--name", "A", "--step", "0", "--epochs", "2"))
    monkeypatch.setattr(engine.loop, "atomic_torch_save", real_save)
    after_epoch0 = next(c for c in saved if c["epoch"] == 0)
    final = saved[-1]
    assert final["epoch"] == 2

    # ours (with the exact-resume record) and an original-format file (only its keys)
    original_format = {k: after_epoch0[k] for k in ORIGINAL_CHECKPOINT_KEYS}
    for name, ckpt in (("B", after_epoch0), ("C", original_format)):
        path = workdir / f"epoch0-{name}.pth"
        torch.save(ckpt, path)
        run_here(voc_args(synthetic_voc, "--name", name, "--step", "0", "--epochs", "2",
                          "--ckpt", path))
        log = (workdir / f"logs/15-5-voc/{name}/log.txt").read_text()
        assert "continuing at epoch 2 of 2" in log and "=====> epoch 1 of 2" not in log
        resumed = torch.load(workdir / f"checkpoints/step/15-5-voc_{name}_0.pth",
                             weights_only=False)
        assert resumed["scheduler_state"] == final["scheduler_state"]
        for k, v in final["model_state"].items():
            assert torch.equal(v, resumed["model_state"][k]), (name, k)


def test_ckpt_of_a_finished_step_leaves_nothing_to_train(synthetic_voc, workdir):
    run_here(voc_args(synthetic_voc, "--name", "A", "--step", "0"))
    path = workdir / "checkpoints/step/15-5-voc_A_0.pth"
    first = torch.load(path, weights_only=False)
    run_here(voc_args(synthetic_voc, "--name", "B", "--step", "0", "--ckpt", path))
    again = torch.load(workdir / "checkpoints/step/15-5-voc_B_0.pth", weights_only=False)
    assert "=====> Epoch" not in (workdir / "logs/15-5-voc/B/log.txt").read_text()
    for k, v in first["model_state"].items():
        assert torch.equal(v, again["model_state"][k]), k


def test_ade_two_steps_in_one_command(synthetic_ade, workdir):
    run_here(["--data_root", synthetic_ade, "--dataset", "ade", "--task", "100-50",
              "--step", "0,1", "--name", "FT", *TINY])
    r0 = results(workdir, "100-50-ade", "FT", 0)
    r1 = results(workdir, "100-50-ade", "FT", 1)
    assert len(r0["class_iou"]) == 101 and len(r1["class_iou"]) == 151
    # ADE void (channel 0) is trained but never evaluated
    assert r0["class_iou"]["0"] is None and r1["class_iou"]["0"] is None
    assert (workdir / "checkpoints/step/100-50-ade_FT_1.pth").is_file()


def test_bf16_autocast_on_cpu(synthetic_voc, workdir):
    run_here(voc_args(synthetic_voc, "--name", "bf16", "--step", "0", "--opt_level", "O1"))
    log = (workdir / "logs/15-5-voc/bf16/log.txt").read_text()
    assert "precision: bf16" in log
    r = results(workdir, "15-5-voc", "bf16", 0)
    assert r["opts"]["amp"] == "bf16"
    # the result file holds the test pass's own figure (events.jsonl, written separately)
    [test] = [e for e in read_events(workdir / "logs/15-5-voc/bf16/events.jsonl")
              if e["event"] == "eval" and e["split"] == "test"]
    assert r["mean_iou"] == pytest.approx(test["mean_iou"], abs=1e-9)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", "legacy"])
def test_two_processes_on_gloo_synchronise_metrics(synthetic_voc, workdir, launcher):
    module = "torch.distributed.run" if launcher == "torchrun" else "torch.distributed.launch"
    out = run_entry(voc_args(synthetic_voc, "--name", launcher, "--step", "0"), workdir,
                    launcher=["-m", module, "--nproc_per_node=2", STANDALONE])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "processes: 2" in out.stderr
    r = results(workdir, "15-5-voc", launcher, 0)
    # the 23 test images are split over 2 processes and padded to 24, then summed on rank 0
    assert r["n_images"] == 24
    assert len(list((workdir / "checkpoints/step").glob("*.pth"))) == 1


@pytest.mark.distributed
def test_a_failure_on_rank0_alone_stops_the_other_rank_promptly(synthetic_voc, workdir):
    """Rank 0 cannot write the result files (a file stands where their folder goes); rank
    1 must stop with the same message instead of waiting in a collective until the
    process-group timeout (30 minutes; the subprocess timeout would fail the test)."""
    blocked = workdir / "logs/15-5-voc/R/results"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    out = run_entry(voc_args(synthetic_voc, "--name", "R", "--step", "0"), workdir,
                    launcher=["-m", "torch.distributed.run", "--nproc_per_node=2",
                              STANDALONE], timeout=300)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert any("cannot write" in line and "rank 0 failed" not in line for line in errors), \
        out.stderr[-3000:]
    assert any("stopped because rank 0 failed: cannot write" in line for line in errors), \
        out.stderr[-3000:]
    assert blocked.read_text() == "not a folder"
