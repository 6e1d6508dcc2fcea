"""DeepLab-v3 head (ASPP with an image-pooling branch), as the original builds it."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import LEAKY_SLOPE, is_norm_layer

# atrous rates of the three 3x3 branches; OS8 uses (12, 24, 32), not the paper's 36
# 32: the rates of the stride-32 body of Swin (docs/behaviour.md S1's fix; not in the original)
ASPP_DILATIONS = {16: (6, 12, 18), 8: (12, 24, 32), 32: (3, 6, 9)}


def eval_pooling_padding(kernel_h, kernel_w):
    """Replicate padding (left, right, top, bottom) that brings a stride-1 average pool with
    this kernel back to the input size: floor((k-1)/2) before, ceil((k-1)/2) after."""
    def split(k):
        before = (k - 1) // 2
        return before, before + (1 if k % 2 == 0 else 0)
    return split(kernel_w) + split(kernel_h)


class DeeplabV3(nn.Module):
    """ASPP head: a 1x1 and three dilated 3x3 branches (concatenated, normalised, reduced)
    plus an image-pooling branch, summed and normalised.

    The pooling branch takes the global mean in training; in eval mode (with
    ``pooling_size`` P) it takes a stride-1 average over min(P, H) x min(P, W) windows,
    replicate-padded back to H x W, which equals the global mean only for maps up to P x P.
    """

    def __init__(self, in_channels, out_channels, hidden_channels=256, out_stride=16,
                 norm_act=None, pooling_size=None):
        super().__init__()
        if out_stride not in ASPP_DILATIONS:
            raise ValueError(f"output stride must be one of {sorted(ASPP_DILATIONS)}, "
                             f"got {out_stride}")
        self.pooling_size = pooling_size
        rates = ASPP_DILATIONS[out_stride]
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, bias=False, dilation=r, padding=r)
               for r in rates])
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        self.reset_parameters("leaky_relu", LEAKY_SLOPE)

    def reset_parameters(self, activation, slope):
        gain = nn.init.calculate_gain(activation, slope)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif is_norm_layer(m):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pooling_window(self, height, width):
        size = self.pooling_size
        ph, pw = (size, size) if isinstance(size, int) else tuple(size)
        return min(ph, height), min(pw, width)

    def _global_pooling(self, x):
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        kh, kw = self._pooling_window(x.shape[2], x.shape[3])
        pooled = F.avg_pool2d(x, (kh, kw), stride=1)
        return F.pad(pooled, eval_pooling_padding(kh, kw), mode="replicate")

    def forward(self, x):
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.map_bn(out))

        pool = self._global_pooling(x)
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pool)))
        if pool.shape[2:] != out.shape[2:]:
            pool = pool.expand(-1, -1, out.shape[2], out.shape[3])  # spatially constant
        return self.red_bn(out + pool)
