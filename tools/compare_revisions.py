"""Bit-for-bit comparison of every method between two revisions of this project.

    python tools/compare_revisions.py                       # base 1de2643 vs the working tree
    python tools/compare_revisions.py --base REV --methods FT,MiB --keep OUT

Trains FT, LwF, LwF-MC, ILT, EWC, RW, PI, MiB and PLOP over the 3 steps of VOC 10-5-5 on a
tiny synthetic dataset on the CPU (ResNet-18 from scratch, 32 px crops, 1 epoch) with the code
of ``--base`` (exported with ``git archive`` into a temporary folder) and with the working
tree, one process per revision, then compares for every method and step: the model state,
the optimiser and scheduler states, the trainer state and the trainer's full resume state of
the step checkpoints, and the per-class IoU of the result files. Equal means equal bits
(tensors by ``torch.equal`` and dtype, numbers by ``==``). Prints one line per method and
step and exits 1 if anything differs. A refactor of the core must leave every line "same".
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("FT", "LwF", "LwF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP")
TASK = "10-5-5"
STEPS = (0, 1, 2)

# what each revision runs (in its own tree, as its own process)
CHILD = r"""
import sys, torch
torch.set_num_threads(1)
import run
data, out, methods = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
for method in methods:
    run.main(["--data_root", data, "--dataset", "voc", "--task", "10-5-5", "--step", "all",
              "--method", method, "--name", method, "--backbone", "resnet18",
              "--no_pretrained", "--crop_size", "32", "--batch_size", "4", "--epochs", "1",
              "--lr", "0.01", "--num_workers", "0", "--no_progress",
              "--checkpoint_dir", out + "/checkpoints", "--logdir", out + "/logs",
              "--index_dir", out + "/index"])
"""


def export_revision(rev, dest):
    """The tree of ``rev`` in ``dest`` (no git worktree bookkeeping left behind)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def train_revision(tree, data, out, methods):
    """Train ``methods`` with the code of ``tree`` into ``out`` (emptied first)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, data, out, ",".join(methods)],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"training with the tree {tree} failed (exit {proc.returncode})")
    return time.perf_counter() - start


def differences(a, b, path=""):
    """Where two nested checkpoint entries differ (empty when equal bit for bit)."""
    import torch
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype \
                or a.shape != b.shape or not torch.equal(a, b):
            return [path]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [path]


def compare(out_a, out_b, method):
    """(step, {entry: [differences]}, mean IoU) per step of ``method``."""
    import torch
    rows = []
    for step in STEPS:
        name = f"{TASK}-voc_{method}_{step}.pth"
        ca = torch.load(os.path.join(out_a, "checkpoints", name), map_location="cpu",
                        weights_only=False)
        cb = torch.load(os.path.join(out_b, "checkpoints", name), map_location="cpu",
                        weights_only=False)
        found = {}
        for entry in ("model_state", "optimizer_state", "scheduler_state", "trainer_state"):
            found[entry] = differences(ca.get(entry), cb.get(entry))
        found["trainer_full"] = differences(ca["resume_state"]["trainer"],
                                            cb["resume_state"]["trainer"])
        results = []
        for out in (out_a, out_b):
            path = os.path.join(out, "logs", f"{TASK}-voc", method, "results", f"step-{step}.json")
            with open(path) as f:
                results.append(json.load(f))
        found["class_iou"] = differences(results[0]["class_iou"], results[1]["class_iou"])
        miou = results[0]["mean_iou"]
        rows.append((step, found, miou))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="1de2643", help="revision to compare against")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--keep", default=None, help="keep the runs in this folder")
    parser.add_argument("--reuse_base", action="store_true",
                        help="with --keep: reuse the base runs of an earlier call")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    work = args.keep or tempfile.mkdtemp(prefix="compare-revisions-")
    os.makedirs(work, exist_ok=True)
    base_tree = os.path.join(work, "base-tree")
    if not os.path.isdir(base_tree):
        os.makedirs(base_tree)
        export_revision(args.base, base_tree)
    data = os.path.join(work, "data")
    if not os.path.isdir(data):
        sys.path.insert(0, ROOT)
        from dataset.synthetic import generate
        generate("voc", data, n_train=48, n_val=12, size=40, seed=0)
    out_base, out_head = os.path.join(work, "base"), os.path.join(work, "head")
    reuse = args.reuse_base and os.path.isfile(os.path.join(out_base, "done"))
    seconds = {"base": 0.0 if reuse else train_revision(base_tree, data, out_base, methods)}
    with open(os.path.join(out_base, "done"), "w") as f:
        f.write(",".join(methods) + "\n")
    seconds["head"] = train_revision(ROOT, data, out_head, methods)
    print(f"base {args.base} ({seconds['base']:.0f} s) vs working tree {ROOT} "
          f"({seconds['head']:.0f} s): VOC {TASK}, steps {STEPS}, synthetic data, CPU")
    ok = True
    for method in methods:
        for step, found, miou in compare(out_base, out_head, method):
            bad = {k: v for k, v in found.items() if v}
            ok &= not bad
            what = "same" if not bad else "DIFFERENT " + "; ".join(
                f"{k}: {', '.join(v[:3])}" for k, v in bad.items())
            print(f"{method:7s} step {step}  mIoU {miou:.6f}  "
                  f"model/optimizer/scheduler/trainer/full/IoU {what}")
    print("all equal bit for bit" if ok else "differences found")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
