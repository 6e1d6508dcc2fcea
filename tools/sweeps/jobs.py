"""Running the commands of one unit (a shared step-0 run or a cell) under its lock, in this
process or as the callable a submitit job runs (``UnitJob``).

Each unit appends the output of its ``run.py`` commands to ``<out>/console/<run>.txt`` and
leaves a record of its last attempt beside its manifest (``sweep-run.json``: running,
finished, failed with the exit code and the last line of its output, interrupted, or
requeued), which ``status`` reads. ``run.py`` itself skips finished steps and continues an
interrupted one from its last finished epoch, so running a unit again is always safe.

Before its first command a cell records in its manifest which shared step-0 run it starts
from (``"step0": {"run", "checkpoint", "sha256"}``) and gets a copy of that run's step-0
result files, so that tables see every step of the cell.
"""
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from tools import experiment
from utils.checkpoint import atomic_write_json, read_json
from utils.manifest import Manifest
from utils.run_lock import RunLock, describe

from .plan import finished_steps, is_finished

ATTEMPT_NAME = "sweep-run.json"
STOP_GRACE_SECONDS = 60


@dataclass
class Outcome:
    """How one attempt at a unit ended: ``finished``, ``failed`` or ``interrupted``."""
    name: str
    status: str
    console: str
    exit_code: int = None
    message: str = ""
    seconds: float = 0.0


@dataclass
class Resources:
    """What one run gets: CPU threads per process, extra environment (CUDA_VISIBLE_DEVICES),
    processes (``gpus`` > 1: torchrun with one process per GPU) and CPU cores to pin to."""
    threads: int = 1
    env: dict = field(default_factory=dict)
    gpus: int = 0
    cores: tuple = ()

    def launcher(self):
        if self.gpus > 1:
            return ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.gpus}"]
        return []


# --- records ----------------------------------------------------------------------------------

def attempt_path(logdir):
    return os.path.join(logdir, ATTEMPT_NAME)


def read_attempt(logdir):
    """The record of a unit's last attempt ({} when it never ran)."""
    path = attempt_path(logdir)
    return read_json(path, "sweep attempt record") if os.path.isfile(path) else {}


def write_attempt(logdir, status, **fields):
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    atomic_write_json(attempt_path(logdir), {
        "status": status, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(), "pid": os.getpid(), "job": job, **fields})


def note(console, text):
    """A line of the sweep's own in a unit's console log."""
    os.makedirs(os.path.dirname(console), exist_ok=True)
    with open(console, "a", encoding="utf-8") as f:
        f.write(f"[sweep {time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")


def link_step0(unit):
    """Record the cell's shared step-0 run in its manifest and copy that run's step-0 result
    files into its results folder. Returns an error message when that run is not finished."""
    source = Manifest(unit.step0_logdir)
    if not source.finished(0) or \
            not os.path.isfile(os.path.join(unit.step0_logdir, "results", "step-0.json")):
        return f"its step-0 run {unit.after} is not finished"
    manifest = Manifest(unit.logdir)
    entry = source.entry(0)
    record = {"run": unit.after, "checkpoint": entry["checkpoint"], "sha256": entry["sha256"]}
    if manifest.data.get("step0") != record:
        manifest.data["step0"] = record
        atomic_write_json(manifest.path, manifest.data)
    experiment.copy_step0_results(os.path.join(unit.step0_logdir, "results"), unit.results_dir)
    return None


# --- running ----------------------------------------------------------------------------------

def stop_child_now(proc):
    """Stop a run.py child from inside a signal handler (submitit's time-limit signal): SIGINT
    to its process group, then SIGKILL after ``STOP_GRACE_SECONDS``, waiting with
    ``os.waitpid`` because the interrupted code may hold the Popen object's own lock."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + STOP_GRACE_SECONDS
        while sig == signal.SIGKILL or time.time() < deadline:
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.2)


class UnitRunner:
    """Runs units one at a time with ``resources``; ``stop`` (a threading.Event, set on
    Ctrl-C) stops the running command cleanly."""

    def __init__(self, resources, stop=None):
        self.resources = resources
        self.stop = stop
        self.unit = self.proc = self.lock = None

    def run(self, unit):
        """Every unfinished command of ``unit`` under its lock; the ``Outcome``."""
        start = time.time()
        self.unit, self.lock = unit, RunLock(unit.logdir)
        self.lock.acquire(on_wait=lambda owner: note(
            unit.console, f"waiting: {unit.name} is being trained by {describe(owner)}"))
        try:
            if is_finished(unit):
                return Outcome(unit.name, "finished", unit.console, 0, "already finished")
            return self._run_commands(unit, start)
        finally:
            self.lock.release()
            self.unit = self.proc = None

    def _run_commands(self, unit, start):
        note(unit.console, f"{unit.name} on {socket.gethostname()} (pid {os.getpid()})")
        write_attempt(unit.logdir, "running", console=unit.console)
        if unit.after:
            problem = link_step0(unit)
            if problem:
                return self._ended(unit, "failed", None, problem, start)
        for command in unit.commands:
            if set(command.steps) <= set(finished_steps(unit)):
                continue
            code = experiment.run_process(
                command.args, unit.console, threads=self.resources.threads,
                env=self.resources.env, launcher=self.resources.launcher(), stop=self.stop,
                on_start=self._started, append=True)
            self.proc = None
            if code != 0 and not set(command.steps) <= set(finished_steps(unit)):
                stopped = code == 130 or (self.stop is not None and self.stop.is_set())
                return self._ended(unit, "interrupted" if stopped else "failed", code,
                                   experiment.last_line(unit.console), start)
        return self._ended(unit, "finished", 0, "", start)

    def _started(self, proc):
        self.proc = proc
        self.lock.set_child(proc.pid)
        if self.resources.cores and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(proc.pid, self.resources.cores)
            except OSError:
                pass      # the child exited already, or the cores are not ours: unpinned

    def _ended(self, unit, status, code, message, start):
        write_attempt(unit.logdir, status, exit_code=code, message=message,
                      console=unit.console)
        return Outcome(unit.name, status, unit.console, code, message, time.time() - start)

    def stop_now(self, why):
        """Stop the running command at once and give the lock back (from a signal handler:
        submitit's time limit); the run resumes from its last finished epoch."""
        if self.proc is not None:
            stop_child_now(self.proc)
        if self.unit is not None:
            note(self.unit.console, f"stopped: {why}")
            write_attempt(self.unit.logdir, "requeued", message=why, console=self.unit.console)
        if self.lock is not None:
            self.lock.release()


class UnitJob:
    """The callable of a submitit job: its units one after the other, each under its lock (a
    cell's job lists its step-0 run first, which is then finished and skipped unless the job
    was resubmitted alone). It stops at the first unit that does not finish.

    On the time-limit (or preemption) signal submitit calls ``checkpoint``: the ``run.py``
    child stops at once, the lock is given back, and the same job is requeued; ``run.py``
    then continues from the last finished epoch."""

    def __init__(self):
        self.runner = None

    def __call__(self, units, resources):
        self.runner = UnitRunner(resources)
        outcomes = []
        for unit in units:
            outcomes.append(self.runner.run(unit))
            if outcomes[-1].status != "finished":
                break
        return outcomes

    def checkpoint(self, units, resources):
        from submitit.helpers import DelayedSubmission
        if self.runner is not None:
            self.runner.stop_now("the job reached its time limit (or was preempted); requeued")
        return DelayedSubmission(UnitJob(), units, resources)

    def __getstate__(self):
        return {"runner": None}     # processes and locks stay with the process that has them
