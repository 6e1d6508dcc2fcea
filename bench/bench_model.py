"""Time and peak memory of one training iteration of the network (forward, cross-entropy,
backward, SGD step), per norm implementation and precision.

    python bench/bench_model.py                       # batch 2, 512x512, ResNet-101 OS16
    python bench/bench_model.py --size 128 --backbone resnet50 --iters 1 --warmup 0

Each (implementation, precision) runs in a fresh process, so the peak memory is its own:
on the CPU how far the process's peak resident memory grew after the imports, on CUDA the
peak allocated tensor memory.
Precisions: fp32, bf16 (autocast) and, on CUDA, fp16 (autocast + GradScaler).
Implementations: ``torch`` (pure PyTorch norms) and ``inplace_abn`` (the compiled package,
where installed). Prints figures only; nothing here is a pass/fail check.
``bench/run_all.py`` uses :func:`measure_iteration` for its training rows, the batch-size
search on GPUs and the plain-PyTorch comparison (``arch='plain'``).

On a CPU without native bf16 (no AVX512-BF16 / AMX) bf16 autocast is emulated and about ten
times slower than fp32; use ``--precisions fp32`` or a small ``--size`` there. On a busy
machine ``--threads 1`` avoids OpenMP oversubscription, which can cost a factor of ten.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import common  # noqa: E402
from common import DTYPES  # noqa: E402,F401  (kept importable from here)
from engine.build import sgd_kernel  # noqa: E402
from modules.norm import inplace_abn_available  # noqa: E402
from segmentation_module import make_model  # noqa: E402

ARCHS = ("ours", "plain")


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
    return p


def build_network(arch, backbone, output_stride, norm_act="iabn_sync", impl="torch",
                  classes=21):
    """Our network (``make_model``, one step of ``classes``) or the plain-PyTorch build of
    the same architecture (``bench/plain_deeplab.py``)."""
    if arch == "plain":
        from plain_deeplab import PlainDeepLabV3
        return PlainDeepLabV3(backbone, output_stride, classes)
    if arch != "ours":
        raise common.BenchError(f"unknown network '{arch}'; expected one of {', '.join(ARCHS)}")
    from argparser import build_options
    opts = build_options(backbone=backbone, output_stride=output_stride, norm_act=norm_act,
                         norm_impl=impl, no_pretrained=True)
    return make_model(opts, [classes])


def logits_of(output):
    return output[0] if isinstance(output, tuple) else output


def iteration_flops(arch="ours", backbone="resnet101", output_stride=16, classes=21, size=512,
                    batch=2):
    """FLOPs of one training iteration's forward and backward, counted on the meta device
    (norm layers in pure PyTorch: the count is that of the convolutions and matmuls; it
    grows linearly with ``batch``, which must be 2 or more in training mode)."""
    with torch.device("meta"):
        model = build_network(arch, backbone, output_stride, classes=classes).train()
        images = torch.empty(batch, 3, size, size)
        labels = torch.zeros(batch, size, size, dtype=torch.long)

    def one():
        logits = logits_of(model(images))
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    return common.count_flops(one)


def measure_iteration(*, arch="ours", backbone="resnet101", output_stride=16,
                      norm_act="iabn_sync", impl="torch", classes=21, precision="fp32",
                      size=512, batches=(2,), channels_last=False, device="cpu", warmup=1,
                      iters=1, threads=None):
    """Seconds per training iteration and peak memory, in this process.

    ``batches`` is tried largest first; a batch that runs out of memory in the warm-up is
    skipped (``oom_batches``), so on a GPU the result is the largest batch that fits."""
    device = torch.device(device)
    common.set_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
    torch.manual_seed(0)
    baseline = common.memory_baseline(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_network(arch, backbone, output_stride, norm_act, impl, classes)
    model = model.to(device, memory_format=memory_format).train()
    # engine.build.make_optimizer's update rule and kernel
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=1e-4, **sgd_kernel(device.type == "cuda", precision))
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = logits_of(model(images))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def inputs(batch):
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, classes, (batch, size, size), device=device)
        return images.contiguous(memory_format=memory_format), labels

    oom, chosen, data = [], None, None
    for batch in sorted(set(batches), reverse=True):
        failed = False
        try:
            data = inputs(batch)
            # one iteration at least, so that a batch that does not fit fails here
            for _ in range(max(warmup, 1 if len(batches) > 1 else 0)):
                step(*data)
            common.sync(device)
            chosen = batch
        except RuntimeError as e:
            if not common.is_oom(e):
                raise
            failed = True
        if failed:  # outside the except block: the traceback no longer holds tensors
            oom.append(batch)
            data = None
            optimizer.zero_grad(set_to_none=True)
            common.free_memory(device)
            continue
        break
    if chosen is None:
        raise torch.OutOfMemoryError(f"out of memory at every batch size tried "
                                     f"({', '.join(map(str, oom))})")
    common.reset_peak_memory(device)
    seconds = common.seconds_per_call(lambda: step(*data), device, 0, iters)
    return {"arch": arch, "impl": impl, "precision": precision, "channels_last": channels_last,
            "size": size, "batch": chosen, "oom_batches": oom, "seconds": seconds,
            "images_per_s": chosen / seconds, "peak_mib": common.peak_memory_mib(device, baseline)}


def measure(args, impl, precision):
    """One configuration of the command line, in this process."""
    return measure_iteration(backbone=args.backbone, output_stride=args.output_stride,
                             norm_act=args.norm_act, impl=impl, classes=args.classes,
                             precision=precision, size=args.size, batches=(args.batch,),
                             channels_last=args.channels_last,
                             device=common.resolve_device(args.device), warmup=args.warmup,
                             iters=args.iters, threads=args.threads)


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    on_cuda = device.type == "cuda"
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32", "bf16"] + (["fp16"] if on_cuda else []))
    impls = (args.impls.split(",") if args.impls
             else ["torch"] + (["inplace_abn"] if inplace_abn_available() else []))
    threads = f" ({args.threads or torch.get_num_threads()} threads)" if not on_cuda else ""
    print(f"one training iteration: {args.backbone} OS{args.output_stride}, {args.norm_act}, "
          f"batch {args.batch}, {args.size}x{args.size}, {args.classes} classes, "
          f"{'channels-last, ' if args.channels_last else ''}{common.device_name(device)}"
          f"{threads}; {args.warmup} warm-up + {args.iters} timed iteration(s)")
    print(f"memory: {common.MEMORY_KIND[device.type]}")
    rows = []
    for impl in impls:
        for precision in precisions:
            row = {"impl": impl, "precision": precision}
            try:
                row.update(common.run_isolated(measure, args, impl, precision))
            except common.IsolatedError as e:
                row["error"] = str(e)
            rows.append(row)
    print(common.format_table([("impl", "norms"), ("precision", "precision"),
                               ("seconds", "s/iter"), ("images_per_s", "images/s"),
                               ("peak_mib", "peak MiB"), ("error", "error")], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
