"""EWC, PI and RW updates on the 5-iteration toy example: a single 2-element parameter,
gradients set by hand, and the parameter moved by hand along the iterates that SGD with
lr 0.5 would produce (alpha 0.9, Fisher starting at 1, reference = initial value)."""
import pytest
import torch

from utils.regularizer import EWC, PI, RW, RegularizerError, normalize_fn

GRADS = [[0.2, -0.1], [0.1, 0.3], [-0.2, 0.05], [0.05, 0.1], [0.3, -0.2]]
ITERATES = [[1.0, -0.5], [0.9, -0.45], [0.85, -0.6], [0.95, -0.625], [0.925, -0.675],
            [0.775, -0.575]]          # the last one = parameters at save time
FISHER_AFTER_5 = [0.0816076, 0.0370144]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


class OneParam(torch.nn.Module):
    def __init__(self, value=ITERATES[0]):
        super().__init__()
        self.w = torch.nn.Parameter(t(value))


def move(model, k):
    """Put the model at iterate k with the gradient of iterate k."""
    with torch.no_grad():
        model.w.copy_(t(ITERATES[k]))
    model.w.grad = t(GRADS[k]) if k < len(GRADS) else None


def walk(model, reg, iterations=range(5), after=None):
    for k in iterations:
        move(model, k)
        reg.update()
        if after:
            after(k)
    move(model, 5)


def close(actual, expected, rtol=1e-8):
    torch.testing.assert_close(actual, t(expected), rtol=rtol, atol=1e-10)


def test_normalisation_is_min_max_per_tensor():
    close(normalize_fn(t([[0.5, 2.0], [1.0, 0.0]])), [[0.25, 1.0], [0.5, 0.0]], rtol=1e-7)


def test_ewc_fisher_is_a_moving_average_weighted_on_the_newest_gradient():
    model = OneParam()
    reg = EWC(model, None, "cpu")
    walk(model, reg)
    state = reg.state_dict()
    assert state["name"] == "ewc" and state["alpha"] == 0.9
    assert list(state["fisher"]) == ["module.w"]
    close(state["fisher"]["module.w"], FISHER_AFTER_5)


def test_rw_score_every_second_call_uses_the_fisher_before_the_update():
    model = OneParam()
    reg = RW(model, None, "cpu", iterations=2)
    seen = {}
    walk(model, reg, after=lambda k: seen.__setitem__(k, reg.score["module.w"].clone()))
    close(seen[1], [0.0, 0.0])
    close(seen[2], [-117.98945961, 10.88115601])
    close(seen[3], [-117.98945961, 10.88115601])
    close(seen[4], [-1433.87512377, -514.69697994])
    state = reg.state_dict()
    assert state["name"] == "rw" and state["iteration"] == 2 and state["alpha"] == 0.9
    close(state["score"]["module.w"], [0.0, 0.0])             # negative scores are clamped
    close(state["fisher"]["module.w"], FISHER_AFTER_5)


def test_rw_score_with_period_one():
    model = OneParam()
    reg = RW(model, None, "cpu", iterations=1)
    seen = {}
    walk(model, reg, after=lambda k: seen.__setitem__(k, reg.score["module.w"].clone()))
    increments = [[14.70566609, -110.08366358], [-353.85704176, 7.25419171],
                  [-26.13559145, 697.35006974], [3929.27308448, -788.02206462]]
    close(seen[0], [0.0, 0.0])
    for k, inc in enumerate(increments, start=1):
        close(seen[k] - seen[k - 1], inc, rtol=1e-7)
    close(seen[4], [3563.98611737, -193.50146675])
    close(reg.state_dict()["score"]["module.w"], [3563.98611737, 0.0])


def test_rw_saved_score_is_averaged_with_the_previous_one():
    model = OneParam()
    # the previous step's Fisher is all ones, so the walk is the same as above
    reg = RW(model, OneParam(), "cpu", iterations=1, score={"w": t([2.0, 4.0])},
             fisher={"w": t([1.0, 1.0])})
    walk(model, reg)
    close(reg.state_dict()["score"]["module.w"], [1782.99305868, 2.0])


def test_pi_path_integral_and_saved_score():
    model = OneParam()
    reg = PI(model, None, "cpu")
    walk(model, reg)
    state = reg.state_dict()
    assert state["name"] == "pi" and state["starting_model"] == {}
    close(state["delta"]["module.w"], [0.0025, -0.015])
    close(state["score"]["module.w"], [0.04938272, 0.0], rtol=1e-6)


def test_pi_saved_score_is_summed_with_the_previous_one():
    model = OneParam()
    reg = PI(model, OneParam(), "cpu", score={"module.w": t([1.0, 2.0])}, normalize=True)
    walk(model, reg)
    close(reg.state_dict()["score"]["module.w"], [1.04938272, 2.0], rtol=1e-6)


def test_pi_skips_parameters_without_gradient():
    model = OneParam()
    reg = PI(model, None, "cpu")
    move(model, 0)
    reg.update()
    move(model, 1)
    model.w.grad = None
    reg.update()
    close(reg.delta["module.w"], [0.0, 0.0])
    close(reg.model_temp["module.w"], ITERATES[1])     # the snapshot still follows


def test_ewc_names_the_parameter_without_gradient():
    model = OneParam()
    reg = EWC(model, None, "cpu")
    with pytest.raises(RegularizerError, match=r"module\.w.*--fix_bn"):
        reg.update()


def test_rw_counter_is_not_reset_and_snapshot_is_a_copy():
    model = OneParam()
    reg = RW(model, None, "cpu", iterations=3)
    walk(model, reg, iterations=range(4))
    assert reg.count == 4
    # snapshot taken at the 4th call (count 3), unaffected by moving the model afterwards
    close(reg.model_temp["module.w"], ITERATES[3])
    assert reg.model_temp["module.w"].data_ptr() != model.w.data_ptr()
