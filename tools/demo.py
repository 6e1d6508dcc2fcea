"""The one-command demo (``make demo``): incremental segmentation on synthetic Pascal-VOC
data, on the CPU, in a few minutes.

    python tools/demo.py [--out demo_output] [--jobs 2] [--fresh]

1. writes a small synthetic dataset in the Pascal VOC layout (``<out>/data``);
2. trains step 0 of the 15-5 disjoint task (background + 15 classes) with a ResNet-18 from
   scratch;
3. from that checkpoint, trains step 1 (5 new classes, old ones unlabelled) twice, side by
   side: plain fine-tuning (FT) and MiB;
4. prints the old / new / all mIoU table: FT forgets the old classes, MiB keeps them;
   writes the plots and says where they and the TensorBoard logs are.

Run it again and it reuses the data and every finished step (run manifests), and prints the
table. Each ``run.py`` command and its output are in ``<out>/console/``.
"""
import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools import experiment as ex  # noqa: E402
from utils.errors import UserError  # noqa: E402

METHODS = ("FT", "MiB")
# Sized to finish in a few minutes on 2 CPU cores; see bench/bench_methods.py for all methods.
DEMO = dict(n_train=480, n_val=100, size=64, crop_size=64, batch_size=8, epochs0=10,
            epochs1=4, lr0=0.02, lr1=0.01)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo_output"),
                   help="folder for data, checkpoints, logs and plots")
    p.add_argument("--jobs", type=int, default=2,
                   help="step-1 runs side by side (one CPU thread each)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    return p


def show(path):
    """A path relative to the working directory when it is below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def finished(cfg, job):
    """True when the run's manifest lists its step as finished and its result is there."""
    from utils.manifest import Manifest
    step = int(job.args[job.args.index("--step") + 1])
    manifest = Manifest(os.path.join(cfg.logdir, ex.TASK_NAME, job.name))
    return manifest.finished(step) and \
        os.path.isfile(os.path.join(ex.results_dir(cfg, job.name), f"step-{step}.json"))


def main(argv=None):
    from tqdm import tqdm
    args = get_parser().parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    cfg = ex.Config(out=args.out, **DEMO)
    start = time.time()
    print("MiB demo: 15-5 disjoint on synthetic VOC data, ResNet-18 from scratch on the CPU")
    print(f"output folder: {cfg.out}")
    print("data: " + ("generated" if ex.ensure_data(cfg) else "reused") + f" ({cfg.n_train} "
          f"training and {cfg.n_val} validation images, {cfg.size} px)")

    first, second = ex.plan(cfg, list(METHODS), [42])
    todo = [j for j in first + second if not finished(cfg, j)]
    total = sum(j.epochs for j in todo)
    if total:
        print(f"training: step 0 ({cfg.epochs0} epochs), then step 1 of FT and MiB "
              f"({cfg.epochs1} epochs each, side by side); each run's command and output: "
              f"{show(os.path.join(cfg.out, 'console'))}")
        with tqdm(total=total, unit="epoch", desc="demo", dynamic_ncols=True,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total} epochs [{elapsed}<{remaining}]"
                  ) as bar:
            def report(job):
                bar.write(f"  finished {job.name} in {job.seconds:.0f} s "
                          f"(output: {show(job.console)})")
            ex.run_jobs(todo, parallel=args.jobs, progress=bar, report=report)
    else:
        print("training: every step is already finished (delete the folder or pass --fresh "
              "to train again)")

    names = [j.name for j in second]
    for m in METHODS:
        ex.share_step0_results(cfg, m)
    rows = ex.summary_rows(cfg, names)
    print("\nmIoU (%) on the validation images after step 1 (old = background + classes "
          "1-15, old-bg = classes 1-15, new = classes 16-20):\n")
    print(ex.format_summary(rows))
    print("\n" + ex.markdown_table(cfg, names))
    by = {r["name"]: r for r in rows}
    ft, mib = by["FT"], by["MiB"]
    print(f"FT forgets: old classes 1-15 drop from {100 * ft['step0_all']:.1f} (step 0, all "
          f"classes) to {100 * ft['old_no_bg']:.1f}; MiB keeps {100 * mib['old_no_bg']:.1f}.")

    plot_dir = os.path.join(cfg.out, "plots")
    plots = ex.write_plots(cfg, names, plot_dir)
    from tools.results_table import plot_class_iou
    for name in names:
        doc = ex.load_step_results(cfg, name, 1)
        plots.append(plot_class_iou(doc, os.path.join(plot_dir, f"class_iou_{name}_step1.png")))
    print("\nplots:")
    for path in plots:
        print(f"  {show(path)}")
    print(f"TensorBoard logs: tensorboard --logdir {show(ex.tensorboard_dir(cfg))}")
    print(f"result files: {show(ex.results_dir(cfg, 'MiB'))}/step-1.json (and FT's)")
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
