"""One SGD training iteration of the whole network, as bench/bench_model.py runs it, with
each norm implementation and precision (tiny sizes; the figures themselves are not checked)."""
import sys
from pathlib import Path

import pytest
import torch

from modules.norm import inplace_abn_available

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_model  # noqa: E402

IMPLS = ["torch"] + (["inplace_abn"] if inplace_abn_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_training_iteration_updates_the_network(impl, precision, monkeypatch):
    args = bench_model.get_parser().parse_args(
        ["--size", "32", "--backbone", "resnet18", "--iters", "1", "--warmup", "0",
         "--device", "cpu", "--threads", "1", "--classes", "3"])
    steps = []
    original_step = torch.optim.SGD.step

    def counting_step(self, *a, **kw):
        before = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        out = original_step(self, *a, **kw)
        after = [p.detach() for g in self.param_groups for p in g["params"]]
        steps.append((sum(not torch.equal(b, c) for b, c in zip(before, after)), len(before)))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    result = bench_model.measure(args, impl, precision)
    assert result["impl"] == impl and result["precision"] == precision
    # in this process the network may fit in memory freed by earlier tests (no growth of the
    # resident size), but the peak never reads below the baseline (the kernel's high-water
    # mark lags behind, and run.py's cost record resets it)
    assert result["seconds"] > 0 and result["peak_mib"] >= 0
    moved, total = steps[0]
    assert len(steps) == 1 and total == 75 and moved == total  # resnet18 + head + cls
