"""Pieces every benchmark shares: timing with device synchronisation, peak memory, running a
measurement in a fresh process, FLOP counting, the device peak table, tables and JSON.

Nothing here decides pass or fail: benchmarks print figures and ratios against a baseline
measured in the same run.
"""
import contextlib
import gc
import multiprocessing
import os
import re
import resource
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from utils.errors import UserError  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense tensor-core peaks in TFLOP/s (no sparsity), matched by substring of the device name,
# most specific first. "tf32" is what fp32 convolutions run at when cuDNN may use TF32
# (PyTorch's default); "fp32" is the plain CUDA-core peak.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    ("H100 NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    ("H100", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    ("H200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    ("A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    ("L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
)

MEMORY_KIND = {
    "cuda": "peak allocated tensor memory (torch.cuda.max_memory_allocated)",
    "cpu": "growth of the peak resident memory of a fresh measuring process over its size "
           "after the imports (getrusage ru_maxrss delta)",
}


class BenchError(UserError, RuntimeError):
    """A benchmark cannot run with the options given; the message says what to do."""


# --- device ---------------------------------------------------------------------------------

def resolve_device(name):
    """``auto`` -> cuda where available, else cpu; ``cuda`` without a GPU is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda given but no CUDA device is available; use --device cpu")
    return device


def set_threads(threads):
    if threads:
        torch.set_num_threads(int(threads))


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            model = m.group(1).strip() if m else ""
    return f"CPU {model}".strip()


def device_slug(device):
    """A file-name friendly device name: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def cpu_has_native_bf16():
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm);
    elsewhere autocast emulates bf16 and is far slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.findall(r"[a-z0-9_]+", " ".join(
                line.split(":", 1)[1] for line in f
                if line.lower().startswith(("flags", "features")))))
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cudnn_allows_tf32():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def peak_tflops(device, precision, override=None):
    """The device's dense peak for ``precision`` (TFLOP/s) and where it comes from, or
    ``(None, reason)`` where it is unknown. ``override`` (``--peak-tflops``) wins."""
    if override:
        return float(override), "--peak-tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no peak table for CPUs (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            kind = precision
            if precision == "fp32":
                kind = "tf32" if cudnn_allows_tf32() else "fp32"
            return float(peaks[kind]), f"{key} {kind} dense"
    return None, f"'{name}' is not in the peak table (give --peak-tflops)"


# --- timing and memory ----------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeat=1):
    """Best wall time of ``repeat`` calls of ``fn`` (host work only: no device sync)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def seconds_per_call(fn, device, warmup, iters):
    """Mean seconds per call of ``fn`` after ``warmup`` untimed calls, synchronising the
    device before the clock starts and before it stops."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / max(iters, 1)


def _max_rss_mib():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024


def _current_rss_mib():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return _max_rss_mib()


def memory_baseline(device):
    """Call before building anything: CUDA resets the peak counter; the CPU notes the
    process's resident memory now (the interpreter and the imports)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    return _current_rss_mib()


def reset_peak_memory(device):
    """After the warm-up (CUDA only: ru_maxrss cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device, baseline=0.0):
    """CUDA: peak allocated tensor memory since the last reset. CPU: how far the process's
    peak resident memory grew past ``baseline`` (:func:`memory_baseline`); meaningful
    because every measurement runs in a fresh process (:func:`run_isolated`)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # the peak is at least what is resident now: the kernel's high-water mark lags behind
    # (and run.py's cost record resets it), so it alone can read below the baseline
    return max(_max_rss_mib(), _current_rss_mib()) - baseline


def is_oom(exc):
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device):
    """Give cached blocks back after an out-of-memory error (call outside the except block,
    once the exception and its frames are gone)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --- FLOPs ----------------------------------------------------------------------------------

def count_flops(fn):
    """FLOPs of everything ``fn`` runs (matmuls and convolutions, forward and backward), as
    ``torch.utils.flop_counter`` counts them. Run it on the ``meta`` device: no memory, no
    time, same count."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# --- isolation ------------------------------------------------------------------------------

class IsolatedError(RuntimeError):
    """A measurement failed in its child process; ``oom`` tells out-of-memory apart."""

    def __init__(self, message, oom=False):
        super().__init__(message)
        self.oom = oom


def _child(conn, fn, args, kwargs):
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # reported to the parent, which decides
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        result = ("error", f"{type(e).__name__}: {last}", is_oom(e),
                  traceback.format_exc(limit=-4))
    conn.send(result)
    conn.close()


def run_isolated(fn, *args, isolate=True, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh (spawned) process, so that its peak memory is its
    own and nothing it allocated stays behind; returns its (picklable) result. Errors come
    back as :class:`IsolatedError` with the child's last line. ``isolate=False`` runs it here."""
    if not isolate:
        return fn(*args, **kwargs)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        proc.join()
        killed = proc.exitcode is not None and proc.exitcode < 0
        raise IsolatedError(f"the measuring process died (exit code {proc.exitcode}"
                            f"{', killed: out of host memory?' if killed else ''})",
                            oom=killed)
    finally:
        receive.close()
    proc.join()
    if result[0] == "error":
        if os.environ.get("BENCH_DEBUG"):
            sys.stderr.write(result[3])
        raise IsolatedError(result[1], oom=result[2])
    return result[1]


# --- output ---------------------------------------------------------------------------------

def fmt(value, digits=3):
    """A table cell: ``-`` for missing values, numbers with ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def format_table(columns, rows):
    """Text table: ``columns`` is a list of (key, title); ``rows`` a list of dicts. Text
    columns are left-aligned, numbers right-aligned."""
    cells = [[fmt(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in
              enumerate(columns)]
    numeric = [all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows)
               for key, _ in columns]
    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    out = [line([title for _, title in columns]), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def write_json(path, obj):
    """Atomically (temp file + rename), creating the folder."""
    from utils.checkpoint import atomic_write_json
    atomic_write_json(path, obj)
    return path
