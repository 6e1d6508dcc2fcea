"""The compiled In-Place ABN layers under bf16 autocast: the package has no bf16 kernels, so
its layers take the PyTorch code on the same parameters (same numbers, bit for bit, as the
pure-PyTorch layers) instead of a cast to fp32 whose fp32 output autograd keeps beside the
bf16 copy the next layer keeps. Reference: this project's pure-PyTorch layers (modules/norm.py),
themselves compared with the package in tests/test_norm.py."""
import pytest
import torch
import torch.nn as nn

from modules.norm import norm_act_factory

torch.set_num_threads(1)

C = 8


def _pair(norm_act):
    g = torch.Generator().manual_seed(0)
    ours = norm_act_factory(norm_act, "torch")(C)
    with torch.no_grad():
        w = torch.rand(C, generator=g) + 0.5
        w[::2] *= -1
        ours.weight.copy_(w)
        ours.bias.copy_(torch.randn(C, generator=g))
        ours.running_mean.copy_(torch.randn(C, generator=g))
        ours.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    theirs = norm_act_factory(norm_act, "inplace_abn")(C)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(layer, x, upstream, training):
    """Output, gradients and running statistics of one bf16 step; and the bytes of the
    activation-sized tensors autograd keeps for the layer and a 1x1 convolution after it
    (one count per storage)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 1, bias=False)
    layer.train(training)
    leaf = x.bfloat16().requires_grad_()
    storages = {}

    def pack(t):
        if t.numel() >= x.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(leaf.clone())
        z = conv(y)
    (z.float() * upstream).sum().backward()
    return {"y": y.detach(), "dx": leaf.grad, "dw": layer.weight.grad,
            "db": layer.bias.grad, "rm": layer.running_mean.clone(),
            "rv": layer.running_var.clone()}, sum(storages.values())


@pytest.mark.iabn
@pytest.mark.parametrize("norm_act", ["iabn_sync", "iabn", "abn"])
@pytest.mark.parametrize("training", [True, False])
def test_package_layers_under_bf16_are_the_pytorch_layers_bit_for_bit(norm_act, training):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, C, 6, 6, generator=g) * 2 + 0.7
    upstream = torch.randn(4, C, 6, 6, generator=g)
    ours, theirs = _pair(norm_act)
    a, kept_ours = _step(ours, x, upstream, training)
    b, kept_theirs = _step(theirs, x, upstream, training)
    assert b["y"].dtype == torch.bfloat16
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if training:  # the bf16 input and output only: 2 x 2 bytes per value, no fp32 copy
        assert kept_theirs == kept_ours == 2 * 2 * x.numel()
