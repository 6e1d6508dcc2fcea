"""The regulariser inside the Trainer (docs/behaviour.md §9, §10.4, §10.10): the penalty's
gradient is added to the task gradient once, with its weight; update() sees the task
gradient alone (before the penalty's, unscaled under an fp16 loss scaler); step 0 has no
penalty; and one iteration runs in the original's order."""
import pytest
import torch
from trainer_helpers import (
    RecordingSGD,
    TinySegNet,
    batch,
    ce,
    grads_of,
    min_max,
    options,
    regularizer_of,
)

from engine import evaluate
from train import Trainer
from utils.scheduler import PolyLR

CPU = torch.device("cpu")
OLD, NEW = 4, 2
OLD_NAMES = ("body.weight", "body.bias", "cls.0.weight", "cls.0.bias")


def importances(seed):
    """Positive per-element importances of the old model's parameters (prefixed names)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in TinySegNet([OLD]).named_parameters()}
    return {f"module.{n}": torch.rand(shapes[n], generator=g) + 0.1 for n in OLD_NAMES}


def previous_state(name):
    if name == "ewc":
        return {"name": "ewc", "fisher": importances(10), "alpha": 0.9}
    if name == "pi":
        return {"name": "pi", "score": importances(11), "delta": {}, "starting_model": {}}
    return {"name": "rw", "score": importances(12), "fisher": importances(13), "iteration": 10,
            "alpha": 0.9}


def penalty_weights(name, state):
    """The fixed penalty weights of §9: normalised Fisher (EWC), normalised score (PI),
    normalised Fisher + normalised score (RW)."""
    if name == "ewc":
        return {k: min_max(v) for k, v in state["fisher"].items()}
    if name == "pi":
        return {k: min_max(v) for k, v in state["score"].items()}
    return {k: min_max(state["fisher"][k]) + min_max(state["score"][k]) for k in state["fisher"]}


def expected_penalty(model, model_old, weights):
    old = dict(model_old.named_parameters())
    total = 0.0
    for n, p in model.named_parameters():
        if f"module.{n}" in weights:
            total = total + (weights[f"module.{n}"] * (p - old[n].detach()) ** 2).sum()
    return total


def step1(method, amp="off"):
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    for p in model_old.parameters():
        p.requires_grad_(False)
    state = previous_state(method.lower())
    trainer = Trainer(model, model_old, CPU, options("--method", method, "--step", "1", amp=amp),
                      trainer_state={"regularizer": state}, classes=[OLD, NEW])
    return model, model_old, state, trainer


@pytest.mark.parametrize("method,importance", [("EWC", 500), ("PI", 500), ("RW", 100)])
def test_penalty_gradient_is_added_once_with_its_weight(method, importance):
    model, model_old, state, trainer = step1(method)
    images, labels = batch(0, OLD + NEW)
    params = list(model.parameters())
    z, _ = model(images)
    penalty = expected_penalty(model, model_old, penalty_weights(method.lower(), state))
    assert float(penalty.detach()) > 0
    reference = [a + importance * b for a, b in zip(grads_of(ce(z, labels), params),
                                                    grads_of(penalty, params))]
    optim = RecordingSGD(params)
    epoch_loss, reg_loss = trainer.train(0, optim, [(images, labels)])
    for got, want in zip(optim.seen[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert epoch_loss == pytest.approx(float(ce(z, labels).detach()), rel=1e-5)
    assert reg_loss == pytest.approx(importance * float(penalty.detach()), rel=1e-5)


def test_ewc_update_sees_the_task_gradient_before_the_penalty_is_added():
    model, model_old, state, trainer = step1("EWC")
    images, labels = batch(1, OLD + NEW)
    params = dict(model.named_parameters())
    z, _ = model(images)
    task = dict(zip(params, grads_of(ce(z, labels), list(params.values()))))
    trainer.train(0, RecordingSGD(params.values()), [(images, labels)])
    fisher = regularizer_of(trainer).state_dict()["fisher"]
    for n in params:
        before = state["fisher"].get(f"module.{n}", torch.ones_like(params[n]))
        torch.testing.assert_close(fisher[f"module.{n}"], 0.9 * task[n] ** 2 + 0.1 * before,
                                   rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["EWC", "PI", "RW"])
def test_step0_has_no_penalty_but_collects_importances(method):
    model = TinySegNet([OLD], seed=1)
    # RW scores every --reg_iterations updates, the first one only takes a snapshot
    trainer = Trainer(model, None, CPU, options("--method", method, "--reg_iterations", "1"),
                      classes=[OLD])
    images, labels = batch(2, OLD)
    params = list(model.parameters())
    z, _ = model(images)
    reference = grads_of(ce(z, labels), params)
    optim = RecordingSGD(params, lr=0.1)
    _, reg_loss = trainer.train(0, optim, [(images, labels), batch(3, OLD)])
    for got, want in zip(optim.seen[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert reg_loss == 0.0
    state = trainer.state_dict()["regularizer"]
    keys = {"EWC": ["fisher"], "PI": ["score"], "RW": ["score", "fisher"]}[method]
    for key in keys:
        assert set(state[key]) == {f"module.{n}" for n in OLD_NAMES}
        assert any(float(v.abs().sum()) > 0 for v in state[key].values())


def test_fp16_loss_scaler_regulariser_sees_unscaled_gradients():
    model, model_old, state, trainer = step1("EWC", amp="fp16")
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() >= 2 ** 10
    images, labels = batch(4, OLD + NEW)
    params = dict(model.named_parameters())
    z, _ = model(images)           # float32 reference: fp16 autocast rounds at ~1e-3
    task = grads_of(ce(z, labels), list(params.values()))
    penalty = grads_of(expected_penalty(model, model_old, penalty_weights("ewc", state)),
                       list(params.values()))
    optim = RecordingSGD(params.values())
    trainer.train(0, optim, [(images, labels)])
    assert len(optim.seen) == 1, "the scaler skipped the step (overflow)"
    for got, t, p in zip(optim.seen[0], task, penalty):
        torch.testing.assert_close(got, t + 500 * p, rtol=2e-2, atol=2e-3)
    fisher = regularizer_of(trainer).state_dict()["fisher"]
    for (n, _), t in zip(params.items(), task):
        before = state["fisher"].get(f"module.{n}", torch.ones_like(t))
        torch.testing.assert_close(fisher[f"module.{n}"], 0.9 * t ** 2 + 0.1 * before,
                                   rtol=2e-2, atol=1e-4)


def spy_on(trainer, model, model_old, max_iters, events):
    """Record the order of the operations of each iteration; returns the optimiser and the
    scheduler."""
    if model_old is not None:
        model_old.register_forward_hook(lambda *_: events.append("old forward"))
    model.register_forward_hook(lambda *_: events.append("forward"))
    model.body.weight.register_hook(lambda g: events.append("backward"))

    def wrap(obj, attr, name, check=None):
        real = getattr(obj, attr)

        def spy(*args, **kwargs):
            events.append(name)
            if check:
                check()
            return real(*args, **kwargs)
        setattr(obj, attr, spy)

    def grads_present():
        assert model.body.weight.grad is not None, "update() ran before the task backward"
    optim = RecordingSGD(model.parameters(), lr=0.01, events=events)
    scheduler = PolyLR(optim, max_iters=max_iters)
    wrap(scheduler, "step", "scheduler")
    wrap(regularizer_of(trainer), "update", "update", grads_present)
    wrap(regularizer_of(trainer), "penalty", "penalty")
    return optim, scheduler


def test_one_iteration_runs_in_the_original_order():
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    opts = options("--method", "ILT", "--regularizer", "ewc", "--step", "1")
    trainer = Trainer(model, model_old, CPU, opts,
                      trainer_state={"regularizer": previous_state("ewc")}, classes=[OLD, NEW])
    events = []
    optim, scheduler = spy_on(trainer, model, model_old, 2, events)
    trainer.train(0, optim, [batch(5, OLD + NEW), batch(6, OLD + NEW)], scheduler=scheduler)
    one = ["old forward", "zero_grad", "forward", "backward", "update", "penalty", "backward",
           "step", "scheduler"]
    assert events == one * 2


def test_step0_regulariser_iteration_has_no_penalty_backward():
    model = TinySegNet([OLD], seed=1)
    trainer = Trainer(model, None, CPU, options("--method", "EWC"), classes=[OLD])
    events = []
    optim, scheduler = spy_on(trainer, model, None, 1, events)
    trainer.train(0, optim, [batch(7, OLD)], scheduler=scheduler)
    assert events == ["zero_grad", "forward", "backward", "update", "penalty", "step",
                      "scheduler"]


def test_validation_reports_the_penalty_unweighted():
    model, model_old, state, trainer = step1("EWC")
    from metrics import StreamSegMetrics
    images, labels = batch(8, OLD + NEW)
    penalty = float(expected_penalty(model, model_old, penalty_weights("ewc", state)).detach())
    with torch.no_grad():
        class_loss = float(ce(model(images)[0], labels))
    evaluation = evaluate(model, [(images, labels)], StreamSegMetrics(OLD + NEW), CPU,
                          losses=trainer.validation_losses)
    got_class, got_reg = evaluation.loss
    assert got_class == pytest.approx(class_loss, rel=1e-5)
    assert got_reg == pytest.approx(penalty, rel=1e-5)      # not 500 x penalty
