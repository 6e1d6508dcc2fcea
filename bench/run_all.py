"""Every benchmark in one run: one table of figures and ratios, and a JSON file to compare
runs.

    python bench/run_all.py                          # CPU here, or the GPU where there is one
    python bench/run_all.py --quick                  # small sizes, ResNet-18, 1 iteration
    python bench/run_all.py --only train,plain --device cuda --json out.json

Sections (``--only``):
  data     input pipeline images/s: one worker (in process) and the training loader with N
           workers, at the training crop
  train    one training iteration of the network (DeepLab-v3, ResNet-101 OS16, 512x512):
           fp32, bf16 autocast, fp16 autocast (GPU), channels-last off and on; batch 2 on
           the CPU, the largest batch of --batches that fits on a GPU; images/s, peak
           memory, achieved TFLOP/s and, where the device peak is known, model FLOP
           utilisation (FLOPs of one forward+backward counted once with
           torch.utils.flop_counter)
  methods  Trainer.train per iteration at step 1 for FT, LwF, ILT, LwF-MC, MiB, EWC, PI, RW,
           relative to FT (the real training code: bench/bench_train.py)
  eval     Trainer.validate images/s (the test phase's path)
  plain    our fp32 iteration against a plain PyTorch build of the same network
           (bench/plain_deeplab.py), with the ratio

Every ratio ("x base") is the time per image relative to the row named in "base", measured
in the same run (below 1: faster than the base). Nothing here passes or fails on time.
Each measurement runs in a fresh process, so its peak memory is its own.
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import bench_data  # noqa: E402
import bench_model  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
from utils.errors import UserError  # noqa: E402

SECTIONS = ("data", "train", "methods", "eval", "plain")
GPU_BATCHES = "8,16,32,48,64"
COLUMNS = [("section", "section"), ("case", "case"), ("size", "size"), ("batch", "batch"),
           ("images_per_s", "images/s"), ("seconds", "s/iter"), ("peak_mib", "peak MiB"),
           ("tflops", "TFLOP/s"), ("mfu_pct", "MFU %"), ("x_base", "x base"),
           ("baseline", "base"), ("error_short", "error")]


def _ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


def _words(text):
    return [v.strip() for v in str(text).split(",") if v.strip()]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults depend on the device: see --help of each "
                                       "option. " + __doc__.split("\n\n", 2)[2])
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma list of sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke run: resnet18, 64x64, 1 timed iteration, "
                        "no warm-up, 8 images, FT and MiB only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in every measurement (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the results here (default bench/results/<time>-<device>.json)")
    p.add_argument("--backbone", default=None, help="default resnet101 (resnet18 with --quick)")
    p.add_argument("--output_stride", type=int, default=16, choices=[8, 16])
    p.add_argument("--norm_act", default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "std"])
    p.add_argument("--norm_impl", default="auto", choices=["auto", "torch", "inplace_abn"],
                   help="auto: the compiled In-Place ABN on CUDA where installed, else torch")
    p.add_argument("--size", type=int, default=None, help="input / crop side (default 512)")
    p.add_argument("--batch", type=int, default=None, help="CPU batch (default 2)")
    p.add_argument("--batches", default=None,
                   help=f"GPU batch sizes to try, the largest that fits is used "
                        f"(default {GPU_BATCHES})")
    p.add_argument("--precisions", default=None,
                   help="training precisions (default fp32,bf16 on CPU; fp32,bf16,fp16 on GPU)")
    p.add_argument("--bf16-size", dest="bf16_size", type=int, default=None,
                   help="input side for bf16 on a CPU without native bf16 (default 256; "
                        "emulated bf16 is about 10x slower than fp32); an fp32 row at the "
                        "same size is added as its baseline")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default 2 on CPU, 10 on GPU, 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations first (default 1 on CPU, 3 on GPU, 0 with --quick)")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None,
                   help="device peak TFLOP/s for the utilisation (default from a table of "
                        "GPUs; none for CPUs)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default min(8, CPU count))")
    p.add_argument("--data-images", dest="data_images", type=int, default=None,
                   help="synthetic images for the data section (default 32, at least 4 "
                        "loader batches)")
    p.add_argument("--methods", default=None,
                   help=f"methods to time (default all: {','.join(bench_train.METHODS)}; FT "
                        "is always added as the baseline)")
    p.add_argument("--methods-batch", dest="methods_batch", type=int, default=None,
                   help="batch of the methods section (default: --batch on CPU, 16 on GPU)")
    p.add_argument("--methods-precision", dest="methods_precision", default=None,
                   choices=list(bench_train.AMP),
                   help="precision of the methods section (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--eval-batch", dest="eval_batch", type=int, default=None,
                   help="batch of the eval section (default: --batch on CPU, 16 on GPU)")
    p.add_argument("--eval-precisions", dest="eval_precisions", default=None,
                   help="eval precisions (default fp32 on CPU, fp32,bf16 on GPU)")
    p.add_argument("--plain-repeats", dest="plain_repeats", type=int, default=None,
                   help="plain section: measure plain and ours alternately this many times, "
                        "keep the best of each (default 2 on CPU, 1 on GPU and with --quick)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the trained model in the methods and eval sections "
                        "(as run.py --compile)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="measure in this process (faster start; CPU peak memory then "
                        "includes earlier measurements)")
    return p


def settings(args):
    """Concrete values for every option left to the device / --quick defaults."""
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    quick = args.quick
    only = _words(args.only)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise common.BenchError(f"unknown section '{unknown[0]}' in --only; expected some of "
                                f"{', '.join(SECTIONS)}")
    from modules.norm import resolve_norm_impl
    s = argparse.Namespace(**vars(args))
    s.device = device
    s.only = [x for x in SECTIONS if x in only]
    s.backbone = args.backbone or ("resnet18" if quick else "resnet101")
    s.size = args.size or (64 if quick else 512)
    s.batch = args.batch or 2
    if cuda:
        s.batches = _ints(args.batches or ("2,4,8" if quick else GPU_BATCHES))
    else:
        s.batches = _ints(args.batches) if args.batches else [s.batch]
    s.precisions = _words(args.precisions or ("fp32,bf16,fp16" if cuda else "fp32,bf16"))
    bad = [x for x in s.precisions if x not in common.DTYPES]
    if bad:
        raise common.BenchError(f"unknown precision '{bad[0]}'; expected fp32, bf16 or fp16")
    s.native_bf16 = cuda or common.cpu_has_native_bf16()
    s.bf16_size = args.bf16_size or (s.size if s.native_bf16 or quick else min(256, s.size))
    s.iters = args.iters or (1 if quick else 10 if cuda else 2)
    s.warmup = args.warmup if args.warmup is not None else (0 if quick else 3 if cuda else 1)
    s.workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    s.methods = [bench_train.method_name(m) for m in _words(
        args.methods or ("FT,MiB" if quick else ",".join(bench_train.METHODS)))]
    if "FT" in s.methods:
        s.methods.remove("FT")
    s.methods.insert(0, "FT")
    s.methods_batch = args.methods_batch or (16 if cuda and not quick else s.batch)
    s.methods_precision = args.methods_precision or ("bf16" if cuda else "fp32")
    # the loader section reads batches of the methods' size: at least 4 of them
    s.data_images = args.data_images or (8 if quick else max(32, 4 * s.methods_batch))
    s.eval_batch = args.eval_batch or (16 if cuda and not quick else s.batch)
    s.eval_precisions = _words(args.eval_precisions or ("fp32,bf16" if cuda else "fp32"))
    s.plain_repeats = args.plain_repeats or (1 if cuda or quick else 2)
    s.norm_impl = resolve_norm_impl(args.norm_impl, device)
    s.threads_used = args.threads or (None if cuda else torch.get_num_threads())
    return s


def progress(text):
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


def _measure(s, row, fn, *fargs, **kwargs):
    """Run one measurement (isolated), merge its result or its error into ``row``."""
    start = time.perf_counter()
    try:
        row.update(common.run_isolated(fn, *fargs, isolate=s.isolate, **kwargs))
    except (common.IsolatedError, RuntimeError) as e:
        row["error"] = "out of memory" if getattr(e, "oom", False) or common.is_oom(e) \
            else str(e)
    took = time.perf_counter() - start
    shown = row.get("error") or f"{row.get('seconds', 0):.3f} s/iter"
    progress(f"{row['section']}: {row['case']}: {shown} ({took:.0f} s)")
    return row


# --- sections -------------------------------------------------------------------------------

def section_data(s, rows):
    crop = s.size
    loader_batch = s.methods_batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one loader worker runs
    try:
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            bench_data.make_tree(root, s.data_images, crop)
            progress(f"data: {s.data_images} synthetic {crop}x{crop} images written "
                     f"({time.perf_counter() - start:.0f} s)")
            one, dataset = bench_data.bench_pipeline(root, s.data_images, crop)
            base = "pipeline, 1 worker"
            rows.append({"section": "data", "case": base, "size": crop, "images_per_s": one})
            row = {"section": "data", "case": f"loader, {s.workers} workers", "size": crop,
                   "batch": loader_batch, "baseline": base, "workers": s.workers}
            try:
                ips, count = bench_data.bench_loader(dataset, s.workers, loader_batch,
                                                     pin_memory=s.device.type == "cuda")
                row.update(images_per_s=ips, images_timed=count)
            except (ValueError, RuntimeError) as e:
                row["error"] = str(e)
            rows.append(row)
            progress(f"data: pipeline {one:.1f} images/s per worker, loader "
                     f"{row.get('images_per_s', 0):.1f} images/s")
    finally:
        torch.set_num_threads(threads)


_FLOPS = {}


def _flops_per_image(s, size, arch="ours"):
    """Counted once per network and size (on the meta device: no time, no memory)."""
    key = (arch, s.backbone, s.output_stride, size)
    if key not in _FLOPS:
        # batch 2: a batch of one cannot be normalised in the head's pooling branch
        _FLOPS[key] = bench_model.iteration_flops(arch, s.backbone, s.output_stride, 21, size,
                                                  2) / 2
    return _FLOPS[key]


def _add_flops(s, row, arch="ours"):
    if row.get("images_per_s") is None:
        return
    flops = _flops_per_image(s, row["size"], arch)
    row["flops_per_image"] = flops
    row["tflops"] = flops * row["images_per_s"] / 1e12
    peak, source = common.peak_tflops(s.device, row["precision"], s.peak_tflops)
    row["peak_tflops"], row["peak_source"] = peak, source
    if peak:
        row["mfu"] = row["tflops"] / peak


def _iteration(s, section, case, arch, precision, size, channels_last, batches, baseline):
    row = {"section": section, "case": case, "arch": arch, "precision": precision,
           "channels_last": channels_last, "size": size, "baseline": baseline}
    _measure(s, row, bench_model.measure_iteration, arch=arch, backbone=s.backbone,
             output_stride=s.output_stride, norm_act=s.norm_act,
             impl=s.norm_impl if arch == "ours" else "torch", classes=21, precision=precision,
             size=size, batches=batches, channels_last=channels_last, device=str(s.device),
             warmup=s.warmup, iters=s.iters, threads=s.threads)
    _add_flops(s, row, arch)
    return row


def _case(precision, channels_last, size=None, main_size=None):
    text = precision + (" channels_last" if channels_last else "")
    if size is not None and size != main_size:
        text += f" @{size}"
    return text


def section_train(s, rows):
    plan = []
    for precision in s.precisions:
        size = s.bf16_size if precision == "bf16" else s.size
        for cl in (False, True):
            plan.append((precision, size, cl))
    # every precision's baseline is fp32, channels-last off, at the same size
    for size in sorted({size for _, size, _ in plan}, reverse=True):
        if ("fp32", size, False) not in plan:
            plan.insert(0, ("fp32", size, False))
    plan.sort(key=lambda p: (p[0] != "fp32", -p[1]))
    for precision, size, cl in plan:
        base = _case("fp32", False, size, s.size)
        case = _case(precision, cl, size, s.size)
        rows.append(_iteration(s, "train", case, "ours", precision, size, cl, s.batches,
                               None if case == base else base))


def section_methods(s, rows):
    for method in s.methods:
        row = {"section": "methods", "case": method, "precision": s.methods_precision,
               "size": s.size, "batch": s.methods_batch,
               "baseline": None if method == "FT" else "FT"}
        rows.append(_measure(s, row, bench_train.measure_method, method,
                             backbone=s.backbone, output_stride=s.output_stride,
                             norm_act=s.norm_act, impl=s.norm_impl, size=s.size,
                             batch=s.methods_batch, precision=s.methods_precision,
                             device=str(s.device), warmup=s.warmup, iters=s.iters,
                             threads=s.threads, compile=s.compile))


def section_eval(s, rows):
    for precision in s.eval_precisions:
        row = {"section": "eval", "case": f"validate {precision}", "precision": precision,
               "size": s.size, "batch": s.eval_batch}
        _measure(s, row, bench_train.measure_eval, backbone=s.backbone,
                 output_stride=s.output_stride, norm_act=s.norm_act, impl=s.norm_impl,
                 size=s.size, batch=s.eval_batch, precision=precision, device=str(s.device),
                 warmup=s.warmup, iters=s.iters, threads=s.threads)
        # relative to training one image at the same precision and memory format
        train = [r for r in rows if r["section"] == "train" and r.get("precision") == precision
                 and r.get("size") == s.size and r.get("channels_last") ==
                 row.get("channels_last") and r.get("images_per_s")]
        if train:
            row["baseline"] = f"train: {train[0]['case']}"
        rows.append(row)


def _best(new, previous):
    """The faster of two measurements of one configuration (contention only slows down);
    every time measured is kept in ``runs_s``, in order."""
    if previous is None:
        return new
    runs = previous.get("runs_s", [previous.get("seconds")]) + [new.get("seconds")]
    best = min((previous, new), key=lambda r: r.get("seconds") or float("inf"))
    return dict(best, runs_s=runs)


def section_plain(s, rows):
    """Plain PyTorch first (the base), then ours at the batch the plain build used (or the
    largest smaller one that fits); --plain-repeats alternates the two and keeps the best of
    each, so that a busy spell of the machine does not decide the ratio."""
    plain = ours = None
    for _ in range(s.plain_repeats):
        plain = _best(_iteration(s, "plain", "plain PyTorch fp32", "plain", "fp32", s.size,
                                 False, s.batches, None), plain)
        batches = [b for b in s.batches if b <= plain["batch"]] if plain.get("batch") \
            else s.batches
        ours = _best(_iteration(s, "plain", "ours fp32", "ours", "fp32", s.size, False,
                                batches, plain["case"]), ours)
    rows += [plain, ours]


# --- ratios, table, summary -----------------------------------------------------------------

def add_ratios(rows):
    """x_base: time per image relative to the base row (base images/s / images/s)."""
    for row in rows:
        base_name = row.get("baseline")
        if not base_name:
            continue
        section, _, case = base_name.rpartition(": ")
        section = section or row["section"]
        base = next((r for r in rows if r["section"] == section and r["case"] == case), None)
        if base and base.get("images_per_s") and row.get("images_per_s"):
            row["x_base"] = base["images_per_s"] / row["images_per_s"]
    for row in rows:
        if row.get("mfu") is not None:
            row["mfu_pct"] = 100 * row["mfu"]
        if row.get("error"):
            row["error_short"] = row["error"][:60]


def summary(s, rows):
    """Plain-language ratios (figures against the same run's baselines)."""
    lines = []

    def find(section, case):
        return next((r for r in rows if r["section"] == section and r["case"] == case), None)

    for r in rows:
        if r["section"] == "train" and r.get("x_base"):
            lines.append(f"train {r['case']}: {1 / r['x_base']:.2f}x the images/s of "
                         f"{r['baseline']}")
    for r in rows:
        if r["section"] == "methods" and r.get("x_base"):
            lines.append(f"{r['case']} step 1: {r['x_base']:.2f}x the FT iteration time")
    ours, plain = find("plain", "ours fp32"), find("plain", "plain PyTorch fp32")
    if ours and ours.get("x_base"):
        lines.append(f"ours fp32 ({ours['images_per_s']:.3g} images/s) takes "
                     f"{ours['x_base']:.2f}x the time of the plain PyTorch build "
                     f"({plain['images_per_s']:.3g} images/s): "
                     f"{'no slower' if ours['x_base'] <= 1 else 'slower'}")
    loader = next((r for r in rows if r["section"] == "data" and r["case"].startswith("loader")
                   and r.get("images_per_s")), None)
    trains = [r for r in rows if r["section"] == "train" and r.get("images_per_s")
              and r.get("size") == s.size]
    if loader and trains:
        fastest = max(trains, key=lambda r: r["images_per_s"])
        lines.append(f"input pipeline: the loader with {loader['workers']} workers delivers "
                     f"{loader['images_per_s']:.3g} images/s, the fastest training row "
                     f"({fastest['case']}) consumes {fastest['images_per_s']:.3g}: headroom "
                     f"{loader['images_per_s'] / fastest['images_per_s']:.3g}x (above 1: not "
                     "the bottleneck; measured alone, without training competing for the CPU)")
    return lines


def load_average():
    """1-minute load average, or None where the OS does not give it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def notes(s, load=(None, None)):
    busy = ""
    if s.threads_used and None not in load and max(load) > s.threads_used:
        busy = f" (above {s.threads_used}: other work shared the CPU, figures are noisy)"
    out = [f"device: {common.device_name(s.device)}"
           + (f", {s.threads_used} threads" if s.threads_used else "")
           + (f"; load average {load[0]} at the start, {load[1]} at the end{busy}"
              if None not in load else ""),
           f"network: DeepLab-v3 {s.backbone} OS{s.output_stride}, {s.norm_act} "
           f"({s.norm_impl}), 21 classes; {s.warmup} warm-up + {s.iters} timed iteration(s)",
           f"peak memory: {common.MEMORY_KIND[s.device.type]}"]
    if s.device.type == "cpu" and "bf16" in s.precisions and s.bf16_size != s.size:
        out.append(f"bf16 at {s.bf16_size}x{s.bf16_size}: this CPU has no native bf16 "
                   "(no AVX512-BF16 / AMX), autocast emulates it and is far slower than "
                   f"fp32; --bf16-size {s.size} measures it at full size")
    if s.device.type == "cuda":
        out.append(f"batch: the largest of {','.join(map(str, s.batches))} that fits; "
                   "cudnn.benchmark on")
    return out


def default_json_path(device):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(ROOT, "bench", "results", f"{stamp}-{common.device_slug(device)}.json")


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        s = settings(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    common.set_threads(args.threads)
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    started = time.time()
    load_start = load_average()
    for name in s.only:
        progress(f"section {name}")
        globals()[f"section_{name}"](s, rows)
    add_ratios(rows)
    load = (load_start, load_average())
    text_notes, lines = notes(s, load), summary(s, rows)
    print("\n".join(text_notes))
    print()
    print(common.format_table(COLUMNS, rows))
    if lines:
        print()
        print("\n".join(lines))
    path = args.json or default_json_path(s.device)
    doc = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
           "seconds": round(time.time() - started, 1),
           "device": {"type": s.device.type, "name": common.device_name(s.device),
                      "threads": s.threads_used, "native_bf16": s.native_bf16},
           "load_average": {"start": load[0], "end": load[1]}, "torch": torch.__version__,
           "argv": list(argv if argv is not None else sys.argv[1:]),
           "settings": {k: (str(v) if isinstance(v, torch.device) else v)
                        for k, v in vars(s).items()},
           "memory": common.MEMORY_KIND[s.device.type], "notes": text_notes,
           "rows": rows, "summary": lines}
    common.write_json(path, doc)
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
