"""``--compile``: torch.compile with a fallback to eager execution when compiling fails."""
import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class CompiledWithFallback(nn.Module):
    """Runs ``torch.compile(module)``; the first call that fails to compile switches, for
    good, to the eager module (same parameters, so training just continues)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        # not registered as a submodule: state dict and parameters stay the module's alone
        object.__setattr__(self, "_compiled", torch.compile(module))
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self._compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise  # not a compilation failure: eager would run out of memory too
            except Exception as e:  # compilation errors come in many types
                self.failed = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("torch.compile failed (%s); running eagerly", first[:200])
        return self.module(*args, **kwargs)


def maybe_compile(module, enabled):
    return CompiledWithFallback(module) if enabled else module


def unwrap(model):
    """The network inside DDP / DataParallel / ``--compile`` wrappers (or the model itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel, CompiledWithFallback)
    while isinstance(model, wrappers):
        model = model.module
    return getattr(model, "_orig_mod", model)  # a bare torch.compile result
