"""CUDA RNG states in a checkpoint: each process saves its own GPU's state, and a resume
restores the state of each process's own GPU, with a warning when the numbers of processes
or of GPUs differ (no IndexError). CUDA is mocked: a device count and a recorder of the
states set, so this runs on the CPU."""
import logging

import pytest
import torch

from utils import checkpoint


class FakeCuda:
    """``count`` visible GPUs; ``set`` records (device, state); setting a state on a GPU
    that does not exist raises as torch does."""

    def __init__(self, monkeypatch, count, current=0):
        self.count, self.current, self.set = count, current, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [self.get(i) for i in range(self.count)])
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "set_rng_state", self.put)

    def index(self, device):
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return self.current if device.index is None else device.index

    def get(self, device="cuda"):
        return torch.tensor([self.index(device)], dtype=torch.uint8)

    def put(self, state, device="cuda"):
        index = self.index(device)
        if index >= self.count:
            raise IndexError(f"no GPU {index}")
        self.set.append((index, int(state[0])))


def cpu_states():
    return {k: v for k, v in checkpoint.rng_states().items() if k in ("python", "numpy", "torch")}


def test_an_older_checkpoint_of_two_gpus_resumes_where_one_is_visible(monkeypatch, caplog):
    """Files of the earlier format hold rank 0's states of every GPU it could see."""
    cuda = FakeCuda(monkeypatch, count=2)
    states = {**cpu_states(), "cuda": torch.cuda.get_rng_state_all()}
    cuda.count = 1
    with caplog.at_level(logging.WARNING):
        checkpoint.restore_rng_states(states)
    assert cuda.set == [(0, 0)]
    assert "2 GPUs" in caplog.text and "1 here" in caplog.text


def test_each_process_saves_and_restores_its_own_gpu_state(monkeypatch, caplog):
    cuda = FakeCuda(monkeypatch, count=2)
    by_rank = []
    for rank in (0, 1):
        cuda.current = rank
        by_rank.append(checkpoint.cuda_rng_state(torch.device("cuda", rank)))
    states = checkpoint.rng_states(cuda_by_rank=by_rank)
    for rank in (0, 1):
        cuda.current, cuda.set = rank, []
        with caplog.at_level(logging.WARNING):
            checkpoint.restore_rng_states(states, rank=rank, world_size=2)
        assert cuda.set == [(rank, rank)]
    assert caplog.text == ""


def test_fewer_processes_than_saved_warn_and_restore_their_own(monkeypatch, caplog):
    cuda = FakeCuda(monkeypatch, count=1)
    states = {**cpu_states(), "cuda_by_rank": [torch.tensor([7], dtype=torch.uint8),
                                               torch.tensor([8], dtype=torch.uint8)]}
    with caplog.at_level(logging.WARNING):
        checkpoint.restore_rng_states(states, rank=0, world_size=1)
    assert cuda.set == [(0, 7)]
    assert "2 processes" in caplog.text and "1 here" in caplog.text


def test_a_cpu_process_saves_no_cuda_state(monkeypatch):
    FakeCuda(monkeypatch, count=1)
    assert checkpoint.cuda_rng_state(torch.device("cpu")) is None


@pytest.mark.parametrize("saved", [None, [None]])
def test_no_cuda_state_saved_sets_none(monkeypatch, saved):
    cuda = FakeCuda(monkeypatch, count=1)
    checkpoint.restore_rng_states({**cpu_states(), "cuda_by_rank": saved})
    assert cuda.set == []
