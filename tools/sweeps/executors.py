"""Where the units of a sweep run, and the progress bar over the whole grid.

* ``here`` (default): this process runs ``--jobs`` units side by side through
  ``tools.experiment.run_jobs``, each pinned to its own CPU cores (``--threads-per-job``) or
  GPUs (``--gpus-per-job``, through CUDA_VISIBLE_DEVICES; torchrun when a run gets several).
* ``slurm``, ``local``, ``debug``: each unit is a job of ``submitit`` (a cell's job also
  carries its step-0 run, skipped when finished): on a SLURM cluster (partition, GPUs per
  job, time limit; one ``torchrun`` per job on its allocated GPUs), as local processes, or in
  this process (submitit's debug executor). Jobs are requeued by submitit when they reach the
  time limit (``UnitJob.checkpoint``), and ``run.py`` continues from the last finished epoch.

In both, a cell starts once its step-0 run has finished, a failed unit does not stop the
others (the cells of a failed step-0 run are reported as not started), and every outcome is
reported as it comes.
"""
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass

from tools import experiment
from utils.errors import UserError
from utils.events import read_events

from .jobs import Outcome, Resources, UnitJob, UnitRunner, write_attempt
from .plan import finished_steps
from .spec import SweepError

ROOT = experiment.ROOT
SUBMITIT_POLL_SECONDS = 2.0
PROGRESS_SECONDS = 2.0
LOCAL_TIME_LIMIT_MIN = 7 * 24 * 60     # submitit's local executor stops jobs at 2 min otherwise
MAX_REQUEUES = 20                      # time-limit requeues of one job before it gives up


class UnitFailed(Exception):
    """A unit that did not finish (its ``Outcome`` says why); its dependents do not start."""

    def __init__(self, outcome):
        super().__init__(f"{outcome.name} {outcome.status}: {outcome.message}")
        self.outcome = outcome


# --- resources --------------------------------------------------------------------------------

def visible_gpus():
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES when set, else every GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def usable_cores():
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclass
class Placement:
    """How units side by side share this machine: ``jobs`` at a time, each with ``threads``
    CPU threads (on its own cores when there are enough) and ``gpus_per_job`` GPUs."""
    jobs: int
    threads: int
    gpus_per_job: int
    gpus: list
    cores: list

    def for_slot(self, slot):
        """The ``Resources`` of the ``slot``-th place (0..jobs-1)."""
        g = self.gpus_per_job
        env = {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus[slot * g:(slot + 1) * g])}
        pinned = len(self.cores) >= self.jobs * self.threads
        cores = tuple(self.cores[slot * self.threads:(slot + 1) * self.threads]) if pinned else ()
        return Resources(self.threads, env, g, cores)


def placement(jobs=None, threads=None, gpus_per_job=None):
    """The ``Placement`` for the options given (None: the defaults: one GPU per run and one
    run per GPU where there are GPUs; one run at a time with every core on a CPU)."""
    gpus = visible_gpus()
    if gpus_per_job is None:
        gpus_per_job = 1 if gpus else 0
    if gpus_per_job > len(gpus):
        raise SweepError(f"--gpus-per-job {gpus_per_job}, but {len(gpus)} GPU(s) are visible")
    if jobs is None:
        jobs = len(gpus) // gpus_per_job if gpus_per_job else 1
    if gpus_per_job and jobs * gpus_per_job > len(gpus):
        raise SweepError(f"--jobs {jobs} x --gpus-per-job {gpus_per_job} needs "
                         f"{jobs * gpus_per_job} GPUs; {len(gpus)} are visible")
    cores = usable_cores()
    if threads is None:
        threads = max(1, len(cores) // jobs)
    return Placement(jobs, threads, gpus_per_job, gpus, cores)


# --- progress ---------------------------------------------------------------------------------

def unit_epochs(unit):
    """(epochs done, epochs in all) of a unit, from its manifest and records."""
    finished = set(finished_steps(unit))
    records = read_events(unit.logdir)
    done = sum(e if s in finished else min(e, experiment.epochs_done(records, s))
               for s, e in unit.epochs.items())
    return done, sum(unit.epochs.values())


class GridProgress:
    """A tqdm bar in epochs over every unit of the plan, the finished ones included; a thread
    reads the runs' records every ``PROGRESS_SECONDS``. ``report(outcome)`` prints an
    outcome above the bar."""

    def __init__(self, units):
        self.units = list(units)
        self.done = {u.name: unit_epochs(u)[0] for u in self.units}
        self.counts = {"finished": 0, "failed": 0, "interrupted": 0}
        self._stop = threading.Event()

    def __enter__(self):
        from tqdm import tqdm
        self.bar = tqdm(total=sum(unit_epochs(u)[1] for u in self.units),
                        initial=sum(self.done.values()), unit="epoch", desc="sweep",
                        dynamic_ncols=True, mininterval=1.0,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total} epochs "
                                   "[{elapsed}<{remaining}]{postfix}")
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()
        self.bar.close()

    def _follow(self):
        while not self._stop.wait(PROGRESS_SECONDS):
            self._update()

    def _update(self):
        for unit in self.units:
            try:
                now = unit_epochs(unit)[0]
            except UserError:
                continue        # a manifest being replaced; read again next time
            if now > self.done[unit.name]:
                self.bar.update(now - self.done[unit.name])
                self.done[unit.name] = now

    def report(self, outcome):
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        self.bar.write(outcome_line(outcome), file=sys.stderr)
        self.bar.set_postfix_str(", ".join(f"{n} {k}" for k, n in self.counts.items() if n))


def outcome_line(outcome):
    if outcome.status == "finished":
        return f"finished {outcome.name} ({outcome.seconds:.0f} s)"
    code = "" if outcome.exit_code is None else f" (exit {outcome.exit_code})"
    return f"{outcome.status} {outcome.name}{code}: {outcome.message}; log: {outcome.console}"


# --- here -------------------------------------------------------------------------------------

def run_here(todo, where, progress):
    """Run the units ``todo`` in this process, ``where.jobs`` at a time; {name: Outcome}."""
    outcomes = {}

    def runner(unit, slot, on_progress, stop):
        outcome = outcomes[unit.name] = UnitRunner(where.for_slot(slot), stop).run(unit)
        progress.report(outcome)
        if outcome.status != "finished":
            raise UnitFailed(outcome)

    def on_failure(unit, error):
        if unit.name not in outcomes:      # not started: the step-0 run it needs failed
            outcomes[unit.name] = Outcome(unit.name, "failed", unit.console, None, str(error))
            progress.report(outcomes[unit.name])

    experiment.run_jobs(todo, parallel=where.jobs, runner=runner, keep_going=True,
                        on_failure=on_failure)
    return outcomes


# --- submitit ---------------------------------------------------------------------------------

@dataclass
class ClusterSettings:
    """The submitit parameters of the jobs (the [slurm] table of the sweep file, then the
    command line)."""
    partition: str = None
    gpus_per_job: int = 0
    cpus_per_job: int = None
    mem_gb: float = None
    time: int = None              # minutes
    setup: tuple = ()             # shell lines run before each job (module load ...)
    additional: dict = None       # other sbatch options, e.g. {"account": "..."}


def submitit_parameters(kind, settings):
    """``AutoExecutor.update_parameters`` keywords for ``kind`` (slurm / local / debug)."""
    if kind == "slurm" and settings.time is None:
        raise SweepError("--executor slurm needs a time limit per job: --time MINUTES (or "
                         "time = ... in the [slurm] table of the sweep file)")
    params = {"timeout_min": settings.time or LOCAL_TIME_LIMIT_MIN, "nodes": 1,
              "tasks_per_node": 1, "gpus_per_node": settings.gpus_per_job,
              "cpus_per_task": settings.cpus_per_job, "mem_gb": settings.mem_gb}
    if kind == "slurm":
        params.update(slurm_partition=settings.partition, slurm_setup=list(settings.setup),
                      slurm_additional_parameters=settings.additional or None)
    return {k: v for k, v in params.items() if v is not None}


def make_executor(kind, folder, settings):
    """A ``submitit.AutoExecutor`` for ``kind``; its jobs find this project (PYTHONPATH)."""
    params = submitit_parameters(kind, settings)
    try:
        import submitit
    except ModuleNotFoundError:
        raise SweepError(f"--executor {kind} needs submitit: pip install submitit (it is in "
                         "requirements-test.txt)") from None
    if kind == "slurm" and shutil.which("srun") is None:
        raise SweepError("--executor slurm: srun is not on PATH, so this is not a SLURM "
                         "cluster; use --executor here (or local)")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    executor = submitit.AutoExecutor(folder=folder, cluster=kind,
                                     slurm_max_num_timeout=MAX_REQUEUES,
                                     local_max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(**params)
    return executor


def job_resources(kind, settings, where, slot):
    """What the runs of a job get: on SLURM the allocation (CUDA_VISIBLE_DEVICES is SLURM's),
    elsewhere the ``slot``-th place of this machine."""
    if kind == "slurm":
        g = settings.gpus_per_job
        return Resources(max(1, (settings.cpus_per_job or 1) // max(1, g)), {}, g, ())
    return where.for_slot(slot)


def collect(job, unit):
    """The outcomes of a finished job, by unit name; a job that died is one failed outcome
    naming submitit's log of it."""
    try:
        return {o.name: o for o in job.result()}
    except Exception as e:          # the job process died (killed, out of memory, node lost)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        message = f"job {job.job_id} ended without a result ({first})"
        write_attempt(unit.logdir, "failed", message=message, console=str(job.paths.stderr))
        return {unit.name: Outcome(unit.name, "failed", str(job.paths.stderr), None, message)}


class SubmititDriver:
    """Submits the units as jobs (a cell once its step-0 run has finished, at most ``limit``
    at a time) and follows them to the end."""

    def __init__(self, plan, kind, settings, where):
        self.plan, self.kind, self.settings, self.where = plan, kind, settings, where
        self.limit = where.jobs if kind != "slurm" else None
        self.executor = make_executor(kind, os.path.join(plan.sweep.out, "submitit"), settings)
        self.active = {}          # name -> (job, slot, unit)
        self.outcomes = {}
        self.progress = None

    def run(self, todo, progress):
        self.progress = progress
        pending, names = list(todo), {u.name for u in todo}
        slots = list(range(self.limit or len(todo)))
        try:
            while pending or self.active:
                for unit in list(pending):
                    if not slots:
                        break
                    if self._blocked(unit, names):
                        continue
                    pending.remove(unit)
                    if unit.name not in self.outcomes:
                        self._submit(unit, slots.pop(0))
                self._collect(slots)
                if pending or self.active:
                    time.sleep(SUBMITIT_POLL_SECONDS)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        return self.outcomes

    def _blocked(self, unit, names):
        """True while a cell's step-0 run is still to finish; a cell of a failed step-0 run
        is given its outcome (not started) and is not blocked."""
        dep = unit.after
        if dep is None or dep not in names:
            return False
        if dep in self.outcomes and self.outcomes[dep].status != "finished":
            self._report(Outcome(unit.name, "failed", unit.console, None,
                                 f"not started: its step-0 run {dep} did not finish"))
            return False
        return dep not in self.outcomes

    def _submit(self, unit, slot):
        units = [self.plan.unit(unit.after), unit] if unit.after else [unit]
        self.executor.update_parameters(name=unit.name)
        job = self.executor.submit(UnitJob(), units,
                                   job_resources(self.kind, self.settings, self.where, slot))
        write_attempt(unit.logdir, "submitted", job=job.job_id, console=unit.console,
                      executor=self.kind, submitit_log=str(job.paths.stdout))
        self.active[unit.name] = (job, slot, unit)

    def _collect(self, slots):
        for name, (job, slot, unit) in list(self.active.items()):
            if not job.done():
                continue
            del self.active[name]
            slots.append(slot)
            outcomes = collect(job, unit)
            guard = outcomes.pop(unit.after, None)      # the cell's step-0 run, normally done
            if guard is not None and guard.status != "finished" and \
                    unit.after not in self.outcomes:
                self._report(guard)
            self._report(outcomes.get(unit.name) or Outcome(
                unit.name, "failed", unit.console, None,
                f"not started: its step-0 run {unit.after} did not finish"))

    def _report(self, outcome):
        self.outcomes[outcome.name] = outcome
        self.progress.report(outcome)

    def _interrupted(self):
        """Ctrl-C: local jobs are stopped (their runs stay resumable); SLURM jobs go on."""
        if self.kind == "slurm":
            ids = " ".join(job.job_id for job, _, _ in self.active.values())
            sys.stderr.write(f"the submitted SLURM jobs keep running ({ids or 'none'}); "
                             "'status' follows them, scancel stops them\n")
            return
        for job, _, _ in self.active.values():
            job.cancel()
        deadline = time.time() + 60
        while time.time() < deadline and not all(j.done() for j, _, _ in self.active.values()):
            time.sleep(0.5)


def executor_for(plan, kind, where, settings):
    """``run(todo, progress) -> {name: Outcome}`` for the executor ``kind``, made (and its
    settings checked) before anything starts."""
    if kind == "here":
        return lambda todo, progress: run_here(todo, where, progress)
    return SubmititDriver(plan, kind, settings, where).run
