"""What a step cost: parameters, training time, throughput, peak memory and device.

``StepCost`` is started when a step's training starts (it resets the peak counters: the CUDA
allocator's peak and, on Linux, the process's peak resident size), is told each training
epoch's images and seconds, and gives the ``cost`` record of the result files:

* ``params_trainable`` / ``params_total``: parameters of the network being trained (with and
  without ``requires_grad``), the old model of a continual step not counted;
* ``train_seconds``: the training epochs' wall time (validation and checkpoints not counted),
  ``step_seconds``: the whole training phase's wall time, ``train_images`` and
  ``images_per_s`` (= train_images / train_seconds; the images of all processes);
* ``epochs_timed``: epochs run by this process (fewer than ``--epochs`` after a resume);
* ``peak_rss_mib``: the process's peak resident size during the step (``rss_scope``
  ``step``; ``process`` where the peak cannot be reset: then since the process started;
  DataLoader workers are other processes and not counted); ``peak_cuda_mib``: the CUDA
  allocator's peak during the step (None without a GPU);
* ``device``, ``device_name``, ``world_size``;
* ``batch_per_process``, ``accumulate`` (batches per optimiser step) and ``total_batch``
  (their product with ``world_size``: the batch of one optimiser step).
"""
import platform
import resource
import sys
import time

import torch

from utils.compile import unwrap

MIB = 2 ** 20


def count_parameters(model):
    """(trainable, total) parameters of a network (unwrapped from DDP)."""
    params = list(unwrap(model).parameters())
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in params))


def _reset_peak_rss():
    """Reset the kernel's peak resident size of this process (Linux); False where not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(scope):
    """Peak resident size in MiB: VmHWM (reset by ``_reset_peak_rss``) on Linux, else the
    process's lifetime peak."""
    if scope == "step":
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024   # macOS bytes, Linux KiB


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


class StepCost:
    def __init__(self, model, device, world_size=1, batch_size=None, accumulate=1):
        self.device = device
        self.world_size = world_size
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.params_trainable, self.params_total = count_parameters(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.rss_scope = "step" if _reset_peak_rss() else "process"
        self.images = 0
        self.seconds = 0.0
        self.epochs = 0
        self.start = time.perf_counter()
        self.step_seconds = None

    def add_epoch(self, images, seconds):
        self.images += int(images)
        self.seconds += float(seconds)
        self.epochs += 1

    def finish(self):
        """The training phase is over: freeze its wall time and memory peaks (the test
        phase that follows is not counted)."""
        self.step_seconds = time.perf_counter() - self.start
        self.peak_rss = peak_rss_mib(self.rss_scope)
        self.peak_cuda = (torch.cuda.max_memory_allocated(self.device) / MIB
                          if self.device.type == "cuda" else None)

    def record(self):
        """The ``cost`` record of the result files (plain JSON values)."""
        if self.step_seconds is None:
            self.finish()
        return {
            "params_trainable": self.params_trainable,
            "params_total": self.params_total,
            "train_seconds": round(self.seconds, 3),
            "step_seconds": None if self.step_seconds is None else round(self.step_seconds, 3),
            "train_images": self.images,
            "images_per_s": round(self.images / self.seconds, 3) if self.seconds > 0 else None,
            "epochs_timed": self.epochs,
            "peak_rss_mib": round(self.peak_rss, 1),
            "rss_scope": self.rss_scope,
            "peak_cuda_mib": None if self.peak_cuda is None else round(self.peak_cuda, 1),
            "device": str(self.device),
            "device_name": device_name(self.device),
            "world_size": self.world_size,
            "batch_per_process": self.batch_size,
            "accumulate": self.accumulate,
            "total_batch": (None if self.batch_size is None
                            else self.batch_size * self.world_size * self.accumulate),
        }
