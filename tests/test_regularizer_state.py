"""Regulariser penalties with a previous step's state, the original-format state round trip
and its resume quirks, the full (crash-resume) state, make_regularizer (the regulariser of
the options), and the promise that updates and penalties never leave the device nor
synchronise with the host."""
import io
import logging

import pytest
import torch

from argparser import build_options
from methods.regularizers import make_regularizer
from utils.regularizer import EWC, PI, RW, RegularizerError

V_OLD = [[0.0, 1.0], [-1.0, 2.0]]
W_OLD = [0.5, -0.5]
V_NOW = [[1.0, 2.0], [1.0, 1.0]]          # v - v_old = [[1, 1], [2, -1]]
W_NOW = [1.0, 1.5]                         # w - w_old = [0.5, 2]
IMPORTANCE_V = [[0.5, 2.0], [1.0, 0.0]]    # normalised: [[0.25, 1], [0.5, 0]]
IMPORTANCE_W = [3.0, 1.0]                  # normalised: [1, 0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


class Old(torch.nn.Module):
    def __init__(self, v=V_OLD, w=W_OLD):
        super().__init__()
        self.v = torch.nn.Parameter(t(v))
        self.w = torch.nn.Parameter(t(w))


class New(Old):
    """The old parameters plus a new classifier the old model does not have."""

    def __init__(self, v=V_NOW, w=W_NOW):
        super().__init__(v, w)
        self.new_cls = torch.nn.Parameter(t([3.0, -3.0]))


def previous(values_v=IMPORTANCE_V, values_w=IMPORTANCE_W, prefix="module."):
    return {prefix + "v": t(values_v), prefix + "w": t(values_w)}


def shift_new_cls(model):
    with torch.no_grad():
        model.new_cls.add_(1.0)               # must not count in any penalty


def test_ewc_penalty_uses_normalised_previous_fisher():
    model = New()
    reg = EWC(model, Old(), "cpu", fisher=previous())
    shift_new_cls(model)
    assert reg.penalty().item() == pytest.approx(0.25 + 1 + 2 + 1 * 0.25, rel=1e-7)
    raw = EWC(model, Old(), "cpu", fisher=previous(), normalize=False)
    assert raw.penalty().item() == pytest.approx(0.5 + 2 + 4 + 3 * 0.25 + 4, rel=1e-12)


def test_penalty_gradient_is_twice_weight_times_displacement():
    model = New()
    reg = EWC(model, Old(), "cpu", fisher=previous(), normalize=False)
    (3.0 * reg.penalty()).backward()
    torch.testing.assert_close(model.v.grad, 6 * t(IMPORTANCE_V) * (t(V_NOW) - t(V_OLD)))
    torch.testing.assert_close(model.w.grad, 6 * t(IMPORTANCE_W) * (t(W_NOW) - t(W_OLD)))
    assert model.new_cls.grad is None


def test_frozen_parameters_are_not_penalised():
    model = New()
    model.v.requires_grad_(False)
    reg = EWC(model, Old(), "cpu", fisher=previous(), normalize=False)
    assert reg.penalty().item() == pytest.approx(3 * 0.25 + 4)


def test_pi_penalty_uses_old_model_and_normalised_previous_score():
    model = New()
    reg = PI(model, Old(), "cpu", score=previous(prefix=""), normalize=True)
    shift_new_cls(model)
    assert reg.penalty().item() == pytest.approx(3.5, rel=1e-7)
    # the new classifier's reference is its value when the step started
    torch.testing.assert_close(reg.starting_model["module.new_cls"], t([3.0, -3.0]))


def test_rw_penalty_sums_normalised_fisher_and_score():
    model = New()
    fisher = previous([[0.0, 1.0], [2.0, 4.0]], [1.0, 3.0])   # norm: [[0,.25],[.5,1]], [0,1]
    reg = RW(model, Old(), "cpu", fisher=fisher, score=previous())
    shift_new_cls(model)
    expected = (0.25 + 0 * 1) + (1 + 0.25) * 1 + (0.5 + 0.5) * 4 + (0 + 1) * 1 \
        + (1 + 0) * 0.25 + (0 + 1) * 4
    assert reg.penalty().item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("make", [
    lambda m: EWC(m, None, "cpu", fisher=previous()),
    lambda m: EWC(m, Old(), "cpu"),
    lambda m: PI(m, None, "cpu", score=previous()),
    lambda m: PI(m, Old(), "cpu"),
    lambda m: RW(m, None, "cpu", score=previous(), fisher=previous()),
    lambda m: RW(m, Old(), "cpu", score=previous()),          # fisher missing
])
def test_penalty_is_the_float_zero_without_old_model_or_previous_state(make):
    penalty = make(New()).penalty()
    assert isinstance(penalty, float) and penalty == 0.0


def test_state_keys_accept_and_produce_the_module_prefix():
    with_prefix = EWC(New(), Old(), "cpu", fisher=previous(prefix="module."))
    without = EWC(New(), Old(), "cpu", fisher=previous(prefix=""))
    assert sorted(without.state_dict()["fisher"]) == ["module.new_cls", "module.v", "module.w"]
    assert with_prefix.penalty().item() == without.penalty().item()


def grad_step(model, k):
    """Deterministic gradient and move for iteration k."""
    g = torch.Generator().manual_seed(100 + k)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)


def train(model, reg, ks):
    for k in ks:
        grad_step(model, k)
        reg.update()
        grad_step(model, 1000 + k)          # the "optimiser step" after the update


def test_ewc_state_round_trip():
    model = New()
    reg = EWC(model, Old(), "cpu", fisher=previous(), alpha=0.7)
    train(model, reg, range(3))
    state = reg.state_dict()
    other = EWC(New(), Old(), "cpu", fisher=previous())
    other.load_state_dict(state)
    assert other.alpha == 0.7
    for k, v in reg.fisher.items():
        assert torch.equal(other.fisher[k], v)
    # the saved dictionary is a snapshot, not a view of the running estimate
    train(model, reg, [3])
    assert not torch.equal(state["fisher"]["module.v"], reg.fisher["module.v"])


def test_pi_state_round_trip_restores_delta_and_new_classifier_reference():
    model = New()
    reg = PI(model, Old(), "cpu", score=previous())
    train(model, reg, range(3))
    state = reg.state_dict()
    fresh_model = New(v=[[9.0, 9.0], [9.0, 9.0]])
    with torch.no_grad():
        fresh_model.new_cls.fill_(7.0)       # a differently initialised new classifier
    other = PI(fresh_model, Old(), "cpu", score=previous())
    other.load_state_dict(state)
    for k, v in reg.delta.items():
        assert torch.equal(other.delta[k], v)
    torch.testing.assert_close(other.model_old_dict["module.new_cls"], t([3.0, -3.0]))


def test_rw_resume_re_averages_the_saved_score():
    model = New()
    s_prev = previous([[2.0, 4.0], [6.0, 8.0]], [10.0, 12.0])
    reg = RW(model, Old(), "cpu", fisher=previous(), score=s_prev, iterations=1)
    train(model, reg, range(4))
    saved = reg.state_dict()
    assert saved["iteration"] == 1
    resumed = RW(New(), Old(), "cpu", fisher=previous(), score=s_prev, iterations=10)
    resumed.load_state_dict(saved)
    assert resumed.iterations == 1
    for k, v in reg.fisher.items():
        assert torch.equal(resumed.fisher[k], v)
    again = resumed.state_dict()["score"]
    for k in ("module.v", "module.w"):           # the resume quirk of the original
        torch.testing.assert_close(again[k], 0.5 * (saved["score"][k] + s_prev[k]))


def roundtrip_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", [
    lambda m: EWC(m, Old(), "cpu", fisher=previous()),
    lambda m: EWC(m, None, "cpu"),
    lambda m: PI(m, Old(), "cpu", score=previous()),
    lambda m: PI(m, None, "cpu"),
    lambda m: RW(m, Old(), "cpu", fisher=previous(), score=previous(), iterations=2),
    lambda m: RW(m, None, "cpu", iterations=3),
], ids=["ewc", "ewc0", "pi", "pi0", "rw", "rw0"])
def test_full_state_continues_exactly_after_a_crash(make):
    model = New()
    reg = make(model)
    train(model, reg, range(5))
    crash = roundtrip_bytes(reg.full_state())

    resumed_model = New()
    resumed_model.load_state_dict(model.state_dict())
    resumed = make(resumed_model)
    resumed.load_full_state(crash)
    train(model, reg, range(5, 9))
    train(resumed_model, resumed, range(5, 9))

    a, b = reg.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert value.keys() == b[key].keys()
            for name in value:
                assert torch.equal(value[name], b[key][name]), (key, name)
        else:
            assert value == b[key]
    pa, pb = reg.penalty(), resumed.penalty()
    assert (pa == pb) if isinstance(pa, float) else torch.equal(pa, pb)


def test_original_state_alone_does_not_continue_rw_exactly():
    # why full_state exists: the counter and snapshot are not in the original format
    model = New()
    reg = RW(model, None, "cpu", iterations=2)
    train(model, reg, range(5))
    resumed_model = New()
    resumed_model.load_state_dict(model.state_dict())
    resumed = RW(resumed_model, None, "cpu", iterations=2)
    resumed.load_state_dict(reg.state_dict())
    train(model, reg, range(5, 9))
    train(resumed_model, resumed, range(5, 9))
    assert not torch.equal(reg.score["module.v"], resumed.score["module.v"])


def test_full_state_of_another_regulariser_is_refused():
    reg = PI(New(), None, "cpu")
    with pytest.raises(RegularizerError, match="not a full pi"):
        reg.load_full_state(EWC(New(), None, "cpu").full_state())


def every_tensor(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from every_tensor(v)


class HostSyncForbidden:
    """Makes the usual host-synchronising tensor calls raise while active."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        def forbidden(*args, **kwargs):
            raise AssertionError("host synchronisation inside update/penalty")
        for name in self.NAMES:
            self.monkeypatch.setattr(torch.Tensor, name, forbidden)

    def __exit__(self, *exc):
        self.monkeypatch.undo()


@pytest.mark.parametrize("make", [
    lambda m: EWC(m, Old(), "cpu", fisher=previous()),
    lambda m: PI(m, Old(), "cpu", score=previous()),
    lambda m: RW(m, Old(), "cpu", fisher=previous(), score=previous(), iterations=2),
], ids=["ewc", "pi", "rw"])
def test_updates_and_penalty_stay_on_device_without_host_sync(make, monkeypatch):
    model = New()
    reg = make(model)
    for k in range(4):
        grad_step(model, k)
        with HostSyncForbidden(monkeypatch):
            reg.update()
            penalty = reg.penalty()
            penalty.backward()
    tensors = list(every_tensor(reg.full_state())) + list(every_tensor(reg.state_dict()))
    assert tensors and all(x.device == reg.device for x in tensors)
    params = {p.data_ptr() for p in model.parameters()}
    assert not any(x.data_ptr() in params for x in every_tensor(reg.full_state()))


def opts(regularizer, **kw):
    return build_options(regularizer=regularizer, **kw)


def test_make_regularizer_builds_the_named_one_from_the_previous_state():
    assert make_regularizer(New(), Old(), "cpu", opts(None), None) is None
    ewc = make_regularizer(New(), Old(), "cpu", opts("ewc", reg_alpha=0.5),
                           {"name": "ewc", "fisher": previous(), "alpha": 0.9})
    assert isinstance(ewc, EWC) and ewc.alpha == 0.5 and ewc.penalize and ewc.normalize
    rw = make_regularizer(New(), Old(), "cpu", opts("rw", reg_iterations=4,
                                                    reg_no_normalize=True), None)
    assert isinstance(rw, RW) and rw.iterations == 4 and not rw.normalize
    assert rw.penalty() == 0.0
    pi = make_regularizer(New(), Old(), "cpu", opts("pi"), {"name": "pi", "score": previous()})
    assert isinstance(pi, PI) and pi.penalize


def test_make_regularizer_warns_on_a_different_previous_regulariser(caplog):
    rw_state = {"name": "rw", "score": previous(), "fisher": previous(), "iteration": 10,
                "alpha": 0.9}
    with caplog.at_level(logging.WARNING, logger="utils.regularizer"):
        ewc = make_regularizer(New(), Old(), "cpu", opts("ewc"), rw_state)
    assert isinstance(ewc, EWC) and ewc.penalize
    assert "rw" in caplog.text and "ewc" in caplog.text
    with pytest.raises(RegularizerError, match="'fisher'.*same --method"):
        make_regularizer(New(), Old(), "cpu", opts("rw"), {"name": "pi", "score": previous()})
