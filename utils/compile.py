"""``--compile``: torch.compile with a fallback to eager execution when compiling fails.

Every process takes the fallback together (one rank eager while the others run the
compiled graph could order their collectives differently and hang), the backward graph is
compiled with the forward (so that its failures are caught here too, not in ``backward()``),
and real errors (out of memory, CUDA, NCCL) are raised, not retried eagerly."""
import contextlib
import logging

import torch
import torch.nn as nn

from . import distributed

log = logging.getLogger(__name__)

# errors of the hardware or of the collectives: eager execution would meet them too
_REAL_ERRORS = tuple(t for t in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None),
                                 getattr(torch.distributed, "DistError", None)) if t is not None)
_REAL_ERROR_TEXT = ("CUDA error", "CUDA driver error", "NCCL", "cuDNN error", "CUBLAS_STATUS")


def is_real_error(error):
    """An error that is not a failure to compile."""
    text = str(error)
    return isinstance(error, _REAL_ERRORS) or any(t in text for t in _REAL_ERROR_TEXT)


def _backward_compiled_with_forward():
    """AOTAutograd compiles the backward graph lazily, at the first ``backward()`` (outside
    this wrapper); where torch has the switch, compile it with the forward instead."""
    try:
        from torch._functorch import config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


class CompiledWithFallback(nn.Module):
    """Runs ``torch.compile(module)``; the first call that fails to compile on any process
    switches every process, for good, to the eager module (same parameters, so training
    just continues)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        # not registered as a submodule: state dict and parameters stay the module's alone
        object.__setattr__(self, "_compiled", torch.compile(module))
        self.failed = False

    def forward(self, *args, **kwargs):
        if self.failed:
            return self.module(*args, **kwargs)
        output, error = None, None
        try:
            with _backward_compiled_with_forward():
                output = self._compiled(*args, **kwargs)
        except Exception as e:  # compilation errors come in many types
            if is_real_error(e):
                raise
            error = e
        # one small all-reduce per call while compiled, and only with several processes
        if not distributed.any_process(error is not None, self._device()):
            return output
        self.failed = True
        if error is not None:
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            log.warning("torch.compile failed (%s); running eagerly", first[:200])
        else:
            log.warning("torch.compile failed on another process; running eagerly on every "
                        "process")
        del output  # this call again, eagerly, as on the process that failed
        return self.module(*args, **kwargs)

    def _device(self):
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


def maybe_compile(module, enabled):
    return CompiledWithFallback(module) if enabled else module


def unwrap(model):
    """The network inside DDP / DataParallel / ``--compile`` wrappers (or the model itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel, CompiledWithFallback)
    while isinstance(model, wrappers):
        model = model.module
    return getattr(model, "_orig_mod", model)  # a bare torch.compile result
