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
  gpu-path     a few seconds of forced, deterministic checks (bench/gpu_path_probe.py): an
               fp16 overflow on the first step with the optimiser picked for fp16, a penalty
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
               input / weight / bias gradients, running statistics, per dtype
  e2e-iabn     the e2e run (first precision) with ``--norm_impl inplace_abn`` and the build
               on the path, as ``auto`` trains on CUDA where the package is installed
  bench-*      the figures, by bench/run_all.py: training images/s, peak memory and MFU at
               the largest batch that fits and at the paper's 12 per GPU, the step-1 cost of
               every method against FT, evaluation, the input pipeline with 8 and 16
               workers, --compile on and off, training with the compiled norm layers

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
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_DIR = os.path.join(ROOT, "device_bundle")
BUNDLE_LIMIT_MIB = 20
BUNDLE_MODULES = ("tensorboardX",)  # what run.py needs that the GPU machine lacks
SDIST_PATTERN = "inplace[-_]abn-*.tar.gz"
TASK, DATASET = "15-5", "voc"
TASK_NAME = f"{TASK}-{DATASET}"
METHODS = "FT,LWF,ILT,LWF-MC,MiB,EWC,PI,RW,PLOP"  # every method of bench/bench_train.py
JSON_NAME, TEXT_NAME, LOGS_NAME = "device_check.json", "device_check.txt", \
    "device_check-logs.tar.gz"
TAIL_CHARS = 3000

CHECK, BUILD, FIGURES = "check", "build", "figures"
# worst relative error ||compiled - torch|| / ||torch|| allowed per dtype
NORM_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
TARGETS = {"bf16_images_per_s": 250.0, "mib_vs_ft": 1.3, "loader_headroom": 2.0}


# --- configuration: the real run and the dry run ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that differs between the GPU run and the CPU dry run; the parts are the
    same code for both."""
    mode: str
    device: str
    backend: str
    backbone: str
    crop: int
    batch: int
    n_train: int
    n_val: int
    image_size: int
    workers: int
    threads: int
    precisions: tuple
    resume_precision: str
    exact_resume: bool
    iabn: str                 # build: from the bundle's source archive; installed: as found
    build_jobs: int
    budget_s: int
    bench_args: tuple
    bench_batches: str
    paper_batch: int
    bench_precisions: str
    methods_precision: str
    eval_precisions: str
    iabn_precisions: str
    data_workers: tuple
    data_images: int
    compile_env: tuple = ()
    figures_alone: bool = True  # False: the figures parts run at the same time
    cuda_arch: str = "9.0"


def batch_ladder(gpu_gib, gib_per_image, headroom=0.8):
    """Training batches to try, from a memory estimate: the largest that should fit in
    ``headroom`` of the GPU, and a half and a quarter of it (multiples of 8), so no try is
    a forward that cannot fit. ResNet-101 OS16 at 512 px saves about 0.8 GiB of activations
    per image in fp32 (less under bf16/fp16: the fp32 estimate bounds every precision)."""
    top = int(headroom * gpu_gib / gib_per_image) // 8 * 8
    return ",".join(str(b) for b in sorted({max(top // 4 // 8 * 8, 8), max(top // 2 // 8 * 8, 8),
                                            max(top, 8)}))


GPU = Config(
    mode="cuda", device="cuda", backend="nccl", backbone="resnet101", crop=512, batch=8,
    n_train=48, n_val=16, image_size=512, workers=2, threads=4,
    precisions=("fp16", "bf16"), resume_precision="fp16", exact_resume=False, iabn="build",
    # the checks' worst case (90 + 300 + 90 s): every check starts; figures when time is left
    build_jobs=8, budget_s=480,
    bench_args=("--device", "cuda", "--iters", "5", "--warmup", "2"),
    bench_batches=batch_ladder(gpu_gib=78, gib_per_image=0.8), paper_batch=12,
    bench_precisions="fp32,bf16,fp16",
    # the compiled norm in both half precisions: under bf16 the package's wrapper works in
    # fp32 (its kernels take fp16 only), so bf16 alone hides its memory saving
    methods_precision="bf16", eval_precisions="fp32,bf16", iabn_precisions="bf16,fp16",
    # 40 loader batches of 12: several rounds of 16 workers' prefetching
    data_workers=(8, 16), data_images=480)

DRY_RUN = Config(
    mode="cpu-dry-run", device="cpu", backend="gloo", backbone="resnet18", crop=64, batch=4,
    n_train=20, n_val=10, image_size=64, workers=0, threads=1,
    precisions=("fp32", "bf16"), resume_precision="fp32", exact_resume=True, iabn="installed",
    build_jobs=2, budget_s=900,
    bench_args=("--device", "cpu", "--quick", "--threads", "1", "--no-isolate",
                "--size", "64"),
    # bf16 is emulated on most CPUs (10x slower): the e2e and norm parts cover it here
    bench_batches="2,4", paper_batch=2, bench_precisions="fp32",
    methods_precision="fp32", eval_precisions="fp32", iabn_precisions="fp32",
    data_workers=(1, 2), data_images=8,
    # inductor takes 80+ s for this network on a 2-core CPU: the dry run proves the plumbing
    compile_env=(("TORCHDYNAMO_DISABLE", "1"),),
    # toy figures mean nothing, so they need not be taken alone: half the time on 2 cores
    figures_alone=False)


# --- the plan ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of the check. ``run(ctx, deadline, outcome)`` records checks and figures;
    parts of one ``group`` run at the same time; a ``background`` part runs beside the
    following ones until a part that needs it starts."""
    name: str
    kind: str
    limit_s: int
    run: object
    needs: tuple = ()
    group: str = None
    background: bool = False


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One figures part: bench/run_all.py once per argument list in ``invocations``."""
    name: str
    limit_s: int
    invocations: tuple
    needs: tuple = ()
    env: tuple = ()
    iabn: bool = False


def bench_specs(cfg):
    common = (*cfg.bench_args, "--norm_impl", "torch")
    paper = str(cfg.paper_batch)
    train = ("--only", "train", "--precisions", cfg.bench_precisions)
    methods = ("--methods-batch", paper, "--methods-precision", cfg.methods_precision)
    return [
        BenchSpec("bench-train", 240, ((*common, *train, "--batches", cfg.bench_batches),)),
        BenchSpec("bench-methods", 180, ((*common, "--only", "methods,eval", "--no-isolate",
                                          "--methods", METHODS, *methods, "--eval-batch",
                                          paper, "--eval-precisions", cfg.eval_precisions),)),
        BenchSpec("bench-data", 150, tuple(
            (*common, "--only", "data", "--workers", str(w), "--methods-batch", paper,
             "--data-images", str(cfg.data_images)) for w in cfg.data_workers)),
        BenchSpec("bench-train-12", 150, ((*common, *train, "--batches", paper),)),
        BenchSpec("bench-compile", 240, ((*common, "--only", "methods", "--methods", "FT",
                                          "--compile", *methods),),
                  env=cfg.compile_env),
        BenchSpec("bench-iabn", 150, ((*cfg.bench_args, "--norm_impl", "inplace_abn", "--only",
                                       "train", "--precisions", cfg.iabn_precisions,
                                       "--batches", cfg.bench_batches),),
                  needs=("norm",), iabn=True),
    ]


def plan(cfg):
    """The parts in order of priority: correctness first, then the figures."""
    parts = [
        Part("gpu-path", CHECK, 60, part_gpu_path, group="setup"),
        Part("env", CHECK, 60, part_env, group="setup"),
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
    parts.append(Part("e2e-iabn", CHECK, 240, functools.partial(
        part_e2e, precision=cfg.precisions[0], package=True),
        needs=("bundle", "data", "iabn-build")))
    parts += [Part(s.name, FIGURES, s.limit_s, functools.partial(part_bench, spec=s),
                   needs=("bundle", *s.needs), group=None if cfg.figures_alone else "figures")
              for s in bench_specs(cfg)]
    return parts


def select(parts, names):
    """The parts named, with every part they need (transitively), in plan order."""
    by_name = {p.name: p for p in parts}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"error: unknown part '{unknown[0]}'; the parts are "
                         f"{', '.join(by_name)}")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs
    return [p for p in parts if p.name in wanted]


def batches(parts):
    """Consecutive parts of one group run together; every other part runs alone."""
    out = []
    for p in parts:
        if out and p.group and out[-1][0].group == p.group:
            out[-1].append(p)
        else:
            out.append([p])
    return out


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


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def mib_text(mib):
    return "-" if mib is None else (f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB")


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
    """The forced, deterministic checks of bench/gpu_path_probe.py (a few seconds)."""
    found = ctx.probe("gpu-path", deadline)
    for c in found["checks"]:
        if c["passed"] is None:   # does not apply here (no CUDA in the dry run)
            out.figure(c["name"], f"{c['name']}: not run: {c['detail']}")
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
    lane = lane_dir(ctx, name)
    impl = ["--norm_impl", "inplace_abn"] if package else []
    env = ctx.env(ctx.iabn_path) if package and ctx.iabn_path else None
    if package and ctx.iabn_path is None and ctx.cfg.iabn != "installed":
        raise PartSkipped("no inplace-abn build on the path")
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


def part_resume(ctx, deadline, out):
    c, name, epochs = ctx.cfg, "resume", 2
    args = run_args(ctx, name, c.resume_precision, "0", epochs=epochs)
    reference = None
    if c.exact_resume:
        ref_lane = lane_dir(ctx, "resume-reference")
        ctx.run([*ctx.torchrun(), *args], "resume-reference", deadline,
                "the uninterrupted run", cwd=ref_lane)
        reference = read_result(ref_lane, name, 0)
    lane = lane_dir(ctx, name)
    proc = ctx.start([*ctx.torchrun(), *args], "resume-killed", cwd=lane)
    wait_for_checkpoint(ctx, proc, os.path.join(lane, "checkpoints",
                                                f"{TASK_NAME}_{name}_0.pth"), deadline)
    kill_tree(proc)
    ctx.forget(proc)
    out.check("killed", proc.returncode == -signal.SIGKILL,
              f"torchrun and its worker SIGKILLed after the epoch-0 checkpoint "
              f"(exit {proc.returncode})")
    ctx.run([*ctx.torchrun(), *args], "resume-rerun", deadline, "the rerun", cwd=lane)
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
                  f"(iabn_sync/iabn/abn, train/eval, contiguous/channels-last) on "
                  f"{found['device']}: worst relative error {err:.1e} ({key}, "
                  f"{case['norm_act']} {case['layout']} {case['mode']}), limit {tol:.0e}",
                  worst=err)


# --- parts: figures ---------------------------------------------------------------------------

def row_text(row):
    head = f"{row['section']} {row['case']}" + (f", batch {row['batch']}"
                                                 if row.get("batch") else "")
    if row.get("error"):
        return f"{head}: error: {row['error'][:200]}"
    bits = [f"{row['images_per_s']:.4g} images/s"] if row.get("images_per_s") else []
    if row.get("peak_mib") is not None:
        bits.append(f"peak {mib_text(row['peak_mib'])}")
    if row.get("tflops") is not None:
        bits.append(f"{row['tflops']:.3g} TFLOP/s")
    if row.get("mfu_pct") is not None:
        bits.append(f"MFU {row['mfu_pct']:.1f}%")
    if row.get("x_base") is not None:
        bits.append(f"{row['x_base']:.2f}x the time per image of {row['baseline']}")
    return f"{head}: {', '.join(bits)}"


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


# --- targets (figures, never checks) ----------------------------------------------------------

def all_rows(results):
    return [r for res in results.values() for r in res.get("data", {}).get("rows", [])]


def comparisons(cfg, results):
    """Figures of two parts side by side: --compile on vs off, and the compiled norm
    layers vs pure PyTorch in training (same case)."""
    rows = [r for r in all_rows(results) if r.get("images_per_s")]

    def pick(part, section, case):
        return next((r for r in rows if (r["part"], r["section"], r["case"]) ==
                     (part, section, case)), None)

    found = []
    eager, compiled = pick("bench-methods", "methods", "FT"), pick("bench-compile", "methods",
                                                                   "FT")
    if eager and compiled:
        ratio = compiled["images_per_s"] / eager["images_per_s"]
        found.append({"name": "compile", "ratio": ratio, "text": f"--compile: FT step 1 "
                      f"{compiled['images_per_s']:.4g} images/s vs {eager['images_per_s']:.4g}"
                      f" eager, {ratio:.2f}x"
                      + (" (compiling is off in this mode: "
                         + " ".join(f"{k}={v}" for k, v in cfg.compile_env) + ")"
                         if cfg.compile_env else "")})
    for row in (r for r in rows if r["part"] == "bench-iabn"):
        base = pick("bench-train", row["section"], row["case"])
        if base:
            ratio = row["images_per_s"] / base["images_per_s"]
            found.append({"name": f"compiled norm {row['case']}", "ratio": ratio,
                          "text": f"compiled norm layers, train {row['case']}: batch "
                                  f"{row['batch']} vs {base['batch']}, {ratio:.2f}x the "
                                  f"images/s, peak {mib_text(row.get('peak_mib'))} vs "
                                  f"{mib_text(base.get('peak_mib'))}"})
    return found


def targets(cfg, results):
    """The issue's speed targets against the figures taken; the dry run's sizes say nothing
    about them, so there each is shown without a verdict."""
    rows = [r for r in all_rows(results) if r.get("images_per_s")]
    train = [r for r in rows if r["section"] == "train" and r.get("size") == cfg.crop]
    bf16 = max((r for r in train if r.get("precision") == "bf16"),
               key=lambda r: r["images_per_s"], default=None)
    mib = next((r for r in rows if r["section"] == "methods" and r["case"] == "MiB"
                and r.get("x_base")), None)
    loader = max((r for r in rows if r["section"] == "data" and r["case"].startswith("loader")),
                 key=lambda r: r["images_per_s"], default=None)
    fastest = max(train, key=lambda r: r["images_per_s"], default=None)
    found = []

    def add(text, value, goal, met):
        verdict = ("met" if met else "NOT met") if cfg.mode == "cuda" else \
            "no verdict: toy sizes in the dry run"
        found.append({"target": text, "value": value, "goal": goal,
                      "met": met if cfg.mode == "cuda" else None,
                      "text": f"{text}: {value:.3g} ({verdict})"})

    goal = TARGETS["bf16_images_per_s"]
    if bf16:
        add(f"bf16 training >= {goal:.0f} images/s ({bf16['part']}: {bf16['case']}, batch "
            f"{bf16['batch']})",
            bf16["images_per_s"], goal, bf16["images_per_s"] >= goal)
    goal = TARGETS["mib_vs_ft"]
    if mib:
        add(f"MiB step-1 iteration <= {goal}x FT", mib["x_base"], goal, mib["x_base"] <= goal)
    goal = TARGETS["loader_headroom"]
    if loader and fastest:
        ratio = loader["images_per_s"] / fastest["images_per_s"]
        add(f"input pipeline >= {goal:.0f}x what training consumes ({loader['case']} vs "
            f"{fastest['case']}, batch {fastest['batch']})", ratio, goal, ratio >= goal)
    return found


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


# --- the report -------------------------------------------------------------------------------

def verdict(ctx, parts):
    records = [ctx.results[p.name] for p in parts if p.name in ctx.results]
    checks = [c for r in records if r["kind"] == CHECK for c in r["checks"]]
    failed = [r for r in records if r["failed"]]
    return checks, failed


def rerun_names(ctx, parts):
    """Parts worth a second call: those that failed or ran out of budget or time."""
    return [p.name for p in parts if p.name in ctx.results and
            (ctx.results[p.name]["failed"] or ctx.results[p.name]["status"] in
             ("error", "timeout") or ctx.results[p.name]["note"].startswith("out of budget"))]


def document(ctx, parts, finished):
    checks, failed = verdict(ctx, parts)
    rerun = rerun_names(ctx, parts)
    return {
        "format": 1, "mode": ctx.cfg.mode, "created": ctx.created, "argv": ctx.argv,
        "finished": finished, "passed": (not failed) if finished else None,
        "seconds": round(ctx.elapsed(), 1), "budget_s": ctx.cfg.budget_s,
        "checks_total": len(checks), "checks_failed": sum(not c["passed"] for c in checks),
        "failed_parts": [r["name"] for r in failed], "environment": ctx.environment,
        "config": dataclasses.asdict(ctx.cfg),
        "plan": [{"name": p.name, "kind": p.kind, "limit_s": p.limit_s, "needs": list(p.needs),
                  "group": p.group, "background": p.background} for p in parts],
        "parts": [ctx.results[p.name] for p in parts if p.name in ctx.results],
        "comparisons": comparisons(ctx.cfg, ctx.results),
        "targets": targets(ctx.cfg, ctx.results),
        "rerun": (f"bash bench/device_check.sh OUT --only {','.join(rerun)}"
                  + (" --cpu-dry-run" if ctx.cfg.mode != "cuda" else "")) if rerun else None,
    }


STATUS_TAG = {True: "PASS", False: "FAIL"}


def summary_lines(doc):
    """The text summary: a headline, one line per part with its time against its limit,
    one per check and per figure, the targets, and the result last."""
    env = doc.get("environment") or {}
    device = (env.get("gpus") or [{}])[0].get("name") or env.get("cpu_model") or ""
    lines = [f"MiB device check ({doc['mode']}{', ' + device if device else ''}): "
             f"{doc['seconds']:.0f} s of a {doc['budget_s']} s budget"]
    for part in doc["parts"]:
        note = f" ({part['note']})" if part["note"] else ""
        lines.append(f"[{part['name']}] {part['status']} in {part['seconds']:.0f} s of its "
                     f"{part['limit_s']} s limit{note}")
        lines += [f"  {STATUS_TAG[c['passed']]} {c['name']}: {c['detail']}"
                  for c in part["checks"]]
        lines += [f"  figure {f['text']}" for f in part["figures"]]
    if doc["comparisons"]:
        lines.append("comparisons:")
        lines += [f"  {c['text']}" for c in doc["comparisons"]]
    if doc["targets"]:
        lines.append("targets (figures, not checks):")
        lines += [f"  {t['text']}" for t in doc["targets"]]
    if doc["rerun"]:
        lines.append(f"rerun what failed or did not fit: {doc['rerun']}")
    if not doc["finished"]:
        lines.append("RESULT: unfinished")
    elif doc["passed"]:
        lines.append(f"RESULT: all {doc['checks_total']} checks passed")
    else:
        lines.append(f"RESULT: FAILED: {doc['checks_failed']} of {doc['checks_total']} checks "
                     f"failed; parts failed or not run: {', '.join(doc['failed_parts'])}")
    return lines


def _atomic_write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(ctx, parts, finished=False):
    doc = document(ctx, parts, finished)
    _atomic_write(os.path.join(ctx.out, JSON_NAME), json.dumps(doc, indent=1, default=str))
    _atomic_write(os.path.join(ctx.out, TEXT_NAME), "\n".join(summary_lines(doc)) + "\n")
    return doc


def write_logs(ctx):
    """Every subprocess's output in one archive (a device run brings back a few files)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(ctx.logs, "*.log"))):
            tar.add(path, arcname=os.path.basename(path))
    with open(os.path.join(ctx.out, LOGS_NAME), "wb") as f:
        f.write(buffer.getvalue())


# --- probes (run in a subprocess by Context.probe) --------------------------------------------

def probe_imports(args):
    found = {}
    for module in args.modules.split(","):
        try:
            mod = __import__(module)
            found[module] = {"version": getattr(mod, "__version__", None),
                             "file": getattr(mod, "__file__", None) or ""}
        except Exception as e:  # ImportError, or a build that does not fit this torch
            found[module] = {"error": f"{type(e).__name__}: {e}"}
    return found


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def _collective(torch, backend, device):
    """One all_reduce in a process group of one on ``backend``."""
    import torch.distributed as dist
    with tempfile.TemporaryDirectory() as folder:
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} \
            if device == "cuda" else {}
        dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0,
                                world_size=1, **kwargs)
        try:
            t = torch.arange(4.0, device=device)
            dist.all_reduce(t)
            values = t.tolist()
        finally:
            dist.destroy_process_group()
    return {"ok": values == [0.0, 1.0, 2.0, 3.0], "device": device,
            "detail": f"{values} for [0, 1, 2, 3]"}


def _nccl_version(torch):
    version = torch.cuda.nccl.version()  # a tuple in torch 2, an int before
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def probe_env(args):
    import numpy
    import torch
    import torchvision
    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "memory_gib": p.total_memory / 2 ** 30,
                     "capability": f"{p.major}{p.minor}", "multiprocessors":
                     p.multi_processor_count})
    info = {"python": platform.python_version(), "executable": sys.executable,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "cuda_available": cuda, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": _nccl_version(torch) if cuda else None,
            "driver": _driver_version() if cuda else None, "gpus": gpus,
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gib": _memory_gib(),
            "platform": platform.platform()}
    device = "cuda" if args.device == "cuda" and cuda else "cpu"
    try:
        info["collective"] = _collective(torch, args.backend, device)
    except Exception as e:  # reported as a failed check
        info["collective"] = {"ok": False, "device": device, "detail": f"{type(e).__name__}: {e}"}
    return info


def _norm_case(torch, norm_act_factory, norm_act, dtype, layout, training, device):
    """Relative errors ||compiled - torch|| / ||torch|| of the output, the gradients of the
    input, weight and bias, and the running statistics after one step."""
    g = torch.Generator().manual_seed(0)
    channels = 64
    ours = norm_act_factory(norm_act, "torch")(channels)
    with torch.no_grad():
        w = torch.rand(channels, generator=g) + 0.5
        w[::2] *= -1  # mixed signs, as in the ImageNet weights: |w| + eps in iabn
        ours.weight.copy_(w)
        ours.bias.copy_(torch.randn(channels, generator=g))
        ours.running_mean.copy_(torch.randn(channels, generator=g))
        ours.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    theirs = norm_act_factory(norm_act, "inplace_abn")(channels)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, channels, 32, 32, generator=g) * 2 + 0.7
    upstream = torch.randn(x.shape, generator=g)
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    low = getattr(torch, dtype)
    found = {}
    for label, layer in (("torch", ours), ("compiled", theirs)):
        layer = layer.to(device).train(training)
        leaf = x.to(device, low, copy=True).contiguous(memory_format=fmt).requires_grad_()
        with torch.autocast(device, dtype=low, enabled=low != torch.float32):
            y = layer(leaf.clone())  # the package writes into its input
        (y.float() * upstream.to(device)).sum().backward()
        found[label] = {"output": y.float(), "input grad": leaf.grad.float(),
                        "weight grad": layer.weight.grad, "bias grad": layer.bias.grad,
                        "running mean": layer.running_mean, "running var": layer.running_var}
    errors = {}
    for key, ref in found["torch"].items():
        other = found["compiled"][key].double()
        ref = ref.double()
        errors[key] = float((other - ref).norm() / ref.norm().clamp_min(1e-30))
    return errors


def probe_norm(args):
    import torch

    from modules.norm import norm_act_factory
    device = args.device
    dtypes = ["float32", "bfloat16"] + (["float16"] if device == "cuda" else [])
    cases = []
    for dtype in dtypes:
        for norm_act in ("iabn_sync", "iabn", "abn"):
            for layout in ("contiguous", "channels-last"):
                for training in (True, False):
                    case = {"dtype": dtype, "norm_act": norm_act, "layout": layout,
                            "mode": "train" if training else "eval"}
                    try:
                        case["errors"] = _norm_case(torch, norm_act_factory, norm_act, dtype,
                                                    layout, training, device)
                    except Exception as e:  # reported as a failed check
                        case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    cases.append(case)
    return {"device": device, "cases": cases}


def probe_gpu_path(args):
    from gpu_path_probe import probe_gpu_path as probe
    return probe(args)


PROBES = {"env": probe_env, "imports": probe_imports, "norm": probe_norm,
          "gpu-path": probe_gpu_path}


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


def time_plan(cfg, parts):
    """Worst-case timetable from the limits: each batch starts when the one before has
    used its whole limit (a background part overlaps the batches after it); a part starts
    only when the budget left covers its limit. Lines of text and the parts that would
    not start in the worst case."""
    lines, clock, late = [], 0, []
    for batch in batches(parts):
        limit = max(p.limit_s for p in batch)
        fits = [p.name for p in batch if cfg.budget_s - clock >= p.limit_s]
        late += [p.name for p in batch if p.name not in fits]
        names = ", ".join(p.name for p in batch)
        if batch[0].background:
            lines.append(f"  {clock:4d} s  {names} (background, up to {limit} s)")
            continue
        lines.append(f"  {clock:4d} s  {names} (up to {limit} s)"
                     + ("" if len(fits) == len(batch) else "  <- not started in the worst "
                        "case: budget"))
        clock += limit if fits else 0
    lines.append(f"  worst case {clock} s of a {cfg.budget_s} s budget; parts start as soon "
                 "as the ones before finish, so most start earlier")
    return lines, late


def print_plan(cfg, parts):
    print(f"plan ({cfg.mode}, budget {cfg.budget_s} s):")
    for p in parts:
        extra = (f", with {p.group}" if p.group else "") + (", background" if p.background
                                                            else "")
        needs = f", needs {', '.join(p.needs)}" if p.needs else ""
        print(f"  {p.name:15} {p.kind:8} limit {p.limit_s:4d} s{extra}{needs}")
    print("time plan (start by, worst case):")
    print("\n".join(time_plan(cfg, parts)[0]))


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
