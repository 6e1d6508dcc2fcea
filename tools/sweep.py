"""The paper's tables in one command: a sweep over methods, tasks, seeds and class orders,
on this machine or a SLURM cluster (``docs/sweeps.md``).

    python tools/sweep.py plan   SWEEP.toml [--commands]
    python tools/sweep.py run    SWEEP.toml [--jobs N] [--threads-per-job T] [--gpus-per-job G]
                                 [--executor here|local|debug|slurm] [--partition P]
                                 [--time MIN] [--cpus-per-job C] [--mem-gb M]
    python tools/sweep.py status SWEEP.toml
    python tools/sweep.py table  SWEEP.toml [--old-without-bg] [--out DIR]

``plan`` lists the runs (``<method>-<task>[-ov]-s<seed>[-o<order>]``), the shared step-0 runs
and how many step-0 trainings the sharing saves, and what is finished. ``run`` trains what
is missing (and retries what failed): step-0 runs first, each cell once its step 0 is done;
a failed run does not stop the others; Ctrl-C stops every run at its last finished epoch and
``run`` again continues. ``status`` shows finished / running / failed per run, with the log
of each failure. ``table`` writes old / new / all / avg / hIoU, mean ± std over seeds (and
class orders), as Markdown (printed), CSV and LaTeX, and plots of all-mIoU after each step.
Every mistake is one ``error:`` line and exit code 1.
"""
import argparse
import contextlib
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.errors import UserError  # noqa: E402


class Parser(argparse.ArgumentParser):
    """argparse with the project's error line: ``error: ...`` and exit code 1."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(1)


def get_parser():
    p = Parser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = sub.add_parser("plan", help="the runs, the shared step-0 runs, what is finished")
    cmd.add_argument("--commands", action="store_true",
                     help="also print the run.py commands of every run")
    cmd = sub.add_parser("run", help="train what is missing or failed")
    cmd.add_argument("--executor", choices=("here", "local", "debug", "slurm"), default="here",
                     help="here: side by side in this process (default); slurm: one SLURM "
                          "job per run through submitit; local / debug: submitit's local "
                          "processes / in-process executor")
    cmd.add_argument("--jobs", type=int, default=None,
                     help="runs at a time (here, local; default: one per GPU, else 1)")
    cmd.add_argument("--threads-per-job", type=int, default=None,
                     help="CPU threads of each run (default: the cores / --jobs); each run is "
                          "pinned to its own cores when there are enough")
    cmd.add_argument("--gpus-per-job", type=int, default=None,
                     help="GPUs of each run (default: 1 where there are GPUs, else 0); with "
                          "more than one, each run is a torchrun with one process per GPU")
    cmd.add_argument("--partition", help="SLURM partition")
    cmd.add_argument("--time", type=int, metavar="MIN",
                     help="time limit of each job in minutes (SLURM: required; a job that "
                          "reaches it is requeued and continues)")
    cmd.add_argument("--cpus-per-job", type=int, help="SLURM: CPUs of each job")
    cmd.add_argument("--mem-gb", type=float, help="SLURM: memory of each job (GB)")
    sub.add_parser("status", help="finished / running / failed per run")
    cmd = sub.add_parser("table", help="the paper's table and plots of the finished cells")
    cmd.add_argument("--old-without-bg", dest="with_bg", action="store_false", default=True,
                     help="old classes without the background (default: with it)")
    cmd.add_argument("--out", metavar="DIR",
                     help="where the table files and plots go (default: <out>/tables)")
    for cmd in sub.choices.values():
        cmd.add_argument("sweep", metavar="SWEEP.toml", help="the sweep file")
    return p


def cluster_settings(sweep, args):
    """The [slurm] table of the sweep file, overridden by the command line."""
    from tools.sweeps.executors import ClusterSettings
    file = sweep.slurm
    settings = ClusterSettings(
        partition=args.partition or file.get("partition"),
        gpus_per_job=args.gpus_per_job if args.gpus_per_job is not None
        else file.get("gpus_per_job", 0),
        cpus_per_job=args.cpus_per_job or file.get("cpus_per_job"),
        mem_gb=args.mem_gb or file.get("mem_gb"),
        time=args.time or file.get("time"),
        setup=tuple(file.get("setup", ())), additional=file.get("additional"))
    return settings


def check_counts(args):
    for name in ("jobs", "threads_per_job", "time", "cpus_per_job"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.gpus_per_job is not None and args.gpus_per_job < 0:
        raise UserError(f"--gpus-per-job must be 0 or more, got {args.gpus_per_job}")


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP stop a sweep as Ctrl-C does (every run stays resumable), except
    one that was ignored when the sweep started (``nohup`` ignores SIGHUP: logging out must
    not stop the sweep). SIGINT is always heard, even when the shell started the sweep with
    it ignored (a background job of a script): it is how the sweep stops its runs, and a
    run.py inherits an ignored SIGINT. The handlers before are back afterwards."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    before = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
    if before[signal.SIGINT] == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) != signal.SIG_IGN:
            before[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def command_run(plan, args):
    from tools.sweeps import executors
    from tools.sweeps.plan import is_finished
    from tools.sweeps.spec import shown
    check_counts(args)
    todo = [u for u in plan.units if not is_finished(u)]
    if not todo:
        print(f"every run of sweep {plan.sweep.name} is finished; 'table' writes the table")
        return 0
    where = executors.placement(args.jobs if args.executor != "slurm" else 1,
                                args.threads_per_job,
                                args.gpus_per_job if args.executor != "slurm" else 0)
    settings = cluster_settings(plan.sweep, args)
    run_units = executors.executor_for(plan, args.executor, where, settings)
    how = (f"{where.jobs} at a time, {where.threads} thread(s) and {where.gpus_per_job} GPU(s) "
           "each" if args.executor != "slurm" else
           f"SLURM jobs of {settings.gpus_per_job} GPU(s), {settings.time} min")
    print(f"sweep {plan.sweep.name}: {len(todo)} of {len(plan.units)} runs to train "
          f"({args.executor}: {how}); outputs under {shown(plan.sweep.out)}", flush=True)
    try:
        with stop_on_signals(), executors.GridProgress(plan.units) as progress:
            outcomes = run_units(todo, progress)
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted: every run stopped at its last finished epoch; "
                         f"'python tools/sweep.py run {shown(plan.sweep.path)}' continues "
                         "them\n")
        return 130
    failed = [o for o in outcomes.values() if o.status != "finished"]
    if failed:
        sys.stderr.write(f"error: {len(failed)} of {len(outcomes)} runs did not finish (see "
                         "the lines above, or 'status'); 'run' again retries only them\n")
        return 1
    print(f"sweep {plan.sweep.name}: every run finished; 'table' writes the table")
    return 0


def command_table(plan, args):
    from tools.sweeps.report import write_table
    from tools.sweeps.spec import shown
    out = os.path.abspath(args.out) if args.out else os.path.join(plan.sweep.out, "tables")
    markdown, notes, paths = write_table(plan, out, args.with_bg)
    sys.stdout.write(markdown)
    for note in notes:
        sys.stderr.write(f"note: {note}\n")
    print("written: " + ", ".join(shown(p) for p in paths))
    return 0


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        from tools.sweeps.plan import build_plan
        from tools.sweeps.report import plan_text, status_text
        from tools.sweeps.spec import load_sweep
        plan = build_plan(load_sweep(args.sweep))
        if args.command == "plan":
            sys.stdout.write(plan_text(plan, args.commands))
            return 0
        if args.command == "status":
            sys.stdout.write(status_text(plan))
            return 0
        if args.command == "run":
            return command_run(plan, args)
        return command_table(plan, args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
