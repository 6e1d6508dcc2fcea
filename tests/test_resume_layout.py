"""Resuming keeps the optimiser state in the parameters' memory layout: a checkpoint
written without channels-last (or by the original code) resumed into a channels-last
network. CUDA's fused SGD kernel refuses parameters, gradients and momentum buffers of
different strides (the CPU kernels accept them, so only the strides are checked here; the
device check runs the fused step itself)."""
import torch

from utils.checkpoint import restore_checkpoint


def network(memory_format):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))
    return net.to(memory_format=memory_format)


def trained_state(memory_format):
    net = network(memory_format)
    optim = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)
    return {"epoch": 0, "model_state": {f"module.{k}": v for k, v in net.state_dict().items()},
            "optimizer_state": optim.state_dict(), "scheduler_state": sched.state_dict()}


def test_momentum_buffers_follow_the_parameters_memory_format_on_resume():
    ckpt = trained_state(torch.contiguous_format)
    net = network(torch.channels_last)
    optim = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)
    restore_checkpoint(ckpt, "ckpt.pth", model=net, optimizer=optim, scheduler=sched,
                       trainer=None)
    conv = net[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for p in net.parameters():
        buf = optim.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride(), "momentum buffer in another memory layout"
    saved = ckpt["optimizer_state"]["state"]
    torch.testing.assert_close(optim.state[conv]["momentum_buffer"], saved[0]["momentum_buffer"])
