"""The same network as ``segmentation_module.make_model`` (ResNet body, DeepLab-v3 head, 1x1
classifier, bilinear upsampling), built the plain way: torchvision's ResNet with
``nn.BatchNorm2d`` + ``nn.LeakyReLU(0.01)`` and a head of standard layers.

It is the yardstick of "fp32 no slower than a plain implementation": same convolutions,
strides, dilations and parameter count as ours, none of our norm layers or module tree.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.deeplab import ASPP_DILATIONS  # noqa: E402
from modules.norm import LEAKY_SLOPE  # noqa: E402
from modules.resnet import STAGE_DILATIONS  # noqa: E402

HIDDEN = 256


def bn_act(channels):
    return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))


def plain_resnet(backbone, output_stride=16):
    """torchvision's ResNet without pooling and classifier, leaky-ReLU activations, and our
    dilation per stage: a dilated stage has stride 1 and every 3x3 conv in it (its first
    block's included, unlike torchvision's own ``replace_stride_with_dilation``) dilated."""
    net = getattr(torchvision.models, backbone)(weights=None)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    for layer, dilation in zip(layers, STAGE_DILATIONS[output_stride]):
        if dilation == 1:
            continue
        for block in layer:
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    conv.stride, conv.dilation, conv.padding = (1, 1), (dilation,) * 2, \
                        (dilation,) * 2
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *layers)
    body.out_channels = net.fc.in_features
    return body


class PlainASPP(nn.Module):
    """DeepLab-v3 head from standard layers: 1x1 and three dilated 3x3 branches, concatenated,
    BN + leaky-ReLU, 1x1 reduction; a global-average branch (1x1, BN + leaky-ReLU, 1x1) added
    to it; BN + leaky-ReLU."""

    def __init__(self, in_channels, out_channels=HIDDEN, hidden=HIDDEN, output_stride=16):
        super().__init__()
        rates = ASPP_DILATIONS[output_stride]
        self.branches = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden, 3, padding=r, dilation=r, bias=False)
               for r in rates])
        self.branches_bn = bn_act(hidden * 4)
        self.reduce = nn.Conv2d(hidden * 4, out_channels, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.pool_bn = bn_act(hidden)
        self.pool_reduce = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.out_bn = bn_act(out_channels)

    def forward(self, x):
        out = self.reduce(self.branches_bn(torch.cat([b(x) for b in self.branches], dim=1)))
        pool = x.mean(dim=(2, 3), keepdim=True)
        pool = self.pool_reduce(self.pool_bn(self.pool_conv(pool)))
        return self.out_bn(out + pool)


class PlainDeepLabV3(nn.Module):
    """Body, head, one 1x1 classifier over all classes, logits upsampled to the input."""

    def __init__(self, backbone="resnet101", output_stride=16, classes=21):
        super().__init__()
        self.body = plain_resnet(backbone, output_stride)
        self.head = PlainASPP(self.body.out_channels, output_stride=output_stride)
        self.classifier = nn.Conv2d(HIDDEN, classes, 1)

    def forward(self, x):
        logits = self.classifier(self.head(self.body(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
