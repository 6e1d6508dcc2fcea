"""The method comparison of the MiB paper on synthetic VOC data: 15-5 disjoint, a ResNet-18
trained from scratch on the CPU, step 0 then step 1 of each method from the same step-0
checkpoint; prints old / new / all mIoU per method.

    python bench/bench_methods.py                    # all eight methods (13 min on 2 idle cores)
    python bench/bench_methods.py --quick            # FT, LwF, ILT, MiB: one step 0 (5 min)
    python bench/bench_methods.py --seeds 1,2        # mean ± std over training seeds
    python bench/bench_methods.py --methods FT,MiB --epochs0 6
    python bench/bench_methods.py --plop             # FT, MiB, PLOP on 15-5 and 15-1
                                                     # overlapped, 3 seeds (45 min)

Step 0 is trained once per kind of step 0 (see tools/experiment.py): FT, LwF, ILT and MiB
share the cross-entropy step 0; LwF-MC trains its own with BCE (as the original does); EWC,
PI and RW each train one too, with the same weights as the cross-entropy one, because their
step 1 needs the importances collected during step 0. Every run goes through ``run.py``;
each one's command and output are in ``<out>/console/<name>.txt``, TensorBoard logs and
result files in ``<out>/logs/15-5-voc/<name>/``. A rerun reuses finished runs (the
manifests); ``--fresh`` starts over.

Learning rates: 0.02 at step 0 and 0.01 at step 1, except EWC, PI and RW at step 1: they
get the paper's 0.001, because with their penalty weights (500, 500, 100 on importances
normalised to at most 1 or 2) SGD with momentum 0.9 at 0.01 is unstable and the weights blow
up (``--lr1 0.001`` gives every method the paper's rate). Figures are percentages; "old" is
the mean IoU of background and classes 1-15, "old-bg" of classes 1-15 alone. Nothing here
passes or fails: the "expected" lines say whether the paper's ordering shows.

``--plop`` compares FT, MiB and PLOP over whole sequences: VOC 15-5 (two steps) and 15-1 (six
steps) overlapped, seeds 1, 2, 3 unless ``--seeds`` says otherwise, through the sweep tool
(``tools/sweep.py``: it writes ``<out>/sweep.toml`` and trains one cross-entropy step 0 per
task and seed for the three methods). Every step after the first trains ``--epochs1`` epochs
at ``--lr1``. It prints the sweep's table (old / new / all / avg / hIoU at the last step, mean
± std over the seeds) and PLOP's and MiB's training cost per image at the steps after the
first relative to FT's, from the runs' ``events.jsonl`` (the runs share the cores, so these
ratios are rough; ``bench/bench_train.py --methods FT,MiB,PLOP`` measures them alone).
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

QUICK_METHODS = ("FT", "LWF", "ILT", "MiB")
REGULARISERS = ("EWC", "PI", "RW")
PLOP_METHODS = ("FT", "MiB", "PLOP")
PLOP_TASKS = ("15-5", "15-1")
PLOP_SEEDS = "1,2,3"


def get_parser():
    d = ex.Config(out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None,
                   help="folder for data, checkpoints, logs (default: bench/results/methods, "
                        "with --plop bench/results/plop)")
    p.add_argument("--quick", action="store_true",
                   help=f"only {', '.join(QUICK_METHODS)} (they share one step 0)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(ex.METHODS)}")
    p.add_argument("--plop", action="store_true",
                   help=f"{', '.join(PLOP_METHODS)} on {' and '.join(PLOP_TASKS)} overlapped "
                        "over every step, through tools/sweep.py")
    p.add_argument("--seeds", default=None,
                   help=f"training seeds (comma-separated; default 42, with --plop {PLOP_SEEDS})")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs side by side (one CPU thread each)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    g = p.add_argument_group("data and schedule")
    g.add_argument("--n_train", type=int, default=d.n_train)
    g.add_argument("--n_val", type=int, default=d.n_val)
    g.add_argument("--size", type=int, default=d.size, help="longer image side")
    g.add_argument("--data_seed", type=int, default=d.data_seed)
    g.add_argument("--crop_size", type=int, default=d.crop_size)
    g.add_argument("--batch_size", type=int, default=d.batch_size)
    g.add_argument("--epochs0", type=int, default=d.epochs0)
    g.add_argument("--epochs1", type=int, default=d.epochs1)
    g.add_argument("--lr0", type=float, default=d.lr0)
    g.add_argument("--lr1", type=float, default=d.lr1)
    g.add_argument("--lr1_reg", type=float, default=0.001,
                   help="step-1 learning rate of EWC, PI and RW")
    return p


def parse_methods(args):
    if args.methods:
        valid = ex.METHODS + ("PLOP",) if args.plop else ex.METHODS
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        by_upper = {m.upper(): m for m in valid}
        unknown = [m for m in wanted if m.upper() not in by_upper]
        if unknown:
            raise SystemExit(f"error: unknown method {unknown[0]}; valid: "
                             f"{', '.join(valid)}"
                             + ("" if args.plop else " (PLOP: with --plop)"))
        return [by_upper[m.upper()] for m in wanted]
    return list(QUICK_METHODS if args.quick else ex.METHODS)


def load_average():
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def expectations(rows, suffix=""):
    """The paper's qualitative result, checked on the rows of one seed."""
    by = {r["name"][:len(r["name"]) - len(suffix)]: r for r in rows
          if r["name"].endswith(suffix)}
    lines = []
    if "FT" in by:
        ft = by["FT"]
        lines.append(f"FT forgets the old classes (old-bg {100 * ft['old_no_bg']:.1f} vs "
                     f"{100 * ft['step0_all']:.1f} all at step 0): "
                     f"{'yes' if ft['old_no_bg'] < 0.05 else 'NO'}")
    if "MiB" in by:
        mib = by["MiB"]
        for other in ("FT", "LWF", "ILT"):
            if other in by:
                ok = mib["old"] > by[other]["old"]
                lines.append(f"MiB keeps more old classes than {other} ({100 * mib['old']:.1f} "
                             f"vs {100 * by[other]['old']:.1f}): {'yes' if ok else 'NO'}")
    return lines


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def plop_sweep_text(cfg, methods, seeds):
    """The sweep file of the PLOP comparison; paths are relative to ``cfg.out``, where it
    is written."""
    lines = ['name = "plop-comparison"', 'out = "."',
             f"data_root = {toml_value(os.path.relpath(cfg.data_root, cfg.out))}",
             f"methods = {toml_value(list(methods))}", f"seeds = {toml_value(list(seeds))}"]
    for task in PLOP_TASKS:
        lines += ["", "[[tasks]]", f"task = {toml_value(task)}", "overlap = true"]
    options = {"backbone": cfg.backbone, "no_pretrained": True, "crop_size": cfg.crop_size,
               "batch_size": cfg.batch_size, "num_workers": 0,
               "val_interval": max(cfg.epochs0, cfg.epochs1)}
    lines += ["", "[options]"] + [f"{k} = {toml_value(v)}" for k, v in options.items()]
    lines += ["", "[datasets.voc]", f"epochs = {toml_value([cfg.epochs0, cfg.epochs1])}",
              f"lr = {toml_value([cfg.lr0, cfg.lr1])}"]
    return "\n".join(lines) + "\n"


def training_cost(logs_root, methods):
    """Seconds per training image at the steps after the first, per method, over every run
    of the sweep below ``logs_root`` (named ``<method>-<task>...``)."""
    from utils.events import read_events
    seconds, images = {}, {}
    for task_dir in sorted(os.listdir(logs_root)) if os.path.isdir(logs_root) else ():
        for run in sorted(os.listdir(os.path.join(logs_root, task_dir))):
            method = next((m for m in methods if run.startswith(m + "-")), None)
            if method is None:
                continue
            for record in read_events(os.path.join(logs_root, task_dir, run), "epoch"):
                if record.get("step", 0) > 0:
                    seconds[method] = seconds.get(method, 0.0) + record["seconds"]
                    images[method] = images.get(method, 0) + record["images"]
    return {m: seconds[m] / images[m] for m in seconds if images.get(m)}


def plop_comparison(args, cfg, methods, seeds):
    from tools import sweep
    from utils.checkpoint import atomic_write_text
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "sweep.toml")
    atomic_write_text(path, plop_sweep_text(cfg, methods, seeds))
    print(f"sweep file: {path}\n")
    for command in (["plan", path], ["run", path, "--jobs", str(args.jobs)]):
        print("$ python tools/sweep.py " + " ".join(command), flush=True)
        code = sweep.main(command)
        if code:
            return code
    print("\n$ python tools/sweep.py table " + path, flush=True)
    code = sweep.main(["table", path])
    cost = training_cost(os.path.join(cfg.out, "logs"), methods)
    if "FT" in cost:
        print("\ntraining cost per image at the steps after the first (all runs; runs "
              "side by side share the cores):")
        for m in methods:
            if m in cost:
                print(f"  {m:<5} {1000 * cost[m]:7.2f} ms/image  {cost[m] / cost['FT']:.2f}x FT")
    return code


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.plop and args.methods is None:
        args.methods = ",".join(PLOP_METHODS)
    if args.out is None:
        args.out = os.path.join(ROOT, "bench", "results", "plop" if args.plop else "methods")
    methods = parse_methods(args)
    seeds = [int(s) for s in (args.seeds or (PLOP_SEEDS if args.plop else "42")).split(",")
             if s.strip()]
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    cfg = ex.Config(out=args.out, n_train=args.n_train, n_val=args.n_val, size=args.size,
                    data_seed=args.data_seed, crop_size=args.crop_size,
                    batch_size=args.batch_size, epochs0=args.epochs0, epochs1=args.epochs1,
                    lr0=args.lr0, lr1=args.lr1, lr1_of={m: args.lr1_reg for m in REGULARISERS})
    start = time.time()
    print(f"methods: {', '.join(methods)}; seeds: {', '.join(map(str, seeds))}; "
          f"{args.jobs} runs side by side; {load_average()}")
    print(f"config: {cfg}")
    generated = ex.ensure_data(cfg)
    print(f"data: {'generated' if generated else 'reused'} {cfg.data_root}")
    if args.plop:
        code = plop_comparison(args, cfg, methods, seeds)
        print(f"\ntotal {time.time() - start:.0f} s; {load_average()}")
        return code

    first, second = ex.plan(cfg, methods, seeds)
    print("\ncommands (from the repository root), e.g.:")
    for job in (first[0], second[0]):
        print("  " + ex.command_text(job.args))

    def report(job):
        print(f"  {job.name:<16} {job.seconds:7.1f} s   ({load_average()})", flush=True)

    print("\nruns (seconds each, as they finish; step 1 of a method starts once its step 0 "
          "is done):")
    ex.run_jobs(first + second, parallel=args.jobs, report=report)

    names = [job.name for job in second]
    for seed in seeds:
        for m in methods:
            ex.share_step0_results(cfg, m, ex.seed_suffix(seed, seeds))
    rows = ex.summary_rows(cfg, names)
    print("\n" + ex.format_summary(rows))
    print("\n" + ex.markdown_table(cfg, names))
    for seed in seeds:
        for line in expectations(rows, ex.seed_suffix(seed, seeds)):
            print(f"expected (seed {seed}): {line}")
    print(f"\ntotal {time.time() - start:.0f} s; {load_average()}")
    print(f"logs: {ex.tensorboard_dir(cfg)} (tensorboard --logdir {ex.tensorboard_dir(cfg)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
