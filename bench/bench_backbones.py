"""What a Swin body costs against ResNet-101 under the same DeepLab-v3 head: seconds and
peak memory per image of one training iteration (forward, cross-entropy, backward, SGD step),
each backbone in a fresh process, ratios to the first backbone from the same run.

    python bench/bench_backbones.py                          # CPU, 128 px, batch 2
    python bench/bench_backbones.py --size 512 --device cuda --batch 6
    python bench/bench_backbones.py --backbones resnet101,swin_b,swin_t --threads 1

Random weights (no ImageNet file needed). Figures only, nothing here is a pass/fail check;
on a busy machine compare only the ratios of one run.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import common  # noqa: E402
from bench_model import measure_iteration  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="resnet101,swin_b",
                   help="comma list; ratios are to the first (default resnet101,swin_b)")
    p.add_argument("--size", type=int, default=128, help="square crop side (default 128)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--iters", type=int, default=2, help="timed iterations (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def measure_backbones(backbones, size, batch, device, precision="fp32", iters=2, warmup=1,
                      threads=None, isolate=True):
    """One row per backbone: seconds and peak MiB per image, and their ratios to the first."""
    rows = []
    for backbone in backbones:
        try:
            r = common.run_isolated(measure_iteration, isolate=isolate, backbone=backbone,
                                    size=size, batches=(batch,), device=device,
                                    precision=precision, warmup=warmup, iters=iters,
                                    threads=threads)
        except common.IsolatedError as e:  # out of memory: the row says so, the rest go on
            rows.append({"backbone": backbone, "size": size, "batch": batch, "error": str(e),
                         "oom": e.oom})
            continue
        rows.append({"backbone": backbone, "size": size, "batch": r["batch"],
                     "s_per_image": r["seconds"] / r["batch"],
                     "peak_mib_per_image": r["peak_mib"] / r["batch"]})
    base = rows[0]
    for row in rows:
        if "error" in row or "error" in base:
            row["time_ratio"] = row["memory_ratio"] = None
            continue
        row["time_ratio"] = row["s_per_image"] / base["s_per_image"]
        # not isolated, a later backbone may not grow the process's peak: no ratio then
        row["memory_ratio"] = (row["peak_mib_per_image"] / base["peak_mib_per_image"]
                               if base["peak_mib_per_image"] > 0 else None)
    return rows


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    rows = measure_backbones(args.backbones.split(","), args.size, args.batch, str(device),
                             args.precision, args.iters, args.warmup, args.threads)
    print(f"{common.device_name(device)}, {args.precision}, crop {args.size}, batch "
          f"{args.batch}: one training iteration per image")
    columns = [("backbone", "backbone"), ("s_per_image", "s/image"),
               ("peak_mib_per_image", "peak MiB/image"), ("time_ratio", "time ratio"),
               ("memory_ratio", "memory ratio")]
    print(common.format_table(columns, [r for r in rows if "error" not in r]))
    for row in rows:
        if "error" in row:
            print(f"{row['backbone']}: {row['error']}")
    if args.json:
        common.write_json(args.json, {"argv": sys.argv[1:] if argv is None else list(argv),
                                      "device": common.device_name(device),
                                      "precision": args.precision, "rows": rows})
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
