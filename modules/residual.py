"""Residual blocks with the In-Place ABN project's module names
(``convs.conv1``, ``convs.bn1``, ..., ``proj_conv``, ``proj_bn``)."""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F


class ResidualBlock(nn.Module):
    """Basic (``channels`` of length 2) or bottleneck (length 3) residual block.

    Bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1; basic: 3x3 (stride, dilation) -> 3x3
    (dilation). Each conv is followed by a norm layer with leaky-ReLU, the last one with the
    identity. A projection (1x1 conv with the block's stride + norm, identity) replaces the
    identity shortcut when the stride or the width changes. The sum goes through the first
    norm layer's activation.

    ``norm_act(num_features, activation=...)`` builds a norm layer."""

    def __init__(self, in_channels, channels, stride=1, dilation=1, norm_act=None):
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic) or 3 (bottleneck) entries, "
                             f"got {channels}")
        out_channels = channels[-1]
        if len(channels) == 2:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 3, stride=stride,
                                    padding=dilation, dilation=dilation, bias=False)),
                ("bn1", norm_act(channels[0])),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride=1,
                                    padding=dilation, dilation=dilation, bias=False)),
                ("bn2", norm_act(channels[1], activation="identity")),
            ]
        else:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)),
                ("bn1", norm_act(channels[0])),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride=stride,
                                    padding=dilation, dilation=dilation, bias=False)),
                ("bn2", norm_act(channels[1])),
                ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False)),
                ("bn3", norm_act(channels[2], activation="identity")),
            ]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != out_channels:
            self.proj_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.proj_bn = norm_act(out_channels, activation="identity")
        else:
            self.proj_conv = None
            self.proj_bn = None
        self.out_channels = out_channels

    def forward(self, x, return_preact=False):
        """The block's output; with ``return_preact`` also the sum before the activation
        (PLOP distils it), the activation then applied out of place to keep it."""
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        out = self.convs(x) + shortcut
        bn1 = self.convs.bn1
        preact = out
        if bn1.activation == "leaky_relu":
            out = F.leaky_relu(out, negative_slope=bn1.activation_param,
                               inplace=not return_preact)
        return (out, preact) if return_preact else out
