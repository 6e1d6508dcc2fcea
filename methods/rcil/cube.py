"""RCIL's pooled cube distillation (docs/behaviour.md, "RCIL", §R.5), in place of PLOP's POD.

Both functions take the old model's maps and the new model's maps (same order, same sizes;
the logits may have more channels in the new model) and square them element-wise. A new map
with more channels than the old one is first collapsed to the old count: its channel 0
absorbs every channel from ``index_new_class`` on (raw values). With
sigma = sqrt(nb_current_classes / nb_new_classes):

    spatial: (1/L) sum_l lambda^s_l * sigma * (1/6) sum_{k=4,8..24} mean_b ||P_k(X_b) - P_k(Y_b)||
             P_k: k x k average, stride 1, zero padding k/2 counted in the divisor (RC16)
    channel: (1/L') sum_{l < L} lambda^c_l * sigma * mean_b ||Q(X_b) - Q(Y_b)||
             (|| ||: the Frobenius norm over one image's C x H' x W' values)
             Q: mean of channels c-1, c, c+1 (zero outside); the last map is dropped (RC14)

lambda_l is the dataset's "other" factor, or its "last" factor for the last map the function
iterates (the logits for the spatial term, the head output f for the channel term).
"""
import math

import torch
import torch.nn.functional as F

from utils.errors import UserError

__all__ = ["CubeDistillationError", "CUBE_FACTORS", "SPATIAL_KERNELS", "cube_spatial",
           "cube_channel", "cube_distillation", "collapse_new_channels"]

# dataset -> ((spatial: other maps, last map), (channel: other maps, last map))
CUBE_FACTORS = {
    "voc": ((0.01, 0.0005), (0.01, 0.0005)),
    "cityscape": ((0.01, 0.0005), (0.01, 0.0005)),
    "ade": ((5e-6, 5e-7), (5e-6, 5e-7)),
    "cityscapes_domain": ((5e-4, 1e-4), (1e-4, 0.0)),
}
SPATIAL_KERNELS = (4, 8, 12, 16, 20, 24)


class CubeDistillationError(UserError, ValueError):
    """The cube distillation was asked for a dataset it has no factors for, or got maps
    that do not pair up."""


def _factors(dataset, which):
    if dataset not in CUBE_FACTORS:
        raise CubeDistillationError(
            f"RCIL's cube distillation has factors only for the datasets "
            f"{', '.join(CUBE_FACTORS)}, not '{dataset}' (RC12)")
    return CUBE_FACTORS[dataset][which]


def collapse_new_channels(new, n_old):
    """Channel 0 += channels n_old.. ; channels 1..n_old-1 kept."""
    return torch.cat([new[:, :1] + new[:, n_old:].sum(dim=1, keepdim=True), new[:, 1:n_old]],
                     dim=1)


def _pairs(old_maps, new_maps, index_new_class):
    if len(old_maps) != len(new_maps):
        raise CubeDistillationError(f"{len(old_maps)} old maps but {len(new_maps)} new ones")
    for a, b in zip(old_maps, new_maps):
        if a.shape[1] != b.shape[1]:
            b = collapse_new_channels(b, index_new_class)
        if a.shape != b.shape:
            raise CubeDistillationError(f"an old map of shape {list(a.shape)} is paired with "
                                        f"a new one of shape {list(b.shape)}")
        yield _upcast(a).pow(2), _upcast(b).pow(2)


def _upcast(x):
    # autocast maps: squares of float16 values overflow, so the term is computed in float32
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _frobenius_mean(d):
    return d.reshape(d.shape[0], -1).norm(dim=1).mean()


def _spatial_pool(x, k):
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=True)


def _channel_pool(x):
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))   # one zero channel on each side
    return (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3


def _accumulate(layers, maps_count, factors, sigma, device):
    # a float32 0-d accumulator, as RCIL: float64 layer values promote it
    total = torch.zeros((), dtype=torch.float32, device=device)
    other, last = factors
    for i, value in enumerate(layers):
        total = total + value * sigma * (last if i == maps_count - 1 else other)
    return total / maps_count


def cube_spatial(old_maps, new_maps, *, index_new_class, nb_current_classes, nb_new_classes,
                 dataset):
    """The spatial term over all maps."""
    sigma = math.sqrt(nb_current_classes / nb_new_classes)
    layers = []
    for a, b in _pairs(old_maps, new_maps, index_new_class):
        layers.append(sum(_frobenius_mean(_spatial_pool(a, k) - _spatial_pool(b, k))
                          for k in SPATIAL_KERNELS) / len(SPATIAL_KERNELS))
    return _accumulate(layers, len(layers), _factors(dataset, 0), sigma, old_maps[0].device)


def cube_channel(old_maps, new_maps, *, index_new_class, nb_current_classes, nb_new_classes,
                 dataset):
    """The channel term over all maps but the last (RC14)."""
    sigma = math.sqrt(nb_current_classes / nb_new_classes)
    layers = [_frobenius_mean(_channel_pool(a) - _channel_pool(b))
              for a, b in _pairs(old_maps[:-1], new_maps[:-1], index_new_class)]
    return _accumulate(layers, len(layers), _factors(dataset, 1), sigma, old_maps[0].device)


def cube_distillation(old_maps, new_maps, **kwargs):
    """(spatial, channel): both terms on the same lists (their sum enters the loss)."""
    return cube_spatial(old_maps, new_maps, **kwargs), cube_channel(old_maps, new_maps, **kwargs)
