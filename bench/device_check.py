"""One prepared check of the whole CUDA path, and every GPU figure, in one short command.

    bash bench/device_check.sh OUT                       # on a machine with a CUDA GPU
    python bench/device_check.py OUT --cpu-dry-run       # the same parts at toy sizes, CPU
    python bench/device_check.py OUT --only norm,bench-data   # some parts (and what they need)
    python bench/device_check.py --list [--cpu-dry-run]  # the plan: parts, limits, needs

A GPU is lent now and then for a few minutes, so everything it should prove runs from this
one script, which has been run end to end on the CPU first (``--cpu-dry-run``, in the test
suite). It drives the project as a user does, through ``run.py`` under ``torchrun`` and
``bench/run_all.py`` in subprocesses, and reads their records (``events.jsonl``, the result
files, the benchmark JSON), never their logs.

Parts, in order of priority (``--list`` shows the limits and the worst-case timetable):
  gpu-path     a few seconds of forced, deterministic checks (device_check_gpu_path.py):
               an fp16 overflow on the first step with the optimiser picked for fp16, a penalty
               update on a skipped step, a contiguous checkpoint resumed into channels-last
               and stepped with the device's SGD kernel, CUDA RNG states of more GPUs than
               are visible
  env          GPU, driver, torch / CUDA / cuDNN / NCCL versions, cores; one all_reduce on
               the backend of the mode (nccl on CUDA, gloo on the CPU)
  bundle       the wheels of ``device_bundle/`` (``make device-bundle``: tensorboardX and the
               inplace-abn build's setuptools_scm, which that machine lacks) installed with
               ``pip --no-index`` into a temporary folder on the subprocesses' PYTHONPATH
  iabn-build   the inplace-abn source archive of the bundle built with the machine's nvcc
               (TORCH_CUDA_ARCH_LIST=9.0) into a temporary folder, in the background while
               the runs below go on; if it fails only the comparison with it is skipped
  data         a small synthetic VOC tree (an epoch is a few iterations)
  e2e-<amp>    VOC 15-5 MiB step 0 and step 1, ResNet-101 OS16 iabn_sync, crop 512, one
               epoch, through ``torchrun --nproc_per_node=1``, then ``--test`` of step 1 must
               give the same figures exactly (fp16 and bf16; fp32 and bf16 in the dry run)
  resume       a step of 2 epochs killed (SIGKILL, every process) after its epoch-0
               checkpoint, then rerun: it must continue at epoch 1 and finish; on the CPU its
               result must equal an uninterrupted run's bit for bit (CUDA kernels are not
               bit-deterministic, so there only the continuation and the finish are checked)
  norm         the compiled inplace_abn layers against the pure-PyTorch ones: forward,
               input / weight / bias gradients, running statistics, per dtype (fp32, bf16,
               fp16 on CUDA), on a real process group of one (nccl / gloo, file store);
               iabn_sync also forced through its synchronising code (``train-sync``); and
               per implementation the MiB kept for backward and (CUDA) the peak
  e2e-iabn     the e2e run (first precision) with ``--norm_impl inplace_abn`` and the build
  resume-iabn  on the path, as ``auto`` trains on CUDA where the package is installed, and
               the resume part with it (both at the same time)
  bench-*      the figures, by bench/run_all.py: training images/s, peak memory and MFU at
               the largest batch that fits and at the paper's 12 per GPU, the step-1 cost of
               every method against FT, evaluation, the input pipeline with 8 and 16
               workers, --compile on and off, training with the compiled norm layers
  bench-swin   bench/bench_backbones.py: Swin-B vs ResNet-101 at the Swin papers' crop 512
               and 6 images per GPU, fp16: s/image, peak MiB/image, ratios; fails without a
               Swin-B figure (the papers' batch per GPU does not fit)

The e2e and resume parts run at the same time (they only prove correctness); on the GPU the
figures are taken one after the other, alone. Every part has a time limit (its subprocesses
are killed when it passes) and the whole run a budget: a part starts only when what is left
of the budget covers its whole limit, and parts that do not fit are skipped and named in a
rerun command. As soon as a part ends the report is rewritten under OUT:
``device_check.json``, ``device_check.txt`` (one line per check and per figure) and, at the
end, ``device_check-logs.tar.gz`` with every subprocess's
output. The exit code is 1 when any correctness check failed or could not run.
"""
import argparse
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

# the planner, the report and the probes live in modules of their own; their names are
# re-exported here (the tests and the docs use device_check.X)
from device_check_plan import (  # noqa: F401
    BUILD,
    BUNDLE_DIR,
    BUNDLE_LIMIT_MIB,
    BUNDLE_MODULES,
    CHECK,
    DATASET,
    DRY_RUN,
    FIGURES,
    GPU,
    JSON_NAME,
    LOGS_NAME,
    METHODS,
    NORM_TOLERANCE,
    ROOT,
    SDIST_PATTERN,
    TAIL_CHARS,
    TARGETS,
    TASK,
    TASK_NAME,
    TEXT_NAME,
    BenchSpec,
    Config,
    Part,
    batch_ladder,
    batches,
    bench_specs,
    print_plan,
    select,
    time_plan,
)
from device_check_probes import PROBES
from device_check_report import (  # noqa: F401
    STATUS_TAG,
    _atomic_write,
    all_rows,
    comparisons,
    document,
    mib_text,
    percent,
    rerun_names,
    row_text,
    summary_lines,
    targets,
    verdict,
    write_logs,
    write_report,
)


def plan(cfg):
    """The parts in order of priority: correctness first, then the figures."""
    parts = [
        # a few seconds of work; the imports take longer on a busy 2-core CI machine
        Part("gpu-path", CHECK, 90, part_gpu_path, group="setup"),
        Part("env", CHECK, 90, part_env, group="setup"),
        Part("bundle", CHECK, 90, part_bundle, group="setup"),
        Part("data", CHECK, 90, part_data, group="setup"),
        Part("iabn-build", BUILD, 300 if cfg.iabn == "build" else 60, part_iabn_build,
             needs=("bundle",), background=True),
    ]
    parts += [Part(f"e2e-{p}", CHECK, 300, functools.partial(part_e2e, precision=p),
                   needs=("bundle", "data"), group="runs") for p in cfg.precisions]
    parts.append(Part("resume", CHECK, 300, part_resume, needs=("bundle", "data"),
                      group="runs"))
    parts.append(Part("norm", CHECK, 90, part_norm, needs=("bundle", "iabn-build")))
    # the compiled package trained end to end and resumed, at the same time
    package = ("bundle", "data", "iabn-build")
    parts.append(Part("e2e-iabn", CHECK, 240, functools.partial(
        part_e2e, precision=cfg.precisions[0], package=True), needs=package,
        group="package-runs"))
    parts.append(Part("resume-iabn", CHECK, 300, functools.partial(part_resume, package=True),
                      needs=package, group="package-runs"))
    figures_group = None if cfg.figures_alone else "figures"
    parts += [Part(s.name, FIGURES, s.limit_s, functools.partial(part_bench, spec=s),
                   needs=("bundle", *s.needs), group=figures_group)
              for s in bench_specs(cfg)]
    # alone also in the dry run: two fresh processes of a Swin beside the figures group
    # would slow every part of it on 2 cores
    parts.append(Part("bench-swin", FIGURES, cfg.swin_limit_s, part_bench_swin,
                      needs=("bundle",)))
    return parts


# --- outcomes of parts ------------------------------------------------------------------------

class PartFailed(Exception):
    """The part cannot go on; the message says why (one failed check)."""


class PartSkipped(Exception):
    """The part does not apply here; the message says why."""


class PartTimeout(PartFailed):
    """A subprocess of the part ran past the part's time limit and was killed."""


class Outcome:
    """What a part found: checks (pass/fail with a detail) and figures (a line each)."""

    def __init__(self):
        self.checks, self.figures, self.data = [], [], {}

    def check(self, name, passed, detail, **extra):
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail, **extra})
        return passed

    def figure(self, name, text, **values):
        self.figures.append({"name": name, "text": text, **values})


class Deadline:
    def __init__(self, seconds):
        self.limit_s = seconds
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


# --- subprocesses -----------------------------------------------------------------------------

def _children_table():
    """parent pid -> child pids, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table.setdefault(ppid, []).append(int(entry))
    return table


def process_tree(pid):
    table, out, i = _children_table(), [pid], 0
    while i < len(out):
        out += table.get(out[i], [])
        i += 1
    return out


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(proc):
    """SIGKILL a process and all its descendants. torchrun starts its workers in sessions
    of their own, so killing a process group would leave them running: the tree is frozen
    (SIGSTOP) until no new process appears, then killed."""
    if proc.poll() is not None:  # already reaped: its pid may belong to another process
        return
    frozen = []
    while True:
        new = [pid for pid in process_tree(proc.pid) if pid not in frozen]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        frozen += new
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    proc.wait()


def tail(path, chars=TAIL_CHARS):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def last_line(text):
    """The line of a command's output that says what went wrong: run.py's one-line
    ``error:``, else the last exception line (torchrun's own ChildFailedError says
    nothing), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    exceptions = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)
                  and "ChildFailedError" not in line]
    return (errors or exceptions or lines or ["(no output)"])[-1][:300]


# --- the running context ----------------------------------------------------------------------

class Context:
    """Paths, the subprocess environment, live processes and the parts' results."""

    def __init__(self, cfg, out, work, bundle, argv):
        self.cfg, self.out, self.work, self.bundle = cfg, out, work, bundle
        self.argv = argv
        self.site = os.path.join(work, "site")          # the bundle's wheels
        self.iabn_site = os.path.join(work, "iabn-site")  # the built inplace-abn
        self.iabn_path = None                            # on PYTHONPATH once it imports
        self.logs = os.path.join(work, "logs")
        self.data_root = os.path.join(work, "data")
        os.makedirs(self.logs, exist_ok=True)
        self.results = {}
        self.environment = {}
        self.started = time.monotonic()
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._live = set()
        self._log_names = set()
        self._lock = threading.Lock()
        self.report_lock = threading.Lock()
        self.stopping = False

    # time

    def elapsed(self):
        return time.monotonic() - self.started

    def budget_left(self):
        return self.cfg.budget_s - self.elapsed()

    # subprocesses

    def env(self, *paths, **extra):
        """The subprocesses' environment: the bundle (and ``paths``) before the project on
        PYTHONPATH, unbuffered output, the mode's thread count."""
        env = dict(os.environ)
        entries = [*paths] + ([self.site] if os.path.isdir(self.site) else []) + [ROOT]
        if env.get("PYTHONPATH"):
            entries.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(entries), PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=str(self.cfg.threads))
        env.update(extra)
        return env

    def log_path(self, name):
        """A log file of its own for every command (a name used twice gets a number)."""
        with self._lock:
            unique, i = name, 1
            while unique in self._log_names:
                i += 1
                unique = f"{name}-{i}"
            self._log_names.add(unique)
        return os.path.join(self.logs, f"{unique}.log")

    def start(self, cmd, log_name, cwd=None, env=None):
        if self.stopping:
            raise PartFailed("interrupted")
        log = self.log_path(log_name)
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=cwd or self.work, env=env or self.env(),
                                    stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        proc.log = log
        with self._lock:
            self._live.add(proc)
        return proc

    def wait(self, proc, deadline, what):
        try:
            proc.wait(timeout=max(deadline.left(), 0.01))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise PartTimeout(f"{what} did not finish within the part's "
                              f"{deadline.limit_s:.0f} s and was killed") from None
        finally:
            self.forget(proc)
        return proc.returncode

    def forget(self, proc):
        with self._lock:
            self._live.discard(proc)

    def run(self, cmd, log_name, deadline, what, cwd=None, env=None):
        """Run ``cmd`` to the end within ``deadline``; a non-zero exit is a PartFailed
        naming ``what`` and the last line of its output."""
        proc = self.start(cmd, log_name, cwd, env)
        code = self.wait(proc, deadline, what)
        if code != 0:
            raise PartFailed(f"{what} exited with {code}: {last_line(tail(proc.log))}",
                             tail(proc.log))
        return proc

    def kill_all(self):
        self.stopping = True
        with self._lock:
            live = list(self._live)
        for proc in live:
            kill_tree(proc)

    def probe(self, name, deadline, *args, paths=()):
        """``device_check.py --probe name``: a few lines of torch in a fresh process (a
        crash or a hang there cannot take the check down); returns its JSON."""
        out = os.path.join(self.work, f"probe-{name}-{time.monotonic_ns()}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", name, "--probe-out", out,
               "--device", self.cfg.device, "--backend", self.cfg.backend, *args]
        self.run(cmd, f"probe-{name}", deadline, f"the {name} probe", env=self.env(*paths))
        with open(out) as f:
            return json.load(f)

    def torchrun(self):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=1", os.path.join(ROOT, "run.py")]

    def ok(self, name):
        result = self.results.get(name)
        return result is not None and result["status"] in ("pass", "ok")


# --- records the runs write -------------------------------------------------------------------

def read_events(path):
    """The records of ``events.jsonl``; an unfinished last line is left out."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return records


def run_dir(lane, name):
    return os.path.join(lane, "logs", TASK_NAME, name)


def read_result(lane, name, step):
    path = os.path.join(run_dir(lane, name), "results", f"step-{step}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PartFailed(f"no result file {path} ({e})") from None


def compare_results(a, b):
    """Differences between two result files in the figures that must reproduce."""
    diffs = []
    for key in ("mean_iou", "n_images"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} {a.get(key)} != {b.get(key)}")
    ia, ib = a.get("class_iou", {}), b.get("class_iou", {})
    for cls in sorted(set(ia) | set(ib), key=lambda c: int(c)):
        if ia.get(cls) != ib.get(cls):
            diffs.append(f"class {cls} IoU {ia.get(cls)} != {ib.get(cls)}")
    return diffs


# --- parts: environment, bundle, build, data --------------------------------------------------

def part_env(ctx, deadline, out):
    info = ctx.probe("env", deadline)
    ctx.environment = info
    out.data.update(info)
    out.figure("environment", environment_text(info))
    if ctx.cfg.device == "cuda":
        gpus = info.get("gpus") or []
        out.check("cuda", info.get("cuda_available") and gpus,
                  f"{len(gpus)} CUDA device(s): {gpus[0]['name']}" if gpus else
                  "no CUDA device visible to torch")
    c = info.get("collective", {})
    out.check("collective", c.get("ok"), f"{ctx.cfg.backend} all_reduce on "
              f"{c.get('device', ctx.cfg.device)}: {c.get('detail', '')}")


def environment_text(info):
    gpus = "; ".join(f"{g['name']} ({g['memory_gib']:.0f} GiB, sm_{g['capability']})"
                     for g in info.get("gpus") or [])
    device = f"{gpus}, driver {info.get('driver') or '-'}" if gpus else "no GPU"
    return (f"{device}; torch {info.get('torch')}, CUDA "
            f"{info.get('cuda') or '-'}, cuDNN {info.get('cudnn') or '-'}, NCCL "
            f"{info.get('nccl') or '-'}; Python {info.get('python')}; {info.get('cpus')} "
            f"cores ({info.get('cpu_model') or '-'}), {info.get('memory_gib', 0):.0f} GiB")


def find_bundle(bundle):
    """(wheels, source archive or None) of a bundle folder."""
    wheels = sorted(glob.glob(os.path.join(bundle, "*.whl")))
    sdists = sorted(glob.glob(os.path.join(bundle, SDIST_PATTERN)))
    return wheels, (sdists[-1] if sdists else None)


def install_wheels(ctx, wheels, deadline):
    ctx.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target",
             ctx.site, *wheels], "bundle-install", deadline, "pip install of the bundle")


def part_gpu_path(ctx, deadline, out):
    """The forced, deterministic checks of bench/device_check_gpu_path.py (a few seconds)."""
    found = ctx.probe("gpu-path", deadline)
    for c in found["checks"]:
        if c["passed"] is None:   # a figure, or not for this device (no CUDA in a dry run)
            out.figure(c["name"], f"{c['name']}: {c['detail']}")
        else:
            out.check(c["name"], c["passed"], f"{c['detail']} ({c['seconds']:.1f} s)")


def part_bundle(ctx, deadline, out):
    wheels, _ = find_bundle(ctx.bundle)
    if wheels:
        install_wheels(ctx, wheels, deadline)
        names = ", ".join(os.path.basename(w).split("-")[0] for w in wheels)
        out.check("install", True, f"{names} installed from {ctx.bundle} into a temporary "
                                   "folder on the subprocesses' PYTHONPATH")
    found = ctx.probe("imports", deadline, "--modules", ",".join(BUNDLE_MODULES))
    for module in BUNDLE_MODULES:
        info = found[module]
        where = "the bundle" if info.get("file", "").startswith(ctx.site) else \
            "the interpreter's own packages"
        out.check(f"import {module}", "error" not in info,
                  f"{module} {info.get('version')} from {where}" if "error" not in info else
                  f"{module} does not import ({info['error']}); run `make device-bundle` "
                  "where pip reaches PyPI and carry device_bundle/")


def cuda_home():
    """The CUDA toolkit to build with: $CUDA_HOME, /usr/local/cuda, or the folder of the
    nvcc on PATH, the first that has nvcc and the runtime headers (an nvcc on PATH can be a
    wrapper script outside the toolkit)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for home in candidates:
        if home and all(os.path.isfile(os.path.join(home, *f)) for f in
                        (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return home
    return None


def part_iabn_build(ctx, deadline, out):
    if ctx.cfg.iabn == "installed":
        info = ctx.probe("imports", deadline, "--modules", "inplace_abn")["inplace_abn"]
        if "error" in info:
            raise PartSkipped(f"this interpreter has no inplace_abn ({info['error']})")
        out.check("package", True, f"this interpreter's inplace_abn ({info['file']})")
        return
    _, sdist = find_bundle(ctx.bundle)
    if sdist is None:
        raise PartSkipped(f"no inplace-abn source archive in {ctx.bundle} (make device-bundle)")
    home = cuda_home()
    extra = {"TORCH_CUDA_ARCH_LIST": ctx.cfg.cuda_arch, "MAX_JOBS": str(ctx.cfg.build_jobs)}
    if home:
        extra["CUDA_HOME"] = home
    start = time.monotonic()
    try:
        ctx.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                 "--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check",
                 "--target", ctx.iabn_site, sdist], "iabn-build", deadline,
                "the inplace-abn build", env=ctx.env(**extra))
    except PartFailed as e:
        raise PartSkipped(f"the inplace-abn build failed ({e}); the comparison with the "
                          "compiled norm layers is skipped") from None
    info = ctx.probe("imports", deadline, "--modules", "inplace_abn",
                     paths=(ctx.iabn_site,))["inplace_abn"]
    if "error" in info:
        raise PartSkipped(f"inplace-abn was built but does not import ({info['error']})")
    ctx.iabn_path = ctx.iabn_site
    out.check("build", True, f"{os.path.basename(sdist)} built in {time.monotonic() - start:.0f}"
                             f" s with {home or 'no CUDA toolkit'} (TORCH_CUDA_ARCH_LIST="
                             f"{ctx.cfg.cuda_arch})")


def part_data(ctx, deadline, out):
    c = ctx.cfg
    ctx.run([sys.executable, "-m", "dataset.synthetic", "--dataset", DATASET, "--data_root",
             ctx.data_root, "--n_train", str(c.n_train), "--n_val", str(c.n_val), "--size",
             str(c.image_size), "--seed", "0"], "data", deadline, "dataset.synthetic")
    out.check("synthetic", True, f"{c.n_train} training and {c.n_val} validation images of "
                                 f"{c.image_size} px in the VOC layout")


# --- parts: run.py end to end -----------------------------------------------------------------

AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}


def run_args(ctx, name, precision, steps, epochs=1):
    c = ctx.cfg
    return ["--data_root", ctx.data_root, "--dataset", DATASET, "--task", TASK, "--step", steps,
            "--method", "MiB", "--name", name, "--backbone", c.backbone, "--output_stride",
            "16", "--norm_act", "iabn_sync", "--no_pretrained", "--crop_size", str(c.crop),
            "--batch_size", str(c.batch), "--epochs", str(epochs), "--lr", "0.01,0.001",
            "--num_workers", str(c.workers), "--amp", AMP[precision], "--device", c.device,
            "--random_seed", "0", "--no_progress", "--logdir", "logs", "--checkpoint_dir",
            "checkpoints", "--index_dir", "index"]


def lane_dir(ctx, name):
    path = os.path.join(ctx.work, "runs", name)
    os.makedirs(path, exist_ok=True)
    return path


def check_trained(ctx, events, results, precision):
    """The result files and records of a finished training run, or a PartFailed naming
    what is wrong (device, precision, a missing or non-finite epoch)."""
    for step, result in results.items():
        opts = result.get("opts", {})
        if not str(opts.get("device", "")).startswith(ctx.cfg.device):
            raise PartFailed(f"step {step} ran on {opts.get('device')}, not {ctx.cfg.device}")
        if opts.get("amp") != AMP[precision]:
            raise PartFailed(f"step {step} ran with --amp {opts.get('amp')}")
        epochs = [r for r in events if r.get("event") == "epoch" and r.get("step") == step]
        if not epochs or any(r["losses"].get("main") is None for r in epochs):
            raise PartFailed(f"step {step}: no epoch record, or a loss that is not finite")
    return results


def part_e2e(ctx, deadline, out, precision, package=False):
    """Steps 0 and 1 through torchrun, then ``--test`` of step 1; ``package``: with the
    compiled In-Place ABN layers (``--norm_impl inplace_abn``, the build on the path), as
    ``auto`` picks them on CUDA wherever the package is installed."""
    name = f"MiB-{precision}" + ("-iabn" if package else "")
    impl, env = package_env(ctx) if package else ([], None)
    lane = lane_dir(ctx, name)
    args = [*run_args(ctx, name, precision, "0,1"), *impl]
    ctx.run([*ctx.torchrun(), *args], f"{name}-train", deadline, "run.py --step 0,1", cwd=lane,
            env=env)
    events = read_events(os.path.join(run_dir(lane, name), "events.jsonl"))
    trained = check_trained(ctx, events, {s: read_result(lane, name, s) for s in (0, 1)},
                              precision)
    opts = trained[1]["opts"]
    out.check("train", True, f"steps 0 and 1 trained and tested through torchrun on "
                             f"{ctx.cfg.device} ({ctx.cfg.backend}), --amp {AMP[precision]}, "
                             f"channels-last {opts.get('channels_last')}, norm "
                             f"{opts.get('norm_impl')}; mIoU {percent(trained[0]['mean_iou'])}"
                             f" / {percent(trained[1]['mean_iou'])}")
    for record in (r for r in events if r.get("event") == "epoch"):
        out.figure(f"run.py step {record['step']}",
                   f"run.py {precision} step {record['step']}: {record['images']} images in "
                   f"{record['seconds']:.1f} s (first epoch, warm-up included), peak "
                   f"{mib_text(record.get('peak_memory_mib'))}",
                   images_per_s=record.get("images_per_s"),
                   peak_mib=record.get("peak_memory_mib"))
    # step 1: a fresh model from the step's checkpoint, with the classifiers of both steps
    if package and opts.get("norm_impl") != "inplace_abn":
        raise PartFailed(f"the run used norm_impl {opts.get('norm_impl')}, not inplace_abn")
    ctx.run([*ctx.torchrun(), *run_args(ctx, name, precision, "1"), *impl, "--test"],
            f"{name}-test", deadline, "run.py --step 1 --test", cwd=lane, env=env)
    diffs = compare_results(trained[1], read_result(lane, name, 1))
    out.check("test-exact", not diffs, "--test of step 1 reproduces its class_iou, mean_iou "
              "and image count exactly" if not diffs else
              "--test differs from the after-training figures: " + "; ".join(diffs[:5]))


def wait_for_checkpoint(ctx, proc, path, deadline):
    """Until the step's first epoch checkpoint exists (written by renaming a complete
    temporary file), or the run ends first."""
    while not os.path.isfile(path):
        if proc.poll() is not None:
            ctx.forget(proc)
            raise PartFailed(f"the run exited ({proc.returncode}) before its epoch-0 "
                             f"checkpoint: {last_line(tail(proc.log))}", tail(proc.log))
        if deadline.left() <= 0:
            kill_tree(proc)
            ctx.forget(proc)
            raise PartTimeout("no epoch-0 checkpoint within the part's limit")
        time.sleep(0.05)


def package_env(ctx):
    """(the extra run.py arguments, the environment) that train with the compiled In-Place
    ABN package: the build on the path (None: the interpreter's own, or no build)."""
    if ctx.iabn_path is None and ctx.cfg.iabn != "installed":
        raise PartSkipped("no inplace-abn build on the path")
    return ["--norm_impl", "inplace_abn"], ctx.env(ctx.iabn_path) if ctx.iabn_path else None


def part_resume(ctx, deadline, out, package=False):
    """A step killed after its epoch-0 checkpoint and rerun; ``package``: with the compiled
    In-Place ABN layers (their buffers and the optimiser state go through the checkpoint)."""
    c, name, epochs = ctx.cfg, "resume" + ("-iabn" if package else ""), 2
    impl, env = package_env(ctx) if package else ([], None)
    args = [*run_args(ctx, name, c.resume_precision, "0", epochs=epochs), *impl]
    reference = None
    if c.exact_resume:
        ref_lane = lane_dir(ctx, f"{name}-reference")
        ctx.run([*ctx.torchrun(), *args], f"{name}-reference", deadline,
                "the uninterrupted run", cwd=ref_lane, env=env)
        reference = read_result(ref_lane, name, 0)
    lane = lane_dir(ctx, name)
    proc = ctx.start([*ctx.torchrun(), *args], f"{name}-killed", cwd=lane, env=env)
    wait_for_checkpoint(ctx, proc, os.path.join(lane, "checkpoints",
                                                f"{TASK_NAME}_{name}_0.pth"), deadline)
    kill_tree(proc)
    ctx.forget(proc)
    out.check("killed", proc.returncode == -signal.SIGKILL,
              f"torchrun and its worker SIGKILLed after the epoch-0 checkpoint "
              f"(exit {proc.returncode})")
    ctx.run([*ctx.torchrun(), *args], f"{name}-rerun", deadline, "the rerun", cwd=lane,
            env=env)
    events = read_events(os.path.join(run_dir(lane, name), "events.jsonl"))
    starts = [i for i, r in enumerate(events) if r.get("event") == "start"]
    last = events[starts[-1]] if starts else {}
    after = [r["epoch"] for r in events[starts[-1]:] if r.get("event") == "epoch"] \
        if starts else []
    first = last.get("start_epoch")
    out.check("continues", first is not None and 1 <= first < epochs and after and
              after[0] == first and after[-1] == epochs - 1,
              f"the same command continued at epoch {first} of {epochs} (epochs trained "
              f"then: {after}) and finished")
    resumed = read_result(lane, name, 0)
    if package:
        used = resumed.get("opts", {}).get("norm_impl")
        out.check("package", used == "inplace_abn", f"trained and resumed with norm_impl "
                  f"{used}" + ("" if used == "inplace_abn" else ", not inplace_abn"))
    if reference is None:
        out.figure("resume mIoU", f"resumed run: mIoU {percent(resumed['mean_iou'])} (not "
                                  "compared: CUDA kernels are not bit-deterministic)")
        return
    diffs = compare_results(reference, resumed)
    out.check("same-result", not diffs, "the final result equals the uninterrupted run's bit "
              "for bit" if not diffs else "differs from the uninterrupted run: " +
              "; ".join(diffs[:5]))


# --- parts: compiled norm layers --------------------------------------------------------------

def part_norm(ctx, deadline, out):
    paths = (ctx.iabn_path,) if ctx.iabn_path else ()
    found = ctx.probe("norm", deadline, paths=paths)
    by_dtype = {}
    for case in found["cases"]:
        by_dtype.setdefault(case["dtype"], []).append(case)
    for dtype, cases in by_dtype.items():
        tol = NORM_TOLERANCE[dtype]
        errors = [c for c in cases if "error" in c]
        if errors:
            e = errors[0]
            out.check(dtype, False, f"{e['norm_act']} {e['layout']} {e['mode']}: {e['error']}")
            continue
        worst = max(((err, key, c) for c in cases for key, err in c["errors"].items()),
                    key=lambda t: t[0])
        err, key, case = worst
        out.check(dtype, err <= tol, f"compiled vs pure PyTorch, {len(cases)} cases "
                  f"(iabn_sync/iabn/abn, train/eval, contiguous/channels-last, iabn_sync "
                  f"through its synchronising code on a process group of "
                  f"{found['group']}) on {found['device']}: worst relative error {err:.1e} "
                  f"({key}, {case['norm_act']} {case['layout']} {case['mode']}), limit "
                  f"{tol:.0e}", worst=err)
        out.figure(f"norm memory {dtype}", norm_memory_text(dtype, cases),
                   memory={f"{c['norm_act']} {c['layout']} {c['mode']}": c["memory"]
                           for c in cases})


def norm_memory_text(dtype, cases):
    """What one training layer keeps for backward (and its peak, on CUDA), compiled vs
    PyTorch: the in-place saving, and what the casts of a dtype cost."""
    pieces = []
    for case in cases:
        if case["layout"] != "contiguous" or case["mode"] == "eval":
            continue
        m = case["memory"]
        text = (f"{case['norm_act']} {case['mode']}: saved {m['compiled']['saved_mib']:.1f} "
                f"vs {m['torch']['saved_mib']:.1f} MiB")
        if "peak_mib" in m["torch"]:
            text += (f", peak {m['compiled']['peak_mib']:.1f} vs "
                     f"{m['torch']['peak_mib']:.1f} MiB")
        pieces.append(text)
    return (f"norm layers {dtype}, one 8x64x32x32 input, compiled vs PyTorch: "
            + "; ".join(pieces))


# --- parts: figures ---------------------------------------------------------------------------

def part_bench(ctx, deadline, out, spec):
    paths = (ctx.iabn_path,) if spec.iabn and ctx.iabn_path else ()
    env = ctx.env(*paths, **dict(spec.env))
    rows = []
    for i, args in enumerate(spec.invocations):
        path = os.path.join(ctx.work, "bench", f"{spec.name}-{i}.json")
        ctx.run([sys.executable, os.path.join(ROOT, "bench", "run_all.py"), *args, "--json",
                 path], f"{spec.name}-{i}", deadline, "bench/run_all.py", env=env)
        with open(path) as f:
            doc = json.load(f)
        out.data.setdefault("runs", []).append({"argv": doc["argv"], "notes": doc["notes"],
                                                "seconds": doc["seconds"]})
        rows += [dict(r, part=spec.name) for r in doc["rows"]]
    out.data["rows"] = rows
    for row in rows:
        out.figure(f"{row['section']} {row['case']}", row_text(row), row=row)


def part_bench_swin(ctx, deadline, out):
    """bench/bench_backbones.py: one training iteration of each backbone in a fresh process;
    the part fails when the last backbone (Swin) has no row: on the GPU, the papers' batch
    per GPU does not fit."""
    args = ctx.cfg.swin_args
    backbones = args[args.index("--backbones") + 1].split(",")
    path = os.path.join(ctx.work, "bench", "bench-swin.json")
    proc = ctx.start([sys.executable, os.path.join(ROOT, "bench", "bench_backbones.py"), *args,
                      "--json", path], "bench-swin", env=ctx.env())
    code = ctx.wait(proc, deadline, "bench/bench_backbones.py")
    if not os.path.isfile(path):
        raise PartFailed(f"bench/bench_backbones.py exited with {code} and wrote no rows: "
                         f"{last_line(tail(proc.log))}", tail(proc.log))
    with open(path) as f:
        backbone_figures(out, json.load(f), backbones)


def backbone_figures(out, doc, backbones):
    """A figure per backbone row of bench_backbones.py's JSON; PartFailed when the last
    backbone has no figure."""
    rows = {r["backbone"]: dict(r, part="bench-swin") for r in doc["rows"]}
    # not "rows": those are run_all.py's, which the comparisons and targets read
    out.data.update(backbones=list(rows.values()), argv=doc["argv"], device=doc["device"])
    for backbone, row in rows.items():
        setup = f"{doc['precision']}, crop {row['size']}, batch {row['batch']}"
        if "error" in row:
            out.figure(backbone, f"{backbone} ({setup}): no figure ({row['error']})", row=row)
            continue
        ratios = "" if backbone == backbones[0] else (
            f"; {row['time_ratio']:.2f}x the time and "
            + (f"{row['memory_ratio']:.2f}x" if row["memory_ratio"] else "-")
            + f" the memory per image of {backbones[0]}")
        out.figure(backbone, f"{backbone} ({setup}): {row['s_per_image']:.4f} s/image, peak "
                             f"{row['peak_mib_per_image']:.0f} MiB/image{ratios}", row=row)
    swin = backbones[-1]
    if "error" in rows.get(swin, {"error": "no row"}):
        raise PartFailed(f"no {swin} figure ({rows.get(swin, {}).get('error', 'no row')})"
                         + (": the papers' images per GPU do not fit" if
                            rows.get(swin, {}).get("oom") else ""))


# --- running the plan -------------------------------------------------------------------------

def progress(ctx, text):
    sys.stderr.write(f"[device-check {ctx.elapsed():5.0f} s] {text}\n")
    sys.stderr.flush()


def part_record(part, status, outcome, seconds, limit, note="", blocking=False):
    """A check part that failed, timed out, broke, or was skipped while ``blocking`` (out of
    budget, or something it needs failed) counts against the run: a check that did not run
    has not passed. Skips for a build that could not be made do not."""
    failed = part.kind == CHECK and (status in ("fail", "timeout", "error") or blocking)
    return {"name": part.name, "kind": part.kind, "status": status, "failed": failed,
            "limit_s": limit, "seconds": round(seconds, 1), "note": note,
            "checks": outcome.checks, "figures": outcome.figures, "data": outcome.data}


def unmet_needs(ctx, part):
    """(names of needed parts that did not succeed, whether the skip blocks: it does not
    when all of them are builds that were skipped)."""
    unmet = [n for n in part.needs if not ctx.ok(n)]
    allowed = all(ctx.results[n]["kind"] == BUILD and ctx.results[n]["status"] == "skip"
                  for n in unmet)
    return unmet, not allowed


def failure_status(kind, timed_out):
    """A build that fails is skipped (with what follows from it); figures that fail are an
    error, not a failed check."""
    if kind == BUILD:
        return "skip"
    if timed_out:
        return "timeout"
    return "error" if kind == FIGURES else "fail"


def execute(ctx, part):
    """Run one part within its limit, cut to what is left of the budget."""
    outcome = Outcome()
    unmet, blocking = unmet_needs(ctx, part)
    if unmet:
        return part_record(part, "skip", outcome, 0, 0, f"needs {', '.join(unmet)}",
                           blocking=blocking)
    left = ctx.budget_left()
    limit = part.limit_s
    if left < limit:   # a part starts only when what is left covers its whole limit
        return part_record(part, "skip", outcome, 0, 0, f"out of budget ({left:.0f} s left, "
                           f"the part may take up to {part.limit_s} s)", blocking=True)
    progress(ctx, f"{part.name}: starts with a limit of {limit:.0f} s; {left:.0f} s of the "
                  f"{ctx.cfg.budget_s} s budget left")
    start, note = time.monotonic(), ""
    try:
        part.run(ctx, Deadline(limit), outcome)
        failed = any(not c["passed"] for c in outcome.checks)
        status = "fail" if failed else ("ok" if part.kind == FIGURES else "pass")
    except PartSkipped as e:
        status, note = "skip", str(e)
    except PartFailed as e:
        status, note = failure_status(part.kind, isinstance(e, PartTimeout)), e.args[0]
        outcome.data["output_tail"] = e.args[1] if len(e.args) > 1 else ""
    except Exception as e:  # a bug of this script: keep the traceback in the report
        status, note = "error", f"{type(e).__name__}: {e}"
        outcome.data["traceback"] = traceback.format_exc()
    if part.kind == CHECK and status != "pass" and note and \
            all(c["passed"] for c in outcome.checks):
        outcome.check("completed", False, note)
    record = part_record(part, status, outcome, time.monotonic() - start, round(limit), note)
    progress(ctx, f"{part.name}: {status} in {record['seconds']:.0f} s"
                  + (f" ({note})" if note else ""))
    return record


def execute_and_report(ctx, part, parts):
    """One part, and the report rewritten as soon as its figures exist (a later part that
    is killed, or a call that runs out of device time, leaves them on disk)."""
    record = execute(ctx, part)
    with ctx.report_lock:
        ctx.results[record["name"]] = record
        write_report(ctx, parts)
    return record


def run_plan(ctx, parts):
    """Every batch in order (the parts of one in threads); background parts run beside
    the later batches until a part that needs them starts. The report is rewritten after
    every batch. On an interruption the subprocesses are killed before the threads are
    waited for."""
    background = {}
    pool = ThreadPoolExecutor(max_workers=max(len(parts), 1))
    try:
        for batch in batches(parts):
            if batch[0].background:
                background[batch[0].name] = pool.submit(execute, ctx, batch[0])
                continue
            for name in sorted({n for p in batch for n in p.needs} & set(background)):
                ctx.results[name] = background.pop(name).result()
            futures = [pool.submit(execute_and_report, ctx, p, parts) for p in batch]
            for future in futures:
                future.result()
        for name, future in background.items():
            ctx.results[name] = future.result()
    except BaseException:
        ctx.kill_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- the bundle (make device-bundle) ----------------------------------------------------------

def check_bundle(bundle):
    """Problems with a bundle folder (empty list: fine), and a listing of it."""
    wheels, sdist = find_bundle(bundle)
    files = sorted(glob.glob(os.path.join(bundle, "*")))
    size = sum(os.path.getsize(f) for f in files)
    listing = [f"{os.path.basename(f)}  {os.path.getsize(f) / 1024:.0f} KiB" for f in files]
    listing.append(f"total {size / 2 ** 20:.2f} MiB (limit {BUNDLE_LIMIT_MIB} MiB)")
    problems = []
    if size > BUNDLE_LIMIT_MIB * 2 ** 20:
        problems.append(f"{size / 2 ** 20:.1f} MiB is over the {BUNDLE_LIMIT_MIB} MiB limit")
    names = [os.path.basename(w).split("-")[0].lower() for w in wheels]
    problems += [f"no {m} wheel" for m in BUNDLE_MODULES if m.lower() not in names]
    if sdist is None:
        problems.append("no inplace-abn source archive")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    problems += [f"two versions of {n} (pip would refuse the install)" for n in duplicates]
    return problems, listing


# --- command line -----------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("out", nargs="?", help="folder for device_check.json, .txt and the logs")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="the same parts at toy sizes on the CPU (ResNet-18, 64 px, gloo, "
                        "fp32/bf16), in a few minutes")
    p.add_argument("--only", default=None,
                   help="comma list of parts to run (with the parts they need)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"seconds for the whole run (default {GPU.budget_s} on the GPU, "
                        f"{DRY_RUN.budget_s} in the dry run)")
    p.add_argument("--bundle", default=BUNDLE_DIR,
                   help="folder made by `make device-bundle` (default device_bundle/)")
    p.add_argument("--iabn", choices=["build", "installed"], default=None,
                   help="build inplace-abn from the bundle (default on the GPU) or use the "
                        "interpreter's own (default in the dry run)")
    p.add_argument("--work", default=None,
                   help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--check-bundle", metavar="DIR", default=None,
                   help="check a bundle folder (contents, size) and exit")
    p.add_argument("--probe", choices=sorted(PROBES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="gloo", help=argparse.SUPPRESS)
    p.add_argument("--modules", default="", help=argparse.SUPPRESS)
    return p


def config_from(args):
    cfg = DRY_RUN if args.cpu_dry_run else GPU
    changes = {}
    if args.budget is not None:
        changes["budget_s"] = args.budget
    if args.iabn:
        changes["iabn"] = args.iabn
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        changes["cuda_arch"] = os.environ["TORCH_CUDA_ARCH_LIST"]
    return dataclasses.replace(cfg, **changes)


def run_check(cfg, parts, out, work, bundle, argv):
    """The whole check; returns the exit code."""
    os.makedirs(out, exist_ok=True)
    ctx = Context(cfg, os.path.abspath(out), work, os.path.abspath(bundle), argv)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    finished = False
    try:
        progress(ctx, f"{cfg.mode}: {len(parts)} parts, budget {cfg.budget_s} s, work {work}")
        print_plan(cfg, parts)
        run_plan(ctx, parts)
        finished = True
    finally:
        ctx.kill_all()
        signal.signal(signal.SIGTERM, previous)
        doc = write_report(ctx, parts, finished=finished)
        write_logs(ctx)
    print("\n".join(summary_lines(doc)))
    print(f"report: {os.path.join(ctx.out, JSON_NAME)}, {TEXT_NAME}, {LOGS_NAME}")
    return 0 if doc["passed"] else 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    if args.probe:
        result = PROBES[args.probe](args)
        _atomic_write(args.probe_out, json.dumps(result))
        return 0
    if args.check_bundle:
        problems, listing = check_bundle(args.check_bundle)
        print("\n".join(listing))
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problems else 0
    cfg = config_from(args)
    parts = plan(cfg)
    if args.only:
        parts = select(parts, [n.strip() for n in args.only.split(",") if n.strip()])
    if args.list:
        print_plan(cfg, parts)
        return 0
    if not args.out:
        get_parser().error("give the folder for the report (OUT)")
    work = args.work or tempfile.mkdtemp(prefix="mib-device-check-")
    os.makedirs(work, exist_ok=True)
    try:
        return run_check(cfg, parts, args.out, os.path.abspath(work), args.bundle, argv)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
