"""bench/bench_backbones.py: one row per backbone with its time and memory per image and the
ratios to the first backbone (tiny crop, in this process)."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from bench_backbones import measure_backbones  # noqa: E402


def test_rows_and_ratios_to_the_first_backbone():
    rows = measure_backbones(["resnet18", "swin_t"], size=32, batch=2, device="cpu", iters=1,
                             warmup=0, threads=1, isolate=False)
    assert [r["backbone"] for r in rows] == ["resnet18", "swin_t"]
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["time_ratio"] > 0
    assert all(r["batch"] == 2 and r["s_per_image"] > 0 for r in rows)
    assert rows[1]["time_ratio"] == pytest.approx(rows[1]["s_per_image"] / rows[0]["s_per_image"])
