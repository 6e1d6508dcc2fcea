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


def recording_compile(seen):
    """A torch.compile stand-in that runs the module and notes whether the backward graph
    would be compiled with the forward."""
    def compile_(module):
        def run(*a, **k):
            from torch._functorch import config
            seen.append(getattr(config, "force_non_lazy_backward_lowering", None))
            return module(*a, **k)
        return run
    return compile_


def test_a_compile_failure_on_another_process_switches_this_one_too(monkeypatch):
    """The ranks agree (an all-reduce of the failure flag, mocked here): the compiled call
    that worked here is run again eagerly, and every later call is eager."""
    seen, asked = [], []
    monkeypatch.setattr(torch, "compile", recording_compile(seen))
    monkeypatch.setattr(compile_mod.distributed, "any_process",
                        lambda flag, device: asked.append(flag) or True)
    net = nn.Linear(3, 2)
    wrapped = compile_mod.maybe_compile(net, True)
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), net(x)) and wrapped.failed
    assert asked == [False]          # this process had no failure of its own
    wrapped(x)
    assert len(seen) == 1 and asked == [False]


def test_the_backward_graph_is_compiled_with_the_forward(monkeypatch):
    """So that a backward-time compile failure is caught (and agreed on) in the forward."""
    seen = []
    monkeypatch.setattr(torch, "compile", recording_compile(seen))
    wrapped = compile_mod.maybe_compile(nn.Linear(3, 2), True)
    wrapped(torch.randn(1, 3))
    assert seen == [True] and not wrapped.failed
    from torch._functorch import config
    assert config.force_non_lazy_backward_lowering is False


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error"),
    torch.distributed.DistBackendError("NCCL communicator was aborted"),
])
def test_real_cuda_and_nccl_errors_are_raised_not_retried_eagerly(monkeypatch, error):
    def failing(module):
        def run(*a, **k):
            raise error
        return run

    monkeypatch.setattr(torch, "compile", failing)
    wrapped = compile_mod.maybe_compile(nn.Linear(3, 2), True)
    with pytest.raises(type(error)):
        wrapped(torch.randn(1, 3))
    assert not wrapped.failed
