"""The method comparison on synthetic VOC data, shared by ``bench/bench_methods.py`` and
``tools/demo.py``: 15-5 disjoint, step 0 trained once per kind of step 0, then step 1 of
each method from that step-0 checkpoint, every run through ``run.py`` as a user would.

Which step 0 a method starts from (``step0_of``, asked of the registry's step-0 signatures):
FT, LwF, ILT and MiB train step 0 identically (plain cross-entropy; nothing else is active
without an old model), so they share one. LwF-MC trains step 0 with BCE, as the original
does, so it has its own. EWC, PI and RW train the same weights as the cross-entropy step 0
(their penalty is off without an old model; ``tests/test_methods_e2e.py`` checks the weights
are identical) but must also collect the importances that step 1 reads from the checkpoint's
trainer state, so each has its own step-0 run.

Everything lives under one output folder: ``data/`` (the synthetic tree), ``index/<run>/``
(the index lists), ``checkpoints/``, ``logs/15-5-voc/<run>/`` (TensorBoard, log.txt,
results/) and ``console/<run>.txt`` (each run's output). Rerunning reuses the data when it
was made with the same settings, and ``run.py`` itself skips the steps its manifests list as
finished.

Runs use one CPU thread each and independent runs go side by side (``jobs``): on a small
shared CPU, one process with two threads is many times slower than two one-thread processes
as soon as anything else runs.

The runner underneath (``run_process``: one ``run.py`` with its console log, stopped cleanly
on Ctrl-C; ``run_jobs``: jobs side by side with dependencies) is shared with the sweeps of
``tools/sweep.py``.
"""
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.checkpoint import CheckpointError, read_json, step_checkpoint_path  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.events import read_events  # noqa: E402

TASK = "15-5"
DATASET = "voc"
TASK_NAME = f"{TASK}-{DATASET}"
METHODS = ("FT", "LWF", "LWF-MC", "ILT", "EWC", "PI", "RW", "MiB")


@functools.lru_cache(maxsize=None)
def step0_of(method):
    """The method of ``METHODS`` whose step-0 run ``method`` starts from: the first whose
    step 0 trains the same way (``methods.step0_signature``)."""
    import methods
    from argparser import build_options

    def signature(name):
        return methods.step0_signature(build_options(["--method", name, "--task", TASK,
                                                      "--dataset", DATASET]))
    mine = signature(method)
    return next(m for m in METHODS if signature(m) == mine)

POLL_SECONDS = 0.5      # how often a running job's records are read
INTERRUPT_GRACE_SECONDS = 60   # how long a stopped run.py may take to exit before SIGKILL


class ExperimentError(UserError, RuntimeError):
    """A run of the experiment failed; the message names its console log."""


@dataclass(frozen=True)
class Config:
    """Data, network and schedule of the comparison (every method gets the same)."""
    out: str
    n_train: int = 480
    n_val: int = 100
    size: int = 64
    data_seed: int = 0
    crop_size: int = 64
    batch_size: int = 8
    epochs0: int = 10
    epochs1: int = 4
    lr0: float = 0.02
    lr1: float = 0.01
    backbone: str = "resnet18"
    lr1_of: dict = field(default_factory=dict)     # a step-1 learning rate per method

    @property
    def data_root(self):
        return os.path.join(self.out, "data")

    @property
    def logdir(self):
        return os.path.join(self.out, "logs")

    @property
    def checkpoint_dir(self):
        return os.path.join(self.out, "checkpoints")

    def data_settings(self):
        """What the generator's marker holds for this data (its version included: a tree of
        an older generator, e.g. without saliency maps, does not match)."""
        from dataset.synthetic import record
        return record(DATASET, self.n_train, self.n_val, self.size, self.data_seed)

    def step1_lr(self, method):
        return self.lr1_of.get(method, self.lr1)


@dataclass
class Job:
    """One ``python run.py`` command of the experiment."""
    name: str            # the run's --name
    args: list
    epochs: int
    console: str
    logdir: str          # the run's log dir, where it writes events.jsonl
    step: int = 0
    after: str = None    # name of the job whose checkpoint this one starts from
    seconds: float = None


# --- names and paths --------------------------------------------------------------------------

def seed_suffix(seed, seeds):
    """Runs of several seeds are told apart by ``-s<seed>`` (the table tool strips it)."""
    return "" if len(seeds) == 1 else f"-s{seed}"


def step0_name(group, suffix=""):
    return f"step0-{group}{suffix}"


def checkpoint_path(cfg, name, step):
    return step_checkpoint_path(cfg.checkpoint_dir, TASK_NAME, name, step)


def run_logdir(cfg, name):
    return os.path.join(cfg.logdir, TASK_NAME, name)


def results_dir(cfg, name):
    return os.path.join(run_logdir(cfg, name), "results")


def tensorboard_dir(cfg):
    return os.path.join(cfg.logdir, TASK_NAME)


# --- data -------------------------------------------------------------------------------------

def ensure_data(cfg):
    """Generate the synthetic VOC tree unless one with the same settings is there. What was
    made from other data (index lists, checkpoints, logs and results) is dropped with it, so
    no run is taken as finished on the old data. Returns True when it was generated now."""
    from dataset.synthetic import FOLDER, MARKER, generate
    marker = os.path.join(cfg.data_root, FOLDER[DATASET], MARKER)
    if os.path.isfile(marker):
        try:
            if read_json(marker, "synthetic data record") == cfg.data_settings():
                return False
        except CheckpointError:
            pass  # unreadable record: generate again
    generate(DATASET, cfg.data_root, cfg.n_train, cfg.n_val, size=cfg.size,
             seed=cfg.data_seed)
    for stale in (os.path.join(cfg.out, "index"), cfg.checkpoint_dir, cfg.logdir):
        shutil.rmtree(stale, ignore_errors=True)
    return True


# --- the runs ---------------------------------------------------------------------------------

def common_args(cfg, name, seed):
    # each run has its own index folder: runs side by side never write the same list
    return ["--data_root", cfg.data_root, "--dataset", DATASET, "--task", TASK,
            "--name", name, "--random_seed", str(seed),
            "--index_dir", os.path.join(cfg.out, "index", name),
            "--checkpoint_dir", cfg.checkpoint_dir, "--logdir", cfg.logdir,
            "--backbone", cfg.backbone, "--no_pretrained", "--crop_size", str(cfg.crop_size),
            "--batch_size", str(cfg.batch_size), "--num_workers", "0"]


def step0_job(cfg, group, seed=42, suffix=""):
    """Step 0 with ``--method group``; validation only after the last epoch."""
    name = step0_name(group, suffix)
    args = common_args(cfg, name, seed) + [
        "--step", "0", "--method", group, "--epochs", str(cfg.epochs0),
        "--val_interval", str(cfg.epochs0), "--lr", str(cfg.lr0)]
    return Job(name, args, cfg.epochs0, os.path.join(cfg.out, "console", name + ".txt"),
               run_logdir(cfg, name), step=0)


def step1_job(cfg, method, seed=42, suffix=""):
    """Step 1 of ``method`` from the step-0 checkpoint of its group."""
    name = method + suffix
    args = common_args(cfg, name, seed) + [
        "--step", "1", "--method", method,
        "--step_ckpt", checkpoint_path(cfg, step0_name(step0_of(method), suffix), 0),
        "--epochs", str(cfg.epochs1), "--val_interval", str(cfg.epochs1),
        "--lr", str(cfg.step1_lr(method))]
    return Job(name, args, cfg.epochs1, os.path.join(cfg.out, "console", name + ".txt"),
               run_logdir(cfg, name), step=1, after=step0_name(step0_of(method), suffix))


def plan(cfg, methods, seeds):
    """(step-0 jobs, step-1 jobs) for ``methods`` and every seed."""
    first, second = [], []
    for seed in seeds:
        suffix = seed_suffix(seed, seeds)
        for group in sorted({step0_of(m) for m in methods}, key=METHODS.index):
            first.append(step0_job(cfg, group, seed, suffix))
        second += [step1_job(cfg, m, seed, suffix) for m in methods]
    return first, second


def command_text(args, launcher=()):
    """The command as it runs, to paste into any shell in any folder: a ``cd`` to the
    repository root (the run's relative paths are read from there) and this interpreter
    (``launcher``: the arguments between the interpreter and ``run.py``, e.g.
    ``-m torch.distributed.run ...``)."""
    return " ".join(["cd", shlex.quote(ROOT), "&&", shlex.quote(sys.executable),
                     *map(shlex.quote, launcher), "run.py", *map(shlex.quote, args)])


def interrupt(proc):
    """Stop a ``run.py`` started by ``run_process`` the way Ctrl-C would: SIGINT to its
    process group (a torchrun launcher passes it to its workers), so it stops after writing
    nothing half-done and resumes from its last finished epoch; SIGKILL only if it has not
    exited after ``INTERRUPT_GRACE_SECONDS``."""
    for sig, grace in ((signal.SIGINT, INTERRUPT_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(args, console, *, threads=1, env=None, launcher=(), stop=None, on_poll=None,
                on_start=None, append=False):
    """Run ``python [launcher] run.py args --no_progress`` from the repository root with its
    output in ``console`` (appended with ``append``), and return its exit code.

    The child gets its own process group, so a Ctrl-C in the terminal reaches the caller
    alone, which then stops the child once and cleanly (``interrupt``): when ``stop`` (a
    ``threading.Event``) is set, or when this call itself is interrupted. ``threads`` sets
    the child's OpenMP/MKL threads; ``env`` adds variables (e.g. CUDA_VISIBLE_DEVICES);
    ``on_start(proc)`` hears the process once started, ``on_poll()`` is called every
    ``POLL_SECONDS`` while it runs."""
    os.makedirs(os.path.dirname(console) or ".", exist_ok=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
                    MKL_NUM_THREADS=str(threads))
    full_env.update(env or {})
    with open(console, "a" if append else "w", encoding="utf-8") as log:
        log.write(command_text(args, launcher) + "\n\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, "run.py"), *args,
                                 "--no_progress"], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if on_start is not None:
                on_start(proc)
            while proc.poll() is None:
                if stop is not None and stop.is_set():
                    interrupt(proc)
                    break
                time.sleep(POLL_SECONDS)
                if on_poll is not None:
                    on_poll()
        except BaseException:       # Ctrl-C or an exit while waiting: stop the child first
            interrupt(proc)
            raise
        return proc.wait()


def last_line(console):
    """The last non-empty line of a console log (a run's ``error:`` line when it failed)."""
    try:
        with open(console, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_job(job, threads=1, on_progress=None, stop=None):
    """Run ``python run.py`` for ``job`` (its output goes to ``job.console``);
    ``on_progress(epochs)`` hears how many epochs of it are done, read from the run's
    ``events.jsonl``."""
    start = time.time()
    before = len(read_events(job.logdir))      # records of earlier runs of this log dir

    def poll():
        if on_progress is not None:
            on_progress(epochs_done(read_events(job.logdir)[before:], job.step))
    code = run_process(job.args, job.console, threads=threads, stop=stop, on_poll=poll)
    if code != 0:
        raise ExperimentError(f"run {job.name} failed (exit {code}): {last_line(job.console)}; "
                              f"its output is in {job.console}")
    if on_progress is not None:
        on_progress(float(job.epochs))
    job.seconds = time.time() - start
    return job.seconds


def epochs_done(records, step):
    """Epochs of ``step`` finished, from a run's records (a resumed run starts further)."""
    done = 0
    for r in records:
        if r.get("step") != step:
            continue
        if r["event"] == "start":
            done = r.get("start_epoch", 0)
        elif r["event"] == "epoch":
            done = max(done, r["epoch"] + 1)
    return float(done)


def default_runner(job, slot, on_progress, stop):
    """``run_jobs``' runner for ``Job``: one ``run.py`` with one CPU thread."""
    run_job(job, threads=1, on_progress=on_progress, stop=stop)


def run_jobs(jobs, parallel=2, progress=None, report=None, runner=None, keep_going=False,
             on_failure=None):
    """Run ``jobs`` with ``parallel`` of them at a time, in the given order except that a job
    waits for the job it continues from (``job.after``) when that one is in the list too.

    ``runner(job, slot, on_progress, stop)`` runs one job (default: ``run_job`` with one CPU
    thread); ``slot`` (0..parallel-1) tells which of the parallel places it has, so that it
    can pin itself to CPU cores or GPUs; ``stop`` is set on Ctrl-C. ``progress``: a tqdm bar
    counted in epochs over all jobs (fed by ``on_progress``); ``report(job)`` is called as
    each one finishes, ``on_failure(job, error)`` as each one fails.

    By default the first failure stops the rest (running jobs finish) and is raised. With
    ``keep_going`` every job runs whatever fails, a job whose ``after`` failed is a failure
    itself without running, and the list of ``(job, error)`` failures is returned. On Ctrl-C
    the running jobs are stopped cleanly (their runs stay resumable) before
    KeyboardInterrupt propagates."""
    runner = runner or default_runner
    names = {j.name for j in jobs}
    pending, finished, failed = list(jobs), set(), {}
    cond = threading.Condition()
    stop = threading.Event()
    done = {j.name: 0.0 for j in jobs}

    def fail(job, error):       # with cond held
        failed[job.name] = error
        if on_failure is not None:
            on_failure(job, error)
        cond.notify_all()

    def next_job():
        with cond:
            while pending and not stop.is_set() and (keep_going or not failed):
                for job in pending:
                    if job.after in failed:
                        pending.remove(job)
                        fail(job, ExperimentError(f"run {job.name} was not started: the run it "
                                                  f"continues from, {job.after}, failed"))
                        break
                    if job.after not in names or job.after in finished:
                        pending.remove(job)
                        return job
                else:
                    cond.wait()
            return None

    def worker(slot):
        try:
            work(slot)
        finally:
            with cond:
                running[0] -= 1
                cond.notify_all()

    def work(slot):
        while True:
            job = next_job()
            if job is None:
                return

            def on_progress(epochs, name=job.name):
                if progress is not None:
                    with cond:
                        if epochs > done[name]:
                            progress.update(epochs - done[name])
                            done[name] = epochs
            try:
                runner(job, slot, on_progress, stop)
            except Exception as e:     # reported (or re-raised below) with the others
                with cond:
                    fail(job, e)
                continue
            with cond:
                finished.add(job.name)
                if report is not None:
                    report(job)
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True)
               for slot in range(max(1, parallel))]
    running = [len(threads)]
    for t in threads:
        t.start()

    def wait_for_workers():
        # not Thread.join: a Ctrl-C inside join() can mark a running thread as ended
        # (CPython 3.11), and the runs it still stops would be left behind
        with cond:
            while running[0]:
                cond.wait(POLL_SECONDS)
    try:
        wait_for_workers()
    except KeyboardInterrupt:
        stop.set()
        with cond:
            cond.notify_all()       # workers waiting for a job to depend on: give up
        wait_for_workers()
        raise
    failures = [(j, failed[j.name]) for j in jobs if j.name in failed]
    if failures and not keep_going:
        raise failures[0][1]
    return failures


def copy_step0_results(src_results, dst_results):
    """Copy ``step-0.json`` / ``.csv`` of a shared step-0 run's results folder into the
    results folder of a run that started from it, so that tables (avg) and plots (mIoU after
    each step) have every step of that run."""
    from utils.checkpoint import atomic_write_bytes
    for ext in ("json", "csv"):
        with open(os.path.join(src_results, f"step-0.{ext}"), "rb") as f:
            atomic_write_bytes(os.path.join(dst_results, f"step-0.{ext}"), f.read())


def share_step0_results(cfg, method, suffix=""):
    """Copy the step-0 result files of the run ``method`` started from into its own
    results folder (``copy_step0_results``)."""
    copy_step0_results(results_dir(cfg, step0_name(step0_of(method), suffix)),
                       results_dir(cfg, method + suffix))


# --- results ----------------------------------------------------------------------------------

def load_step_results(cfg, name, step):
    from utils.results import load_results
    return load_results(os.path.join(results_dir(cfg, name), f"step-{step}.json"))


def markdown_table(cfg, names, step=1):
    """The old / new / all table of the runs (the layout of ``tools/results_table.py``)."""
    from tools.results_table import build_table, caption, load_runs, to_markdown
    table = build_table(load_runs([results_dir(cfg, n) for n in names]), "name", step, True)
    return to_markdown(table, caption(table, True, "name"))


def summary_rows(cfg, names):
    """Per run: step-0 mIoU, then after step 1 old (with and without background), new, all
    (fractions)."""
    rows = []
    for name in names:
        d0, d1 = load_step_results(cfg, name, 0), load_step_results(cfg, name, 1)
        rows.append({"name": name, "step0_all": d0["miou_all"], "old": d1["miou_old"],
                     "old_no_bg": d1["miou_old_no_bg"], "new": d1["miou_new"],
                     "all": d1["miou_all"]})
    return rows


def format_summary(rows):
    """A fixed-width text table of ``summary_rows`` (percentages)."""
    head = f"{'method':<10} {'step 0 all':>10} {'old':>6} {'old-bg':>7} {'new':>6} {'all':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<10} {100 * r['step0_all']:>10.1f} {100 * r['old']:>6.1f} "
                     f"{100 * r['old_no_bg']:>7.1f} {100 * r['new']:>6.1f} "
                     f"{100 * r['all']:>6.1f}")
    return "\n".join(lines)


def write_plots(cfg, names, out_dir):
    """PNG of old / new / all mIoU after each step, one line per run; the paths written."""
    from tools.results_table import load_runs, plot_steps
    return plot_steps(load_runs([results_dir(cfg, n) for n in names]), out_dir, "name", True)
