"""How the time of one training epoch grows with the number of images, the crop size and the
number of processes: ``run.py`` itself, launched with ``torchrun`` on a synthetic VOC tree.

    python bench/bench_scale.py                          # small sizes: a few minutes on a CPU
    python bench/bench_scale.py --images 100,200,400 --crops 256,512 --procs 1,2 \\
        --base-images 200 --base-crop 512 --backbone resnet101 --device cuda

One factor at a time around the base run (--base-images, --base-crop, 1 process): every
image count at the base crop, every crop at the base count, every process count at both.
Each run is ``python -m torch.distributed.run --standalone --nproc_per_node=K run.py
--task offline --epochs 1 ...`` in its own folder; the epoch time and the training-set size
are read from the run's records, ``<logdir>/offline-voc/<name>/events.jsonl`` (training
only: no validation, no test phase, no start-up). With K processes on the CPU each gets
threads/K OpenMP threads (gloo); on CUDA each takes one GPU (nccl). The per-process batch is
--batch, as in the original, so K processes see K times the images per iteration.
Prints a table with every ratio against the base run; writes JSON. On a shared machine,
--repeats N keeps the fastest of N runs of each configuration.
"""
import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import common  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.events import events_path, read_events  # noqa: E402

TASK, DATASET = "offline", "voc"
VAL_IMAGES = 4


class ScaleError(common.BenchError):
    """A training run of the scaling benchmark failed."""


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--images", default="16,32,64", help="training image counts (default 16,32,64)")
    p.add_argument("--crops", default="64,128,256", help="crop sizes (default 64,128,256)")
    p.add_argument("--procs", default=None,
                   help="process counts (default 1,2 on CPU; 1 and the GPU count on CUDA)")
    p.add_argument("--base-images", dest="base_images", type=int, default=None,
                   help="image count of the base run (default: the middle of --images)")
    p.add_argument("--base-crop", dest="base_crop", type=int, default=None,
                   help="crop of the base run (default: the middle of --crops)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=4, help="batch per process (default 4)")
    p.add_argument("--workers", type=int, default=0, help="loader workers per process")
    p.add_argument("--method", default="FT")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads shared by the processes (default: CPU count)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the results here (default bench/results/<time>-scale-<device>.json)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep the data, logs and checkpoints there")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each configuration this many times and keep the fastest epoch "
                        "(on a shared machine other work only slows a run down)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run (default 1800)")
    return p


def _ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


def _middle(values):
    return sorted(values)[len(values) // 2]


def plan_runs(images, crops, procs, base_images, base_crop):
    """Base run first, then one factor changed at a time; no run twice."""
    runs = [(base_images, base_crop, 1)]
    runs += [(n, base_crop, 1) for n in images]
    runs += [(base_images, c, 1) for c in crops]
    runs += [(base_images, base_crop, k) for k in procs]
    seen, out = set(), []
    for r in runs:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def epoch_seconds(records):
    """(epoch seconds, training-set size) from a run's records; None where absent."""
    epochs = [r for r in records if r["event"] == "epoch"]
    starts = [r for r in records if r["event"] == "start"]
    return (epochs[-1]["seconds"] if epochs else None,
            starts[-1]["train_images"] if starts else None)


def run_command(args, data_root, workdir, name, crop, procs):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={procs}", os.path.join(ROOT, "run.py"),
            "--data_root", data_root, "--index_dir", os.path.join(workdir, "index"),
            "--dataset", DATASET, "--task", TASK, "--step", "0", "--method", args.method,
            "--backbone", args.backbone, "--no_pretrained", "--crop_size", str(crop),
            "--batch_size", str(args.batch), "--epochs", "1", "--lr", "0.01",
            "--num_workers", str(args.workers), "--amp", args.amp, "--no_progress",
            "--device", args.device, "--logdir", os.path.join(workdir, "logs"),
            "--checkpoint_dir", os.path.join(workdir, "checkpoints"), "--name", name,
            "--resume", "never"]  # a kept folder (--keep) must not count as finished


def one_run(args, data_root, workdir, images, crop, procs, threads):
    name = f"n{images}-c{crop}-p{procs}"
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(max(1, threads // procs)))
    cmd = run_command(args, data_root, workdir, name, crop, procs)
    records_path = events_path(os.path.join(workdir, "logs", f"{TASK}-{DATASET}", name))
    if os.path.isfile(records_path):
        os.remove(records_path)  # appended to: read this run's records only
    start = time.perf_counter()
    # its own process group, so that a timeout also stops the workers torchrun started
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"case": name, "images": images, "crop": crop, "procs": procs,
                "wall_s": time.perf_counter() - start, "command": " ".join(cmd),
                "error": f"no result within --timeout {args.timeout} s"}
    wall = time.perf_counter() - start
    seconds, train_set = epoch_seconds(read_events(records_path))
    row = {"case": name, "images": images, "crop": crop, "procs": procs,
           "threads_per_proc": max(1, threads // procs), "train_set": train_set,
           "epoch_s": seconds, "wall_s": wall, "command": " ".join(cmd)}
    if proc.returncode != 0 or seconds is None:
        tail = (stderr.strip() or stdout.strip() or "no output").splitlines()[-1]
        row["error"] = f"exit code {proc.returncode}: {tail}"
        return row
    per_process = -(-train_set // procs)
    row["iters"] = per_process // args.batch
    row["s_per_iter"] = seconds / max(row["iters"], 1)
    row["images_per_s"] = row["iters"] * args.batch * procs / seconds
    return row


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        device = common.resolve_device(args.device)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    args.device = device.type
    images, crops = _ints(args.images), _ints(args.crops)
    if args.procs:
        procs = _ints(args.procs)
    elif device.type == "cuda":
        import torch
        procs = sorted({1, torch.cuda.device_count()})
    else:
        procs = [1, 2]
    base_images = args.base_images or _middle(images)
    base_crop = args.base_crop or _middle(crops)
    threads = args.threads or os.cpu_count() or 1
    runs = plan_runs(images, crops, procs, base_images, base_crop)
    image_size = max([base_crop] + crops)

    from dataset.synthetic import generate
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        data_roots = {}
        for n, crop, k in runs:
            if n not in data_roots:
                data_roots[n] = os.path.join(work, f"data-{n}")
                generate(DATASET, data_roots[n], n_train=n, n_val=VAL_IMAGES, size=image_size,
                         seed=0)
            best, epochs = None, []
            for r in range(args.repeats):
                row = one_run(args, data_roots[n],
                              os.path.join(work, f"run-n{n}-c{crop}-p{k}-{r}"), n, crop, k,
                              threads)
                shown = row.get("error") or f"epoch {row['epoch_s']:.1f} s"
                sys.stderr.write(f"[scale] {row['case']}: {shown} (wall {row['wall_s']:.0f} s)"
                                 "\n")
                epochs.append(row.get("epoch_s"))
                if row.get("error"):
                    best = row
                    break
                if best is None or row["epoch_s"] < best["epoch_s"]:
                    best = row
            best["epoch_runs_s"] = epochs
            rows.append(best)

    base = rows[0]
    for r in rows:
        if base.get("epoch_s") and r.get("epoch_s"):
            r["x_base_epoch"] = r["epoch_s"] / base["epoch_s"]
            r["x_base_per_image"] = (base["images_per_s"] / r["images_per_s"]
                                     if base.get("images_per_s") and r.get("images_per_s")
                                     else None)
    precision = "fp32" if args.amp == "off" else args.amp
    print(f"one epoch of run.py ({args.method}, {args.backbone}, batch {args.batch} per "
          f"process, {precision}) on {common.device_name(device)}, {threads} threads shared "
          f"by the processes; base run: {base['case']}; synthetic images {image_size}px")
    print(common.format_table(
        [("case", "case"), ("procs", "procs"), ("train_set", "images"), ("crop", "crop"),
         ("iters", "iters"), ("epoch_s", "epoch s"), ("s_per_iter", "s/iter"),
         ("images_per_s", "images/s"), ("x_base_epoch", "x base epoch"),
         ("x_base_per_image", "x base per image"), ("wall_s", "wall s"), ("error", "error")],
        rows))
    path = args.json or os.path.join(
        ROOT, "bench", "results",
        f"{datetime.datetime.now():%Y%m%d-%H%M%S}-scale-{common.device_slug(device)}.json")
    common.write_json(path, {"created": datetime.datetime.now().isoformat(timespec="seconds"),
                             "device": common.device_name(device), "threads": threads,
                             "argv": list(argv if argv is not None else sys.argv[1:]),
                             "settings": vars(args), "base": base["case"], "rows": rows})
    print(f"\nresults written to {path}")
    return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
