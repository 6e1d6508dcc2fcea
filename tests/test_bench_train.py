"""bench/bench_train.py times the real training code: the Trainer gets the options run.py
would resolve, so each method does its extra work (old-model forward, distillation,
regulariser update, penalty and its backward) in the timed iterations."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_train  # noqa: E402
import common  # noqa: E402
from train import Trainer  # noqa: E402

CPU = torch.device("cpu")
TINY = {"backbone": "resnet18", "size": 32, "batch": 2, "device": "cpu"}


def trainer_for(method, precision="fp32"):
    opts = bench_train.trainer_options(method, precision=precision, **TINY)
    # PLOP computes its thresholds over a training loader before the step
    loader = bench_train.synthetic_batches(1, 2, 32, 21, CPU)
    model, model_old, classes, method = bench_train.build_models(opts, CPU, train_loader=loader)
    state = bench_train.previous_trainer_state(opts, model_old, CPU)
    trainer = Trainer(model, model_old, CPU, opts, trainer_state=state, classes=classes,
                      method=method)
    return state, model, model_old, classes, trainer


def test_options_are_those_run_py_resolves():
    opts = bench_train.trainer_options("mib", precision="bf16", **TINY)
    assert (opts.method, opts.step, opts.task, opts.amp) == ("MiB", 1, "15-5", "bf16")
    assert opts.unce and opts.unkd and opts.loss_kd == 10 and opts.init_balanced
    assert opts.channels_last == "off" and opts.norm_impl == "torch"  # the CPU's auto choices
    assert bench_train.trainer_options("FT", channels_last=True, **TINY).channels_last == "on"
    with pytest.raises(common.BenchError, match="unknown method 'MIBB'"):
        bench_train.trainer_options("MIBB", **TINY)


@pytest.mark.parametrize("method", ["FT", "LwF", "ILT", "LwF-MC", "MiB", "PLOP"])
def test_distillation_methods_forward_the_old_model_and_ft_does_not(method):
    state, model, model_old, classes, trainer = trainer_for(method)
    assert classes == [16, 5] and state is None and model_old is not None and not model_old.training
    assert not any(p.requires_grad for p in model_old.parameters())
    assert trainer.method.needs_old() == (method != "FT")
    assert not trainer.method.penalties


@pytest.mark.parametrize("method", ["EWC", "PI", "RW"])
def test_regularised_methods_pay_the_penalty_and_its_backward(method):
    state, model, model_old, classes, trainer = trainer_for(method)
    [part] = trainer.method.penalties
    assert part.regularizer.penalize
    penalty = part.penalty()
    assert torch.is_tensor(penalty) and penalty.requires_grad  # a second backward follows
    # the old model's parameters (classifier of step 0 included) all get a penalty weight
    state = state["regularizer"]
    weights = state["fisher"] if method in ("EWC", "RW") else state["score"]
    assert len(weights) == len(list(model_old.parameters()))


def test_synthetic_batches_look_like_loader_batches():
    batches = bench_train.synthetic_batches(3, 2, 16, 21, CPU)
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (2, 16, 16) and labels.dtype == torch.int64
    values = set(labels.unique().tolist())
    assert 255 in values and values - {255} <= set(range(21))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["MiB", "EWC"])
def test_method_and_eval_measurements_report_time_and_memory(method):
    started = time.perf_counter()
    r = bench_train.measure_method(method, warmup=1, iters=1, threads=1, **TINY)
    # the measured iteration is a part of the call (warm-up and set-up come on top)
    assert r["method"] == method and 0 < r["seconds"] < time.perf_counter() - started
    assert r["images_per_s"] == pytest.approx(2 / r["seconds"])
    e = bench_train.measure_eval(warmup=1, iters=2, threads=1, **TINY)
    assert e["seconds"] > 0 and e["batch"] == 2 and not e["channels_last"]
