"""All eight methods end to end through ``run.main`` on synthetic VOC data (task 10-5-5,
all three steps in one command, tiny ResNet-18): checkpoints, results and manifests of every
step; the regulariser importances carried from step to step in the trainer state; the
penalty and the distillation terms active after step 0 only; LwF-MC's BCE at step 0; MiB's
background initialisation; and an exact resume of a regulariser step from its epoch-0
checkpoint."""
import json
import math
import shutil

import pytest
import torch

import argparser
import engine.loop
import methods
import run
from engine import build
from tb_events import scalars
from utils import distributed
from utils.logger import Logger

METHODS = ("FT", "LWF", "LWF-MC", "ILT", "EWC", "PI", "RW", "MiB")
REGULARISER_KEYS = {"EWC": ("ewc", ["fisher"]), "PI": ("pi", ["score"]),
                    "RW": ("rw", ["score", "fisher"])}
# methods whose step>0 loss has more than the main term (distillation or penalty)
EXTRA_TERMS = {"LWF", "LWF-MC", "ILT", "EWC", "PI", "RW", "MiB"}
TASK, TASK_NAME = "10-5-5", "10-5-5-voc"
CLASSES = [11, 5, 5]

pytestmark = pytest.mark.slow


def tiny(out, *extra):
    """A tiny run. Later steps use the paper's lower learning rate: at 0.01 the EWC and PI
    penalties (weight 500 on importances up to 1) make SGD diverge. RW scores every
    iteration (not every 10th), so that a few iterations give it a non-zero score. No
    validation pass during training (the test phase still runs)."""
    return ["--dataset", "voc", "--task", TASK, "--backbone", "resnet18", "--no_pretrained",
            "--crop_size", "32", "--batch_size", "4", "--epochs", "1", "--lr", "0.01,0.001",
            "--reg_iterations", "1", "--val_interval", "2",
            "--num_workers", "0", "--no_progress", "--index_dir", str(out / "index"),
            "--checkpoint_dir", str(out / "checkpoints"), "--logdir", str(out / "logs"),
            *map(str, extra)]


def run_here(argv):
    try:
        run.main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), f"run.py exited with {e.code}"


def checkpoint(out, name, step):
    return torch.load(out / "checkpoints" / f"{TASK_NAME}_{name}_{step}.pth",
                      weights_only=False, mmap=True)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny tensors: a second thread only waits on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def three_steps(synthetic_voc, tmp_path_factory):
    """Every method, steps 0, 1 and 2 in one command each."""
    out = tmp_path_factory.mktemp("methods")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny tensors: a second thread only waits on a shared CPU
    try:
        for method in METHODS:
            run_here(tiny(out, "--data_root", synthetic_voc, "--method", method, "--name",
                          method, "--step", "all"))
    finally:
        torch.set_num_threads(threads)
    yield out
    shutil.rmtree(out / "checkpoints")     # 24 checkpoints of 120-300 MB


def test_every_method_trains_tests_and_checkpoints_three_steps(three_steps):
    for method in METHODS:
        logdir = three_steps / "logs" / TASK_NAME / method
        manifest = json.loads((logdir / "manifest.json").read_text())
        assert set(manifest["steps"]) == {"0", "1", "2"}, method
        for step in range(3):
            ckpt = checkpoint(three_steps, method, step)
            assert ckpt["epoch"] == 1 and ckpt["meta"]["classes"] == CLASSES[:step + 1]
            doc = json.loads((logdir / "results" / f"step-{step}.json").read_text())
            assert doc["method"] == method and doc["step"] == step
            assert len(doc["class_iou"]) == sum(CLASSES[:step + 1])
            # the summary is the mean of the classes' own figures, and the manifest holds
            # the same test mIoU as the result file
            present = [v for v in doc["class_iou"].values() if v is not None]
            assert doc["miou_all"] == pytest.approx(sum(present) / len(present), abs=1e-9)
            assert doc["mean_iou"] == pytest.approx(
                manifest["steps"][str(step)]["summary"]["mean_iou"], abs=1e-9)


def test_regularisers_carry_their_importances_in_every_checkpoint(three_steps):
    for method in METHODS:
        states = [checkpoint(three_steps, method, s)["trainer_state"] for s in range(3)]
        if method not in REGULARISER_KEYS:
            assert all(s == {"regularizer": None} for s in states), method
            continue
        name, keys = REGULARISER_KEYS[method]
        for step, state in enumerate(states):
            reg = state["regularizer"]
            assert reg["name"] == name
            params = checkpoint(three_steps, method, step)["model_state"]
            for key in keys:
                # every parameter of this step's model has an importance (new classifier too)
                assert {k for k in reg[key]} >= {f"module.cls.{step}.weight",
                                                  "module.body.mod1.conv1.weight"}, (method, key)
                assert set(reg[key]) <= set(params)
                assert all(torch.isfinite(v).all() and (v >= 0).all() for v in reg[key].values())
        # what step 1 saved was computed during step 1, starting from step 0's
        first = keys[0]
        w = "module.body.mod1.conv1.weight"
        assert not torch.equal(states[0]["regularizer"][first][w],
                               states[1]["regularizer"][first][w]), method
        log = (three_steps / "logs" / TASK_NAME / method / "log.txt").read_text()
        assert "no penalty at this step" not in log


def test_extra_loss_terms_are_active_after_step0_only(three_steps):
    for method in METHODS:
        logdir = three_steps / "logs" / TASK_NAME / method
        for step in range(3):
            [(_, value)] = scalars(logdir, f"E-Loss-reg/{step}")
            active = step > 0 and method in EXTRA_TERMS
            assert (value > 0) if active else (value == 0), (method, step, value)
            assert math.isfinite(value)


def test_step0_is_shared_unless_the_criterion_changes(three_steps):
    """Without an old model the presets differ only in LwF-MC's BCE: the regularisers
    observe but do not change step 0 (the method benchmark relies on this)."""
    reference = checkpoint(three_steps, "FT", 0)["model_state"]
    for method in METHODS:
        state = checkpoint(three_steps, method, 0)["model_state"]
        same = all(torch.equal(v, state[k]) for k, v in reference.items())
        assert same == (method != "LWF-MC"), method


def build_step1(three_steps, synthetic_voc, method, workdir):
    """Step 1 of ``method`` built by the engine from the MiB step-0 checkpoint."""
    opts = argparser.build_options(tiny(workdir, "--data_root", synthetic_voc, "--method",
                                        method, "--name", "init", "--step", "1", "--step_ckpt",
                                        three_steps / "checkpoints" / f"{TASK_NAME}_MiB_0.pth"))
    ctx = distributed.DistContext()
    logger = Logger(str(workdir / "log"), rank=0, summary=False, log_file=False)
    prev_path = str(three_steps / "checkpoints" / f"{TASK_NAME}_MiB_0.pth")
    prev = torch.load(prev_path, weights_only=False)
    try:
        data = build.build_data(opts, ctx, logger)
        method_parts = methods.assemble(build.step_info(opts, ctx, CLASSES[:2], logger))
        models = build.build_models(opts, ctx, CLASSES[:2], data, method_parts, logger,
                                    prev_ckpt=prev, prev_path=prev_path)
    finally:
        logger.close()
    return models, prev["model_state"]


def test_mib_initialises_the_new_classifier_from_the_background(three_steps, synthetic_voc,
                                                                workdir):
    step, prev = build_step1(three_steps, synthetic_voc, "MiB", workdir)
    w_bg, b_bg = prev["module.cls.0.weight"][0], prev["module.cls.0.bias"][0]
    new_bias = b_bg - math.log(CLASSES[1] + 1)
    cls = step.model.cls
    torch.testing.assert_close(cls[1].weight.detach(), w_bg.expand_as(cls[1].weight))
    torch.testing.assert_close(cls[1].bias.detach(), new_bias.expand(CLASSES[1]))
    # the old background bias is lowered too (Q6); the teacher keeps the trained value
    torch.testing.assert_close(cls[0].bias[0].detach(), new_bias)
    assert torch.equal(step.model_old.cls[0].bias[0], b_bg)

    ft, _ = build_step1(three_steps, synthetic_voc, "FT", workdir)
    assert not torch.allclose(ft.model.cls[1].weight, w_bg.expand_as(ft.model.cls[1].weight))
    assert torch.equal(ft.model.cls[0].bias[0].detach(), b_bg)


@pytest.mark.parametrize("method", ["PI", "RW"])
def test_regulariser_step_resumes_exactly_from_its_epoch0_checkpoint(three_steps, synthetic_voc,
                                                                     workdir, monkeypatch,
                                                                     one_thread, method):
    step0 = three_steps / "checkpoints" / f"{TASK_NAME}_{method}_0.pth"
    common = tiny(workdir, "--data_root", synthetic_voc, "--method", method, "--step", "1",
                  "--step_ckpt", step0, "--epochs", "2")
    path = workdir / "epoch0.pth"
    real_save = engine.loop.atomic_torch_save

    def keep_epoch0(obj, target):      # the run overwrites its checkpoint every epoch
        real_save(obj, target)
        if obj["epoch"] == 0:
            real_save(obj, str(path))

    monkeypatch.setattr(engine.loop, "atomic_torch_save", keep_epoch0)
    run_here(common + ["--name", "whole"])
    monkeypatch.setattr(engine.loop, "atomic_torch_save", real_save)
    whole = checkpoint(workdir, "whole", 1)
    assert whole["epoch"] == 2

    run_here(common + ["--name", "resumed", "--ckpt", path])
    resumed = checkpoint(workdir, "resumed", 1)
    log = (workdir / "logs" / TASK_NAME / "resumed" / "log.txt").read_text()
    assert "continuing at epoch 2 of 2" in log
    for k, v in whole["model_state"].items():
        assert torch.equal(v, resumed["model_state"][k]), k
    reg_whole = whole["trainer_state"]["regularizer"]
    reg_resumed = resumed["trainer_state"]["regularizer"]
    for key in REGULARISER_KEYS[method][1]:
        for k, v in reg_whole[key].items():
            assert torch.equal(v, reg_resumed[key][k]), (key, k)
