"""Process setup and collective helpers for one code path: a plain single process,
``torchrun`` (rank from the environment) or the legacy ``torch.distributed.launch``.

Without a launcher there is no process group at all and every helper here is a no-op."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import RunError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def distributed(self):
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self):
        return self.rank == 0


_CONTEXT = None


def context():
    """The process context the entry point set up (``setup``); a plain single process when
    there is none, or the process group's rank and size when one was made by other code
    (tests that spawn processes themselves)."""
    if _CONTEXT is not None:
        return _CONTEXT
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistContext()


def launched_by_launcher():
    """torchrun and the legacy launcher export WORLD_SIZE, RANK and MASTER_ADDR."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device(device_opt, local_rank):
    """``auto``: the GPU of this process when CUDA is available, else the CPU."""
    if device_opt == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:   # two ranks on one GPU: NCCL would refuse them at the first call
        raise RunError(f"the process of local rank {local_rank} has no GPU of its own: "
                       f"{count} GPUs are visible on this node; start at most {count} "
                       f"processes per node (torchrun --nproc_per_node {count}), or pass "
                       "--device cpu")
    return torch.device("cuda", local_rank)


def setup(device_opt="auto", local_rank=0):
    """Create the process group when launched by a launcher; ``nccl`` on CUDA, ``gloo`` on CPU."""
    global _CONTEXT
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
    device = resolve_device(device_opt, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not launched_by_launcher():
        _CONTEXT = DistContext(rank=0, world_size=1, local_rank=local_rank, device=device)
        return _CONTEXT
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(minutes=30), **kwargs)
    _CONTEXT = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=local_rank, device=device, backend=backend)
    return _CONTEXT


def cleanup():
    global _CONTEXT
    _CONTEXT = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def reduce_sum_to_main(tensor):
    """Sum ``tensor`` over processes into rank 0 (in place); other ranks keep partial values."""
    if dist.is_initialized():
        dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sum(tensor):
    """Sum ``tensor`` over processes, in place, on every process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src=0):
    """Send a picklable object from ``src`` to every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """Every process's ``obj``, in rank order, on every process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_process(flag, device):
    """True on every process when ``flag`` is true on at least one (for agreed early exits)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _shared_outcome(run_here, fn):
    """Run ``fn`` where ``run_here``; every process learns whether it failed on rank 0."""
    result, error = None, None
    if run_here:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every process
            error = e
    failed = broadcast_object(None if error is None else (str(error).strip().splitlines()
                                                          or [type(error).__name__])[-1])
    if error is not None:
        raise error
    if failed is not None:
        raise RunError(f"stopped because rank 0 failed: {failed}")
    return result


def on_main(fn):
    """``fn()`` on rank 0 only (writing files); a failure there stops every process with
    its message instead of leaving the others waiting in the next collective."""
    return _shared_outcome(context().is_main, fn)


def main_first(fn):
    """``fn()`` on rank 0 first (it writes the index caches), then on the other ranks; a
    failure on rank 0 stops every process."""
    is_main = context().is_main
    result = _shared_outcome(is_main, fn)
    return fn() if not is_main else result
