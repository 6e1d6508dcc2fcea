"""``iabn_sync`` across 2 CPU processes (gloo) equals one process over the whole batch:
statistics, outputs, input and parameter gradients."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from modules.norm import InPlaceABNSync, inplace_abn_available, norm_act_factory

C = 4
BATCH = 5
SPLITS = ((0, 3), (3, 5))  # unequal per-process batches: the merge must weigh by count


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 6, 5, generator=g, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(BATCH, C, 6, 5, generator=g, dtype=torch.float64)
    return x, upstream


def _network(impl):
    """conv -> sync norm (leaky-ReLU) -> conv -> sync norm (identity): the gradient of the
    first norm also flows through the second one's shared statistics."""
    torch.manual_seed(0)
    make = norm_act_factory("iabn_sync", impl)
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), make(C),
                        nn.Conv2d(C, C, 1, bias=False), make(C, activation="identity"))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.5, -0.5, 0.8, -2.0]))
        net[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return net.double()


def _train_step(net, x, upstream):
    x = x.clone().requires_grad_(True)
    y = net(x)
    (y * upstream).sum().backward()
    return {"y": y.detach(), "dx": x.grad,
            "grads": [p.grad.clone() for p in net.parameters()],
            "buffers": [b.clone() for b in net.buffers()]}


def _worker(rank, world, folder, impls):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    x, upstream = _data()
    lo, hi = SPLITS[rank]
    results = {}
    for impl in impls:
        net = _network(impl)
        results[impl] = _train_step(net, x[lo:hi], upstream[lo:hi])
        net.eval()  # eval mode: running statistics, no communication
        results[impl]["eval"] = net(x[lo:hi]).detach()
    # low precision and channels-last inputs take the same synchronised path
    layer = norm_act_factory("iabn_sync")(3).train()
    part = x[lo:hi].bfloat16().contiguous(memory_format=torch.channels_last)
    results["bf16"] = (layer(part).float(), layer.running_var.clone())
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_sync_over_two_gloo_processes_equals_one_process_over_the_whole_batch(tmp_path):
    impls = ["torch"] + (["inplace_abn"] if inplace_abn_available() else [])
    mp.spawn(_worker, args=(2, str(tmp_path), impls), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x, upstream = _data()
    for impl in impls:
        net = _network("torch")  # one process, no group: plain iabn over the whole batch
        assert isinstance(net[1], InPlaceABNSync)
        whole = _train_step(net, x, upstream)
        net.eval()
        whole_eval = net(x).detach()
        parts = [r[impl] for r in ranks]
        tol = {"rtol": 1e-7, "atol": 1e-9}  # the package keeps its slope in float32
        torch.testing.assert_close(torch.cat([p["y"] for p in parts]), whole["y"], **tol)
        torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), whole["dx"], **tol)
        # DDP would average these; the sum over processes is the gradient of the total loss
        for k, g in enumerate(whole["grads"]):
            torch.testing.assert_close(parts[0]["grads"][k] + parts[1]["grads"][k], g, **tol)
        for p in parts:
            for mine, ref in zip(p["buffers"], whole["buffers"]):
                torch.testing.assert_close(mine, ref, **tol)
        torch.testing.assert_close(torch.cat([p["eval"] for p in parts]), whole_eval, **tol)

    layer = norm_act_factory("iabn")(3).train()
    whole_bf16 = layer(x.bfloat16()).float()
    torch.testing.assert_close(torch.cat([r["bf16"][0] for r in ranks]), whole_bf16,
                               rtol=0.02, atol=0.02)
    for r in ranks:
        torch.testing.assert_close(r["bf16"][1], layer.running_var, rtol=1e-3, atol=1e-3)
