"""The norm + activation family: exact formulas, the compiled package as a reference, state
dicts, dtypes and memory formats."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.norm import (
    ABN,
    BatchNorm2dAct,
    InPlaceABN,
    InPlaceABNSync,
    NormImplError,
    inplace_abn_available,
    is_norm_layer,
    norm_act_factory,
    resolve_norm_impl,
)

torch.set_num_threads(1)

C = 5


def _randomise(layer, seed=0, negative=True):
    """Weights with mixed signs (ImageNet In-Place ABN weights have some < 0), non-trivial
    running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        if negative:
            w[::2] *= -1
        layer.weight.copy_(w)
        layer.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        layer.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    return layer


def _inputs(dtype=torch.float64, seed=1, shape=(3, C, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7).to(dtype)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, upstream


def _run(layer, x, upstream, training):
    """Forward + backward of (y * upstream).sum(); the input is cloned because the package
    overwrites its input."""
    layer.train(training)
    leaf = x.clone().requires_grad_(True)
    y = layer(leaf.clone())
    (y * upstream).sum().backward()
    return {"y": y.detach(), "dx": leaf.grad, "dw": layer.weight.grad.clone(),
            "db": layer.bias.grad.clone(), "rm": layer.running_mean.clone(),
            "rv": layer.running_var.clone()}


def _reference(x, w, b, mean, var, scale, activation):
    y = scale * (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5) \
        + b.view(1, -1, 1, 1)
    return F.leaky_relu(y, 0.01) if activation == "leaky_relu" else y


@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_inplace_abn_formula_scale_is_abs_weight_plus_eps(activation, training):
    layer = _randomise(InPlaceABN(C, activation=activation).double())
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x, upstream = _inputs()
    out = _run(layer, x, upstream, training)
    w, b = layer.weight.detach(), layer.bias.detach()
    scale = (w.abs() + 1e-5).view(1, -1, 1, 1)
    if training:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() // C
        torch.testing.assert_close(out["rm"], 0.9 * rm0 + 0.1 * mean)
        torch.testing.assert_close(out["rv"], 0.9 * rv0 + 0.1 * var * n / (n - 1))
    else:
        mean, var = rm0, rv0
        torch.testing.assert_close(out["rm"], rm0, rtol=0, atol=0)
    torch.testing.assert_close(out["y"], _reference(x, w, b, mean, var, scale, activation))


def test_inplace_abn_weight_gradient_is_sign_flipped_for_negative_weights():
    x, upstream = _inputs()
    iabn = _randomise(InPlaceABN(C).double())
    abn = _randomise(ABN(C).double())
    with torch.no_grad():  # abn with weight |w| + eps computes the same output
        abn.weight.copy_(iabn.weight.abs() + 1e-5)
    a, b = _run(iabn, x, upstream, True), _run(abn, x, upstream, True)
    torch.testing.assert_close(a["y"], b["y"])
    sign = torch.where(iabn.weight.detach() < 0, -1.0, 1.0).double()
    torch.testing.assert_close(a["dw"], b["dw"] * sign)
    torch.testing.assert_close(a["dx"], b["dx"])


def test_abn_equals_batchnorm2d_plus_leaky_relu_and_std_equals_abn():
    x, upstream = _inputs()
    abn, std = _randomise(ABN(C).double()), _randomise(BatchNorm2dAct(C).double())
    bn = _randomise(nn.BatchNorm2d(C).double())
    for training in (True, False):
        a, s = _run(abn, x, upstream, training), _run(std, x, upstream, training)
        bn.train(training)
        leaf = x.clone().requires_grad_(True)
        y = F.leaky_relu(bn(leaf), 0.01)
        (y * upstream).sum().backward()
        for out in (a, s):
            torch.testing.assert_close(out["y"], y.detach())
            torch.testing.assert_close(out["dx"], leaf.grad)
            torch.testing.assert_close(out["rm"], bn.running_mean)
            torch.testing.assert_close(out["rv"], bn.running_var)
        bn.zero_grad()


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync, BatchNorm2dAct])
def test_state_dict_keys_and_num_batches_tracked_either_way(cls):
    layer = cls(C)
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert is_norm_layer(layer)
    source = _randomise(cls(C))
    with_counter = dict(source.state_dict(), num_batches_tracked=torch.tensor(7))
    layer.load_state_dict(with_counter, strict=True)
    torch.testing.assert_close(layer.running_var, source.running_var)
    cls(C).load_state_dict(dict(source.state_dict()), strict=True)


def test_sync_layer_without_process_group_is_iabn():
    assert not torch.distributed.is_initialized()
    x, upstream = _inputs()
    sync, plain = _randomise(InPlaceABNSync(C).double()), _randomise(InPlaceABN(C).double())
    for training in (True, False):
        a, b = _run(sync, x, upstream, training), _run(plain, x, upstream, training)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_factory_builds_the_chosen_variant_with_leaky_relu_and_identity_override():
    assert type(norm_act_factory("iabn_sync")(8)) is InPlaceABNSync
    assert type(norm_act_factory("iabn", "auto")(8)) is InPlaceABN
    assert type(norm_act_factory("abn")(8)) is ABN
    assert type(norm_act_factory("std")(8)) is BatchNorm2dAct
    layer = norm_act_factory("iabn")(8)
    assert (layer.activation, layer.activation_param, layer.eps, layer.momentum) == \
        ("leaky_relu", 0.01, 1e-5, 0.1)
    assert norm_act_factory("iabn")(8, activation="identity").activation == "identity"
    with pytest.raises(NormImplError, match="norm_act"):
        norm_act_factory("gn")
    with pytest.raises(ValueError, match="activation"):
        norm_act_factory("abn")(8, activation="elu_typo")


def test_resolve_norm_impl():
    assert resolve_norm_impl("auto", "cpu") == "torch"
    assert resolve_norm_impl("torch", "cuda") == "torch"
    with pytest.raises(NormImplError):
        resolve_norm_impl("fast")
    if inplace_abn_available():
        assert resolve_norm_impl("inplace_abn") == "inplace_abn"
    else:
        with pytest.raises(NormImplError, match="make iabn"):
            resolve_norm_impl("inplace_abn")


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync, BatchNorm2dAct])
def test_bf16_autocast_and_channels_last(cls):
    layer = _randomise(cls(C))
    x, _ = _inputs(torch.float32)
    ref = layer.train()(x.clone())
    layer = _randomise(cls(C))
    out = layer(x.clone().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _randomise(cls(C))(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------
# the compiled package as the reference

def _package_pair(kind, activation):
    import inplace_abn
    ours = {"iabn": InPlaceABN, "abn": ABN}[kind](C, activation=activation)
    theirs = {"iabn": inplace_abn.InPlaceABN, "abn": inplace_abn.ABN}[kind](
        C, activation=activation, activation_param=0.01)
    return _randomise(ours), _randomise(theirs)


@pytest.mark.iabn
@pytest.mark.parametrize("kind", ["iabn", "abn"])
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pure_pytorch_equals_package(kind, activation, training, dtype):
    ours, theirs = _package_pair(kind, activation)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, upstream = _inputs(dtype)
    a, b = _run(ours, x, upstream, training), _run(theirs, x, upstream, training)
    # the package's kernels hold the leaky-ReLU slope as a float32 (0.0099999998) even in
    # double precision: a 2e-8 relative difference on negative outputs
    tol = {"rtol": 1e-7, "atol": 1e-9} if dtype == torch.float64 else \
        {"rtol": 1e-4, "atol": 1e-5}
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=f"{key} differs")


@pytest.mark.iabn
def test_weight_gradient_at_zero_weight_matches_package():
    ours, theirs = _package_pair("iabn", "leaky_relu")
    with torch.no_grad():
        ours.weight[1] = 0.0
        theirs.weight[1] = 0.0
    x, upstream = _inputs(torch.float64)
    a, b = _run(ours.double(), x, upstream, True), _run(theirs.double(), x, upstream, True)
    assert a["dw"][1] != 0
    torch.testing.assert_close(a["dw"], b["dw"])


@pytest.mark.iabn
@pytest.mark.parametrize("norm_act", ["iabn_sync", "iabn", "abn"])
def test_package_backed_layers_have_the_same_keys_and_numbers(norm_act):
    theirs = norm_act_factory(norm_act, "inplace_abn")(C)
    ours = norm_act_factory(norm_act, "torch")(C)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert is_norm_layer(theirs)
    _randomise(ours)
    theirs.load_state_dict(dict(ours.state_dict(), num_batches_tracked=torch.tensor(3)))
    x, upstream = _inputs(torch.float32)
    for training in (True, False):
        a, b = _run(ours, x, upstream, training), _run(theirs, x, upstream, training)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the package takes no bf16 itself
        assert theirs.train()(x.bfloat16()).dtype == torch.bfloat16
