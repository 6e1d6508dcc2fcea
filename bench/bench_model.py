"""Time and peak memory of one training iteration of the network (forward, cross-entropy,
backward, SGD step), per norm implementation and precision.

    python bench/bench_model.py                       # batch 2, 512x512, ResNet-101 OS16
    python bench/bench_model.py --size 128 --backbone resnet50 --iters 1 --warmup 0

Each (implementation, precision) runs in a fresh process, so the peak memory is its own:
peak resident memory of the process on the CPU, peak allocated tensor memory on CUDA.
Precisions: fp32, bf16 (autocast) and, on CUDA, fp16 (autocast + GradScaler).
Implementations: ``torch`` (pure PyTorch norms) and ``inplace_abn`` (the compiled package,
where installed). Prints figures only; nothing here is a pass/fail check.

On a CPU without native bf16 (no AVX512-BF16 / AMX) bf16 autocast is emulated and about ten
times slower than fp32; use ``--precisions fp32`` or a small ``--size`` there. On a busy
machine ``--threads 1`` avoids OpenMP oversubscription, which can cost a factor of ten.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from modules.norm import inplace_abn_available  # noqa: E402
from segmentation_module import make_model  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="square input side (default 512)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--backbone", default="resnet101",
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    p.add_argument("--output_stride", type=int, default=16, choices=[8, 16])
    p.add_argument("--norm_act", default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "std"])
    p.add_argument("--classes", type=int, default=21, help="output classes (one step)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precisions", default=None,
                   help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, all on CUDA)")
    p.add_argument("--impls", default=None,
                   help="comma list of torch,inplace_abn (default: both where installed)")
    p.add_argument("--iters", type=int, default=1, help="timed iterations (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    return p


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args, impl, precision):
    """One configuration in this process: seconds per iteration and peak memory (MiB)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opts = SimpleNamespace(backbone=args.backbone, output_stride=args.output_stride,
                           norm_act=args.norm_act, norm_impl=impl, no_pretrained=True,
                           pooling=32)
    model = make_model(opts, [args.classes]).to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, _ = model(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    seconds = (time.perf_counter() - start) / max(args.iters, 1)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
            else _peak_rss_mib())
    return {"impl": impl, "precision": precision, "seconds": seconds, "peak_mib": peak}


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(measure(args, *args.one)))
        return 0

    on_cuda = args.device == "cuda"
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32", "bf16"] + (["fp16"] if on_cuda else []))
    impls = (args.impls.split(",") if args.impls
             else ["torch"] + (["inplace_abn"] if inplace_abn_available() else []))
    device_name = torch.cuda.get_device_name() if on_cuda else \
        f"CPU ({args.threads or torch.get_num_threads()} threads)"
    memory_kind = "peak allocated" if on_cuda else "peak process RSS"
    print(f"one training iteration: {args.backbone} OS{args.output_stride}, {args.norm_act}, "
          f"batch {args.batch}, {args.size}x{args.size}, {args.classes} classes, "
          f"{'channels-last, ' if args.channels_last else ''}{device_name}; "
          f"{args.warmup} warm-up + {args.iters} timed iteration(s)")
    print(f"{'norms':<12}{'precision':<11}{'s/iter':>9}{memory_kind + ' (MiB)':>28}")
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    for impl in impls:
        for precision in precisions:
            cmd = [sys.executable, os.path.abspath(__file__), *child_argv,
                   "--device", args.device, "--one", impl, precision]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                lines = (done.stderr.strip() or done.stdout.strip() or "failed").splitlines()
                print(f"{impl:<12}{precision:<11}  failed: {lines[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{impl:<12}{precision:<11}{r['seconds']:>9.3f}{r['peak_mib']:>28.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
