"""The ``peak_memory_mib`` of each epoch record is that epoch's peak on CUDA, not the
process's since it started (several steps in one command, a big step 0 before a small
step 1). CUDA's memory counters are mocked, so this runs on the CPU."""
import torch

from utils.events import peak_memory


def test_each_reading_of_the_gpu_peak_starts_a_new_one(monkeypatch):
    counters = {"peak": 0, "now": 0}

    def allocate(mib):
        counters["now"] = mib
        counters["peak"] = max(counters["peak"], mib)

    def reset(device=None):
        counters["peak"] = counters["now"]

    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: counters["peak"] * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    gpu = torch.device("cuda", 0)
    allocate(900)
    allocate(100)
    assert peak_memory(gpu) == (900, "cuda")      # the first epoch's peak
    allocate(300)
    allocate(100)
    assert peak_memory(gpu) == (300, "cuda")      # the second epoch's own


def test_the_cpu_reports_the_process_peak_rss():
    mib, kind = peak_memory(torch.device("cpu"))
    assert kind == "rss" and mib > 10
