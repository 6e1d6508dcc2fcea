"""Process set-up with more processes on a node than GPUs it can see: one clear line (the
GPU count is mocked, so this runs on the CPU)."""
import pytest
import torch

from utils import distributed
from utils.errors import UserError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_process_gets_its_own_gpu(two_gpus, local_rank):
    assert distributed.resolve_device("auto", local_rank) == torch.device("cuda", local_rank)


def test_more_processes_than_gpus_is_one_clear_line(two_gpus):
    with pytest.raises(UserError) as error:
        distributed.resolve_device("auto", 2)
    message = str(error.value)
    assert "\n" not in message
    assert "local rank 2" in message and "2 GPUs" in message and "--nproc_per_node" in message


def test_a_cpu_run_needs_no_gpu(two_gpus):
    assert distributed.resolve_device("cpu", 5) == torch.device("cpu")


def test_run_prints_it_as_one_error_line(two_gpus, monkeypatch, capsys):
    import run
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(SystemExit) as stop:
        run.main(["--task", "15-5", "--no_progress"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "local rank 3" in err and "\n" not in err
