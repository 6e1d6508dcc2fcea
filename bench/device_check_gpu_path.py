"""The device check's first probe (``device_check.py --probe gpu-path``): a few seconds of
deterministic checks of the CUDA-path defects of issue 27, each forced rather than waited
for, on the device of the check (the same code in the CPU dry run):

  fp16-overflow   a GradScaler whose first step overflows (2^40 initial scale under fp16
                  autocast) with the optimiser engine.build picks for fp16: parameters and
                  momentum buffers equal a reference SGD's after three steps
  penalty-skip    EWC's Fisher after [batch, overflow, batch] equals its Fisher after the
                  two batches alone, and is finite
  resume-strides  a contiguous run's optimiser state restored into a channels-last network
                  (utils.checkpoint.restore_checkpoint), then one step of the kernel
                  engine.build picks on this device (fused SGD on CUDA refuses mixed strides)
  rng-fewer-gpus  CUDA RNG states of one GPU more than are visible, restored: a warning, no
                  IndexError (CUDA only; the unit tests mock it on the CPU)
  fp16-syncs      a figure: host syncs per fp16 training iteration (CUDA's sync debug mode)

Returns ``{"device": ..., "checks": [{"name", "passed", "detail"}]}``."""
import logging
import time


def _tiny_net(torch, classes, seed):
    """body -> classifier, ``forward(x, ret_intermediate)`` -> (logits, features), as the
    Trainer calls the segmentation network."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.body = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.cls = torch.nn.ModuleList([torch.nn.Conv2d(6, c, 1) for c in classes])
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)

        def forward(self, x, ret_intermediate=False):
            feat = torch.tanh(self.body(x))
            return torch.cat([c(feat) for c in self.cls], 1), {"body": feat, "pre_logits": feat}
    return Tiny()


def _batch(torch, seed, classes, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 8, 8, generator=g).to(device),
            torch.randint(0, classes, (2, 8, 8), generator=g).to(device))


def _options(*argv, amp):
    import argparser
    return argparser.build_options(["--task", "15-5", "--no_progress", *argv], amp=amp)


def _close(torch, a, b):
    return all(torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5) for x, y in zip(a, b))


def check_fp16_overflow(torch, device):
    from engine.build import sgd_kernel
    from train import Trainer

    def run(kernel):
        model = _tiny_net(torch, [6], seed=1).to(device)
        trainer = Trainer(model, None, device, _options(amp="fp16"), classes=[6])
        trainer.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 40,
                                              backoff_factor=2.0 ** -30)
        optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                **kernel)
        trainer.train(0, optim, [_batch(torch, i, 6, device) for i in range(3)])
        return (list(model.parameters()),
                [optim.state[p]["momentum_buffer"] for p in model.parameters()],
                trainer.scaler_skipped_steps)

    kernel = sgd_kernel(on_cuda=True, amp="fp16")
    ref, got = run({}), run(kernel)
    same = ref[2] == got[2] == 1 and _close(torch, ref[0], got[0]) and _close(torch, ref[1],
                                                                               got[1])
    return same, (f"first step skipped ({got[2]} skipped), SGD {kernel or 'default kernel'}: "
                  f"weights and momentum {'equal' if same else 'DIFFER from'} a reference "
                  "SGD's after 3 steps")


def check_penalty_skip(torch, device):
    from train import Trainer

    def fisher(batches, scaler):
        model = _tiny_net(torch, [4, 2], seed=1).to(device)
        old = _tiny_net(torch, [4], seed=2).to(device)
        for p in old.parameters():
            p.requires_grad_(False)
        trainer = Trainer(model, old, device, _options("--method", "EWC", "--step", "1",
                                                       amp="fp16"),
                          trainer_state=None, classes=[4, 2])
        trainer.scaler = scaler
        trainer.train(0, torch.optim.SGD(model.parameters(), lr=0.1), batches)
        [part] = trainer.method.penalties
        return part.regularizer.state_dict()["fisher"], trainer.scaler_skipped_steps

    data = [_batch(torch, i, 6, device) for i in (5, 6, 7)]
    growing = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10, growth_factor=2.0 ** 30,
                                   backoff_factor=2.0 ** -30, growth_interval=1)
    got, skipped = fisher(data, growing)
    want, _ = fisher([data[0], data[2]], torch.amp.GradScaler(device.type, init_scale=2.0 ** 10))
    finite = all(bool(torch.isfinite(v).all()) for v in got.values())
    same = finite and skipped == 1 and _close(torch, [got[k] for k in sorted(got)],
                                              [want[k] for k in sorted(want)])
    return same, (f"{skipped} step skipped mid-run: EWC Fisher "
                  f"{'finite' if finite else 'NOT finite'} and "
                  f"{'equal to' if same else 'different from'} the run without that batch")


def check_resume_strides(torch, device):
    from engine.build import sgd_kernel
    from utils.checkpoint import restore_checkpoint

    def net(fmt):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)).to(
            device, memory_format=fmt)

    def step(model, optim):
        optim.zero_grad()
        x = torch.randn(2, 3, 8, 8, device=device).contiguous(
            memory_format=next(model.parameters()).is_contiguous() and torch.contiguous_format
            or torch.channels_last)
        model(x).sum().backward()
        optim.step()

    kernel = sgd_kernel(on_cuda=device.type == "cuda", amp="off")
    saved_net = net(torch.contiguous_format)
    saved_opt = torch.optim.SGD(saved_net.parameters(), lr=0.1, momentum=0.9, **kernel)
    step(saved_net, saved_opt)
    sched = torch.optim.lr_scheduler.LambdaLR(saved_opt, lambda _: 1.0)
    ckpt = {"epoch": 0, "model_state": {f"module.{k}": v for k, v in
                                        saved_net.state_dict().items()},
            "optimizer_state": saved_opt.state_dict(), "scheduler_state": sched.state_dict()}
    model = net(torch.channels_last)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **kernel)
    restore_checkpoint(ckpt, "probe", model=model, optimizer=optim,
                       scheduler=torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0),
                       trainer=None)
    strides = all(optim.state[p]["momentum_buffer"].stride() == p.stride()
                  for p in model.parameters())
    try:
        step(model, optim)
        stepped, error = True, ""
    except RuntimeError as e:
        stepped, error = False, f": {str(e).splitlines()[0][:160]}"
    ok = strides and stepped
    return ok, (f"contiguous checkpoint into channels-last, SGD {kernel or 'default kernel'}: "
                f"buffer strides {'match' if strides else 'DIFFER'}, next step "
                f"{'ran' if stepped else 'FAILED'}{error}")


def check_rng_fewer_gpus(torch, device):
    if device.type != "cuda":
        return None, "no CUDA here (tests/test_cuda_rng_resume.py mocks it on the CPU)"
    from utils import checkpoint
    states = {k: v for k, v in checkpoint.rng_states().items() if k != "cuda_by_rank"}
    count = torch.cuda.device_count()
    states["cuda"] = [torch.cuda.get_rng_state(0)] * (count + 1)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("utils.checkpoint").addHandler(handler)
    try:
        checkpoint.restore_rng_states(states)
        ok, error = True, ""
    except Exception as e:  # the defect: IndexError
        ok, error = False, f": {type(e).__name__}: {e}"
    warned = any("GPUs" in r.getMessage() for r in records)
    return ok and warned, (f"states of {count + 1} GPUs restored with {count} visible: "
                           f"{'restored' if ok else 'FAILED'}{error}, "
                           f"{'a warning' if warned else 'NO warning'}")


def count_syncs(torch, device):
    """Host syncs per fp16 training iteration (CUDA's sync debug mode warns at each): a
    figure, not a check (the loss scaler's get_scale() made two per iteration before)."""
    if device.type != "cuda":
        return None, "no CUDA here"
    import warnings

    from train import Trainer
    model = _tiny_net(torch, [6], seed=1).to(device)
    trainer = Trainer(model, None, device, _options(amp="fp16"), classes=[6])
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [_batch(torch, i, 6, device) for i in range(10)]
    trainer.train(0, optim, data[:2])                 # warm-up: allocations, cuDNN choice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train(1, optim, data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return None, (f"{syncs} host syncs in an fp16 epoch of {len(data)} iterations "
                  f"({syncs / len(data):.1f} per iteration, the epoch's end included)")


CHECKS = {"fp16-overflow": check_fp16_overflow, "penalty-skip": check_penalty_skip,
          "resume-strides": check_resume_strides, "rng-fewer-gpus": check_rng_fewer_gpus,
          "fp16-syncs": count_syncs}


def probe_gpu_path(args):
    import torch
    device = torch.device(args.device)
    checks = []
    for name, check in CHECKS.items():
        start = time.monotonic()
        try:
            passed, detail = check(torch, device)
        except Exception as e:  # a failed check, with what went wrong
            passed, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        checks.append({"name": name, "passed": passed, "detail": detail,
                       "seconds": round(time.monotonic() - start, 2)})
    return {"device": str(device), "checks": checks}
