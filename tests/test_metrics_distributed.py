"""StreamSegMetrics.synch in a real two-process gloo group: rank 0 ends with the sum of both
confusion matrices and sample counts, rank 1 keeps its own."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys
import numpy as np
import torch
import torch.distributed as dist
from metrics import StreamSegMetrics

rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
metrics = StreamSegMetrics(3)
# rank 0: two images, rank 1: three images, different pixels
labels = np.array([[[0, 1, 2, 255]]] * (2 + rank))
preds = np.array([[[0, 2 - rank, 2, 1]]] * (2 + rank))
metrics.update(torch.from_numpy(labels), torch.from_numpy(preds))
metrics.synch(torch.device("cpu"))
json.dump({"cm": metrics.confusion_matrix.tolist(), "samples": metrics.total_samples,
           "miou": metrics.get_results(figure=False)["Mean IoU"]}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_synch_sums_on_rank_zero(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "init"),
                               str(tmp_path / f"rank{rank}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # rank 0 saw 2 x (0->0, 1->2, 2->2), rank 1 saw 3 x (0->0, 1->1, 2->2)
    assert rank0["cm"] == [[5, 0, 0], [0, 3, 2], [0, 0, 5]]
    assert rank0["samples"] == 5
    assert rank1["cm"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    assert rank1["samples"] == 3
    assert rank0["miou"] == pytest.approx((1 + 0.6 + 5 / 7) / 3, abs=1e-6)
