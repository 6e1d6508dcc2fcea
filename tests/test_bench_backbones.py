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


def test_a_backbone_that_fails_is_a_row_with_its_error_and_the_run_exits_1(tmp_path,
                                                                         monkeypatch):
    import json

    import bench_backbones

    import common

    def fake(fn, isolate, backbone, **kwargs):  # what run_isolated returns, or raises
        if backbone == "swin_b":
            raise common.IsolatedError("OutOfMemoryError: CUDA out of memory", oom=True)
        return {"batch": 6, "seconds": 0.75, "peak_mib": 12000.0}

    monkeypatch.setattr(common, "run_isolated", fake)
    path = tmp_path / "rows.json"
    assert bench_backbones.main(["--batch", "6", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["rows"]
    assert rows[0] == {"backbone": "resnet101", "size": 128, "batch": 6, "s_per_image": 0.125,
                       "peak_mib_per_image": 2000.0, "time_ratio": 1.0, "memory_ratio": 1.0}
    assert rows[1]["error"].startswith("OutOfMemoryError") and rows[1]["oom"]
    assert rows[1]["time_ratio"] is None
