"""Norm + activation layers of the ``--norm_act`` family, in pure PyTorch.

Every layer normalises per channel and then applies leaky-ReLU (slope 0.01) or the identity,
with parameters ``weight``, ``bias`` and buffers ``running_mean``, ``running_var`` named as in
the In-Place ABN package, so its ImageNet weights and the original's checkpoints load. No
``num_batches_tracked`` buffer is kept; a checkpoint that has one loads all the same (the key
is dropped).

``iabn``       In-place activated BN: affine scale ``|weight| + eps`` (the package's
               parametrisation; the gradient w.r.t. ``weight`` is sign-flipped where
               ``weight < 0``), per-process batch statistics.
``iabn_sync``  ``iabn`` with batch statistics over all processes of the default (or given)
               process group, on any backend (gloo on CPU, nccl on CUDA). Without a process
               group, or with one process, it is exactly ``iabn``.
``abn``        plain batch norm (scale ``weight``) + activation.
``std``        ``torch.nn.BatchNorm2d`` + activation. DEVIATION: the original crashes with
               this choice (and would have no non-linearity in the body); here it is a
               working BatchNorm2d followed by the same activation as the other variants.

``norm_impl='inplace_abn'`` builds the compiled package's layers instead (same names, same
numbers); the sync layer then receives the process group explicitly, because the package's
default group is captured at import time and silently disables synchronisation. The
package synchronises only CUDA tensors; on the CPU its sync layer uses the torch code here.
"""
import functools
import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError

log = logging.getLogger(__name__)

EPS = 1e-5
MOMENTUM = 0.1
LEAKY_SLOPE = 0.01
NORM_ACTS = ("iabn_sync", "iabn", "abn", "std")
NORM_IMPLS = ("auto", "torch", "inplace_abn")
ACTIVATIONS = ("leaky_relu", "identity")


class NormImplError(UserError, RuntimeError):
    """An unknown norm variant, or an implementation that is not installed."""


def _activate(x, activation, slope):
    if activation == "leaky_relu":
        # In place: the preceding batch norm does not need its output for backward.
        return F.leaky_relu(x, negative_slope=slope, inplace=True)
    return x


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; expected one of {ACTIVATIONS}")


def _drop_num_batches_tracked(state_dict, prefix):
    state_dict.pop(prefix + "num_batches_tracked", None)


def _channel_view(t, ndim):
    return t.view(1, -1, *([1] * (ndim - 2)))


class ABN(nn.Module):
    """Batch norm with scale ``weight`` followed by the activation (``--norm_act abn``)."""

    def __init__(self, num_features, eps=EPS, momentum=MOMENTUM, activation="leaky_relu",
                 activation_param=LEAKY_SLOPE):
        super().__init__()
        _check_activation(activation)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.activation_param = activation_param
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale(self):
        """The affine scale that multiplies the normalised input."""
        return self.weight

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias,
                         self.training, self.momentum, self.eps)
        return _activate(y, self.activation, self.activation_param)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _drop_num_batches_tracked(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        act = self.activation
        if act == "leaky_relu":
            act += f"[{self.activation_param}]"
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"activation={act}")


class InPlaceABN(ABN):
    """In-place activated BN (``--norm_act iabn``): scale ``|weight| + eps``.

    ``torch.where`` (not ``abs``) gives the package's gradient also at ``weight == 0``
    (+1, where ``abs`` would give 0)."""

    def scale(self):
        w = self.weight
        return torch.where(w < 0, -w, w) + self.eps


def _process_group_size(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _SyncBatchStats(torch.autograd.Function):
    """Mean and biased variance per channel over the inputs of every process of ``group``.

    Forward: one all-gather of each process's (mean, variance, count), combined exactly
    (no sum-of-squares cancellation). Backward: one all-reduce of the gradients that reach the
    shared statistics, so every process gets d(sum of all losses)/d(its input)."""

    @staticmethod
    def forward(ctx, x, group):
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = x.numel() // channels if channels else 0
        if count > 0:
            var, mean = torch.var_mean(xs, dim=dims, unbiased=False)
        else:
            var = mean = xs.new_zeros(channels)
        # Combined in float64: counts stay exact and the merge is well conditioned.
        local = torch.cat([mean.double(), var.double(), mean.new_full((1,), count).double()])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
        counts = table[:, -1:]
        total = counts.sum()
        # a local count above 1 settles it without a device-to-host copy
        if count <= 1 and total.item() <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{int(total)} over all processes (input size {list(x.shape)})")
        means, variances = table[:, :channels], table[:, channels:2 * channels]
        g_mean = (counts * means).sum(0) / total
        g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
        g_mean, g_var = g_mean.to(xs.dtype), g_var.to(xs.dtype)
        ctx.group = group
        ctx.save_for_backward(x, g_mean, total.to(xs.dtype))
        ctx.mark_non_differentiable(total)
        return g_mean, g_var, total

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_total):
        x, mean, total = ctx.saved_tensors
        channels = mean.numel()
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad_var = torch.zeros_like(mean)
        shared = torch.cat([grad_mean, grad_var]).contiguous()
        dist.all_reduce(shared, group=ctx.group)
        g_mean, g_var = shared[:channels], shared[channels:]
        xs = x.to(mean.dtype)
        dx = (_channel_view(g_mean, x.dim())
              + 2 * _channel_view(g_var, x.dim()) * (xs - _channel_view(mean, x.dim())))
        return (dx / total).to(x.dtype), None


class InPlaceABNSync(InPlaceABN):
    """``iabn`` with batch statistics synchronised over a process group
    (``--norm_act iabn_sync``). ``group=None`` means the default group, looked up at each
    forward so that the layer can be built before the process group exists."""

    def __init__(self, num_features, eps=EPS, momentum=MOMENTUM, activation="leaky_relu",
                 activation_param=LEAKY_SLOPE, group=None):
        super().__init__(num_features, eps, momentum, activation, activation_param)
        self.group = group

    def forward(self, x):
        if not self.training or _process_group_size(self.group) <= 1:
            return super().forward(x)
        return _sync_forward(self, x, self.group)


def _sync_forward(layer, x, group):
    """Training forward of an in-place ABN layer with statistics over ``group``."""
    group = group if group is not None else dist.group.WORLD
    mean, var, total = _SyncBatchStats.apply(x, group)
    with torch.no_grad():
        m = layer.momentum
        layer.running_mean.mul_(1 - m).add_(m * mean.to(layer.running_mean.dtype))
        unbiased = var.double() * (total / (total - 1))
        layer.running_var.mul_(1 - m).add_(m * unbiased.to(layer.running_var.dtype))
    w = layer.weight
    a = (torch.where(w < 0, -w, w) + layer.eps) * torch.rsqrt(var + layer.eps)
    b = layer.bias - mean * a
    y = torch.addcmul(_channel_view(b, x.dim()), x, _channel_view(a, x.dim()))  # x*a + b
    return _activate(y.to(x.dtype), layer.activation, layer.activation_param)


class BatchNorm2dAct(nn.BatchNorm2d):
    """``--norm_act std``: ``torch.nn.BatchNorm2d`` followed by the activation.

    DEVIATION from the original, where this choice crashes while building the head and
    would leave the body without any non-linearity: here it is BatchNorm2d (scale
    ``weight``, per-process statistics) + leaky-ReLU(0.01), identity where the other variants
    use identity. Numerically it equals ``abn``."""

    def __init__(self, num_features, eps=EPS, momentum=MOMENTUM, activation="leaky_relu",
                 activation_param=LEAKY_SLOPE):
        super().__init__(num_features, eps=eps, momentum=momentum)
        _check_activation(activation)
        self.activation = activation
        self.activation_param = activation_param
        # Same state-dict keys as the rest of the family (momentum is fixed, so the
        # counter has no effect on the numbers).
        self.num_batches_tracked = None

    def forward(self, x):
        return _activate(super().forward(x), self.activation, self.activation_param)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _drop_num_batches_tracked(state_dict, prefix)
        # Skip _NormBase's hook, which would add the counter back for old checkpoints.
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


_TORCH_CLASSES = {"iabn_sync": InPlaceABNSync, "iabn": InPlaceABN, "abn": ABN,
                  "std": BatchNorm2dAct}


# ------------------------------------------------------------------------------------------
# The compiled In-Place ABN package, wrapped to the same state-dict keys.

def inplace_abn_available():
    try:
        import inplace_abn  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch
        return False
    return True


@functools.lru_cache(maxsize=None)
def package_sync_path(training, group_size, is_cuda, shape):
    """Who normalises an ``iabn_sync`` input when the compiled package is chosen: "local"
    (the package without synchronisation: evaluation, or one process), "package" (its
    CUDA sync kernels), or "torch" (``_sync_forward``): on the CPU, and where this process
    holds one value per channel (one image per GPU through a 1x1 map, e.g. the ASPP's
    image pooling), which the package refuses from the local count while the statistics
    over all processes are well defined."""
    if not training or group_size <= 1:
        return "local"
    values_per_channel = shape[0] * math.prod(shape[2:])
    if not is_cuda or values_per_channel <= 1:
        return "torch"
    return "package"


def _package_classes():
    import inplace_abn

    class _PackageMixin:
        """No ``num_batches_tracked`` (like the torch layers). The compiled kernels take
        fp32, and fp16 on CUDA. bf16 inputs (autocast) take the PyTorch code on the same
        parameters: through the kernels they would be cast to fp32, and the fp32 output
        kept for backward plus the bf16 copy the next layer keeps cost 6 bytes per value,
        where the PyTorch layer keeps 4 (its input and output in bf16). fp16 on the CPU is
        normalised in the parameters' dtype and cast back."""

        torch_class = InPlaceABN  # the pure-PyTorch layer with the same formula

        def __init__(self, num_features, eps=EPS, momentum=MOMENTUM,
                     activation="leaky_relu", activation_param=LEAKY_SLOPE, **extra):
            _check_activation(activation)
            super().__init__(num_features, eps=eps, momentum=momentum, activation=activation,
                             activation_param=activation_param, **extra)
            self.num_batches_tracked = None

        def _accepts(self, x):
            return x.dtype == self.weight.dtype or (x.is_cuda and x.dtype == torch.float16)

        def forward(self, x):
            if self._accepts(x):
                return super().forward(x)
            if x.dtype == torch.bfloat16:
                return self.torch_forward(x)
            return super().forward(x.to(self.weight.dtype)).to(x.dtype)

        def scale(self):
            return self.torch_class.scale(self)

        def torch_forward(self, x):
            """The pure-PyTorch layer's forward, on this layer's parameters and buffers."""
            return self.torch_class.forward(self, x)

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            _drop_num_batches_tracked(state_dict, prefix)
            nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    class PackageABN(_PackageMixin, inplace_abn.ABN):
        torch_class = ABN

    class PackageInPlaceABN(_PackageMixin, inplace_abn.InPlaceABN):
        pass

    class PackageInPlaceABNSync(_PackageMixin, inplace_abn.InPlaceABNSync):
        def __init__(self, num_features, *args, group=None, **kwargs):
            super().__init__(num_features, *args, group=None, **kwargs)
            self.requested_group = group
            self._logged_fallback = False

        def forward(self, x):
            # The package syncs only when handed a group; resolve it now, not at import.
            path = package_sync_path(self.training, _process_group_size(self.requested_group),
                                     x.is_cuda, x.shape)
            if path == "local":
                self.group = None
            elif path == "torch":
                if x.is_cuda and not self._logged_fallback:
                    self._logged_fallback = True
                    log.info("In-Place ABN sync layer (%d channels): one value per channel "
                             "on this process (input %s), which the compiled package "
                             "refuses; its statistics are synchronised by the PyTorch code",
                             x.shape[1], list(x.shape))
                return _sync_forward(self, x, self.requested_group)
            elif x.dtype == torch.bfloat16:  # no bf16 kernels: see _PackageMixin
                return _sync_forward(self, x, self.requested_group)
            else:
                self.group = (self.requested_group if self.requested_group is not None
                              else dist.group.WORLD)
            return super().forward(x)

    return {"iabn_sync": PackageInPlaceABNSync, "iabn": PackageInPlaceABN, "abn": PackageABN,
            "std": BatchNorm2dAct}


# ------------------------------------------------------------------------------------------

def resolve_norm_impl(norm_impl, device="cpu"):
    """``auto`` -> the compiled package on CUDA when it is installed, else ``torch``.
    Asking for ``inplace_abn`` where it is not installed is an error."""
    if norm_impl not in NORM_IMPLS:
        raise NormImplError(f"unknown norm implementation '{norm_impl}'; expected one of "
                            f"{', '.join(NORM_IMPLS)}")
    if norm_impl == "auto":
        use_package = torch.device(device).type == "cuda" and inplace_abn_available()
        return "inplace_abn" if use_package else "torch"
    if norm_impl == "inplace_abn" and not inplace_abn_available():
        raise NormImplError("--norm_impl inplace_abn needs the compiled inplace_abn package "
                            "(install it with `make iabn`), or use --norm_impl torch")
    return norm_impl


def norm_act_class(norm_act, norm_impl="torch"):
    if norm_act not in NORM_ACTS:
        raise NormImplError(f"unknown --norm_act '{norm_act}'; expected one of "
                            f"{', '.join(NORM_ACTS)}")
    impl = resolve_norm_impl(norm_impl) if norm_impl != "auto" else "torch"
    return (_package_classes() if impl == "inplace_abn" else _TORCH_CLASSES)[norm_act]


def norm_act_factory(norm_act, norm_impl="torch", group=None):
    """A constructor ``make(num_features, activation='leaky_relu')`` for the chosen variant,
    leaky-ReLU slope 0.01. ``norm_impl='auto'`` means ``torch`` here (resolve it first with
    :func:`resolve_norm_impl` to pick the package on CUDA). ``group`` is the process group of
    ``iabn_sync`` (None: the default group)."""
    cls = norm_act_class(norm_act, norm_impl)
    kwargs = {"activation": "leaky_relu", "activation_param": LEAKY_SLOPE}
    if norm_act == "iabn_sync":
        kwargs["group"] = group
    return functools.partial(cls, **kwargs)


def norm_layer_types():
    """Every class this project (or torch) uses as a norm layer, for ``fix_bn`` and init."""
    types = [ABN, nn.modules.batchnorm._BatchNorm]
    if inplace_abn_available():
        import inplace_abn
        types.append(inplace_abn.ABN)
    return tuple(types)


def is_norm_layer(module):
    return isinstance(module, norm_layer_types())
