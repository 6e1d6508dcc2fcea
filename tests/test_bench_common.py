"""Shared benchmark pieces (bench/common.py, bench/bench_model.py): tables, the device peak
table, out-of-memory detection, the batch-size search that skips batches that do not fit,
and measurements in a fresh process."""
import operator
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_model  # noqa: E402
import common  # noqa: E402


def test_table_aligns_numbers_right_text_left_and_marks_missing_values():
    rows = [{"case": "fp32", "ips": 12.345678, "n": 2},
            {"case": "bf16 channels_last", "ips": None, "n": 16}]
    text = common.format_table([("case", "case"), ("ips", "images/s"), ("n", "batch")], rows)
    lines = text.splitlines()
    assert lines[0].split() == ["case", "images/s", "batch"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("fp32 ") and lines[2].rstrip().endswith(" 2")
    assert "12.3" in lines[2] and "12.345" not in lines[2]
    assert lines[3].split() == ["bf16", "channels_last", "-", "16"]
    # every column starts at the same place on each line
    assert len({len(line) for line in lines}) == 1


def test_peak_table_picks_the_most_specific_name_and_tf32_for_fp32(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    monkeypatch.setattr(common, "cudnn_allows_tf32", lambda: True)
    assert common.peak_tflops(cuda, "bf16") == (756.0, "H100 PCIe bf16 dense")
    assert common.peak_tflops(cuda, "fp32")[0] == 378.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(common, "cudnn_allows_tf32", lambda: False)
    assert common.peak_tflops(cuda, "fp16")[0] == 989.0
    assert common.peak_tflops(cuda, "fp32")[0] == 67.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    peak, why = common.peak_tflops(cuda, "bf16")
    assert peak is None and "--peak-tflops" in why
    assert common.peak_tflops("cpu", "fp32")[0] is None
    assert common.peak_tflops("cpu", "fp32", override=1.5) == (1.5, "--peak-tflops")


def test_out_of_memory_is_told_apart_from_other_errors():
    assert common.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert common.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate: out of memory"))
    assert not common.is_oom(RuntimeError("shape mismatch"))
    assert not common.is_oom(ValueError("out of memory"))


class OOMAbove(nn.Module):
    """A network that runs out of memory for batches larger than ``limit``."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (batch {x.shape[0]})")
        return self.net(x)


def test_batch_search_uses_the_largest_batch_that_fits(monkeypatch):
    real = bench_model.build_network
    monkeypatch.setattr(bench_model, "build_network",
                        lambda *a, **k: OOMAbove(real(*a, **k), limit=4))
    r = bench_model.measure_iteration(backbone="resnet18", size=32, batches=(2, 8, 4, 16),
                                      classes=3, warmup=0, iters=1, threads=1)
    assert r["batch"] == 4 and r["oom_batches"] == [16, 8]
    assert r["images_per_s"] == pytest.approx(4 / r["seconds"])
    with pytest.raises(torch.OutOfMemoryError, match="every batch size"):
        monkeypatch.setattr(bench_model, "build_network",
                            lambda *a, **k: OOMAbove(real(*a, **k), limit=1))
        bench_model.measure_iteration(backbone="resnet18", size=32, batches=(2, 4), classes=3,
                                      warmup=0, iters=1, threads=1)


def test_other_errors_are_not_taken_for_a_batch_that_does_not_fit(monkeypatch):
    def broken(*a, **k):
        return nn.Conv2d(1, 1, 1)  # wrong input channels: a real bug, not a batch size

    monkeypatch.setattr(bench_model, "build_network", broken)
    with pytest.raises(RuntimeError) as e:
        bench_model.measure_iteration(backbone="resnet18", size=8, batches=(2, 4), warmup=0,
                                      iters=1, threads=1)
    assert not common.is_oom(e.value)


@pytest.mark.slow
def test_isolated_runs_return_results_and_report_errors_in_one_line():
    assert common.run_isolated(operator.add, 2, 3) == 5
    with pytest.raises(common.IsolatedError, match=r"^ZeroDivisionError: .*zero") as e:
        common.run_isolated(operator.truediv, 1, 0)
    assert not e.value.oom and "\n" not in str(e.value)
    assert common.run_isolated(operator.mul, 3, 4, isolate=False) == 12
