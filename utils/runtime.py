"""The runtime of a step: the device, the precision (the autocast dtype and whether the fp16
loss scaler runs), the memory format, and how a batch goes to the device, decided once from
the options resolved for the device (``argparser.resolve_runtime_options``). The trainer, the
network builders, evaluation and the methods' hooks all ask this object, so they agree."""
import contextlib
import dataclasses

import torch

# --amp -> the autocast dtype (None: full precision)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype = None       # autocast to this dtype; None: float32 throughout
    channels_last: bool = False         # images and networks in channels-last memory format

    @classmethod
    def from_options(cls, opts, device):
        return cls(torch.device(device), AMP_DTYPES[opts.amp], opts.channels_last == "on")

    def full_precision(self):
        """The same runtime without autocast (the test phase runs in float32)."""
        return dataclasses.replace(self, amp_dtype=None)

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def loss_scaling(self):
        """Whether the loss is scaled (fp16 autocast): float16 gradients underflow otherwise."""
        return self.amp_dtype == torch.float16

    def grad_scaler(self):
        return torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def place(self, module):
        """``module`` on the device, in the memory format."""
        return module.to(self.device, memory_format=self.memory_format)

    def images(self, images):
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def labels(self, labels):
        return labels.to(self.device, dtype=torch.long, non_blocking=True)

    def extras(self, extras):
        """The extra per-pixel maps of a batch on the device (other values as they are)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in extras.items()}
