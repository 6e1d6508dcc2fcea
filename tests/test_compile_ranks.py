"""``--compile``'s fallback with two processes on gloo, inside DDP as the engine wraps it
(compile around DDP): compiling fails on rank 1 alone; both ranks switch to eager for the
same call (rank 0 runs it again eagerly), so their collectives stay in step, and DDP
averages the gradients as without --compile."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worker(rank, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    from utils import compile as compile_mod
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        def compile_failing_on_rank1(module):
            def run(*args, **kwargs):
                if rank == 1:
                    raise RuntimeError("backend compiler failed on this rank")
                return module(*args, **kwargs)
            return run

        torch.compile = compile_failing_on_rank1
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        wrapped = compile_mod.maybe_compile(DistributedDataParallel(net), True)
        x = torch.full((4, 3), float(rank + 1))
        wrapped(x).sum().backward()
        first = net.weight.grad.clone()
        net.zero_grad()
        wrapped(x).sum().backward()          # a second iteration, eager on both
        torch.save({"failed": wrapped.failed, "grad": first, "again": net.weight.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_compile_failure_on_one_rank_switches_both_in_step(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["failed"] for r in ranks)
    # d(sum of outputs)/dW averaged: mean over the ranks' inputs (1 and 2) times 4 rows
    want = torch.full((2, 3), 4 * 1.5)
    for r in ranks:
        torch.testing.assert_close(r["grad"], want)
        torch.testing.assert_close(r["again"], want)
