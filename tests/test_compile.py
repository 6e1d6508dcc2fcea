"""--compile: torch.compile when it works, the eager module when compiling fails."""
import pytest
import torch
import torch.nn as nn

from utils import compile as compile_mod


def test_failing_compile_falls_back_to_eager_and_stays_there(monkeypatch):
    calls = {"compiled": 0}

    def broken_compile(module):
        def run(*a, **k):
            calls["compiled"] += 1
            raise RuntimeError("backend compiler failed\nlong details")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = nn.Linear(3, 2)
    wrapped = compile_mod.maybe_compile(net, True)
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), net(x)) and wrapped.failed
    wrapped(x)
    assert calls["compiled"] == 1  # not retried
    # the wrapper adds no parameters of its own and keeps the module's state dict names
    assert list(wrapped.state_dict()) == ["module.weight", "module.bias"]
    assert compile_mod.maybe_compile(net, False) is net


@pytest.mark.slow
def test_real_compile_gives_the_eager_result():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    wrapped = compile_mod.maybe_compile(net, True)
    x = torch.randn(2, 3, 8, 8)
    out = wrapped(x)
    assert not wrapped.failed
    torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
    # the compiled module is not a second copy of the parameters in the state dict
    assert list(wrapped.state_dict()) == ["module." + k for k in net.state_dict()]
    assert len(list(wrapped.parameters())) == len(list(net.parameters()))


def test_out_of_memory_is_not_taken_for_a_compile_failure(monkeypatch):
    def out_of_memory(module):
        def run(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return run

    monkeypatch.setattr(torch, "compile", out_of_memory)
    wrapped = compile_mod.maybe_compile(nn.Linear(3, 2), True)
    with pytest.raises(torch.OutOfMemoryError):
        wrapped(torch.randn(1, 3))
    assert not wrapped.failed
