"""The same total batch three ways, on synthetic data with one seed: 1 process x batch 24,
1 process x 12 x 2 accumulated (``--accumulate 2``), 2 processes x 12 (torchrun on gloo, or
NCCL with two GPUs).

    python bench/bench_accumulation.py --out DIR [--device cpu|cuda] [--epochs 4]
        [--crop 64] [--n_train 96] [--backbone resnet18]

Every configuration sees the same 24 images per optimiser step (the shuffle does not depend
on the process count; two processes take the even and odd positions of it), so what differs
is how BatchNorm splits them: over 24 images, over the first and last 12, or over the even
and odd 12. Prints, per configuration, the test mIoU of the last epoch, the mean training
loss of each epoch, the training time, and the largest weight difference to the 2 x 12 run
(the papers' setting). Writes ``DIR/accumulation.json``.
"""
import argparse
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = (("1 x 24", 1, 24, 1), ("1 x 12 x 2 accumulated", 1, 12, 2), ("2 x 12", 2, 12, 1))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(label, procs, batch, accumulate, args, data_root, workdir):
    name = label.replace(" ", "")
    argv = ["--data_root", data_root, "--dataset", "voc", "--task", "offline",
            "--backbone", args.backbone, "--no_pretrained", "--crop_size", str(args.crop),
            "--batch_size", str(batch), "--accumulate", str(accumulate), "--epochs",
            str(args.epochs), "--lr", "0.01", "--num_workers", "0", "--no_progress",
            "--random_seed", "1", "--name", name, "--val_interval", str(args.epochs)]
    launcher = ([] if procs == 1 else
                ["-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                 f"--master_port={free_port()}"])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // procs)))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "run.py"), *argv],
                         cwd=workdir, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
    logdir = os.path.join(workdir, "logs", "offline-voc", name)
    from utils.events import read_events
    with open(os.path.join(logdir, "results", "step-0.json")) as f:
        doc = json.load(f)
    losses = [round(r["losses"]["main"], 4) for r in read_events(logdir, "epoch")]
    return {"config": label, "processes": procs, "batch_per_process": batch,
            "accumulate": accumulate, "miou": doc["mean_iou"], "epoch_losses": losses,
            "train_seconds": doc["cost"]["train_seconds"],
            "checkpoint": os.path.join(workdir, "checkpoints", "step",
                                       f"offline-voc_{name}_0.pth")}


def weight_gap(path_a, path_b):
    import torch
    a = torch.load(path_a, map_location="cpu", weights_only=False)["model_state"]
    b = torch.load(path_b, map_location="cpu", weights_only=False)["model_state"]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a
               if a[k].is_floating_point() and "running" not in k)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--n_train", type=int, default=96)
    p.add_argument("--backbone", default="resnet18")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data_root = os.path.join(args.out, "data")
    from dataset.synthetic import generate
    generate("voc", data_root, n_train=args.n_train, n_val=24, size=args.crop, seed=0)
    rows = [run_config(*config, args, data_root, args.out) for config in CONFIGS]
    for row in rows:
        row["max_weight_gap_to_2x12"] = weight_gap(row["checkpoint"], rows[-1]["checkpoint"])
    print("| configuration | test mIoU | main loss per epoch | train s | max |w - w(2x12)| |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {100 * r['miou']:.1f} | {r['epoch_losses']} | "
              f"{r['train_seconds']:.1f} | {r['max_weight_gap_to_2x12']:.2e} |")
    with open(os.path.join(args.out, "accumulation.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
