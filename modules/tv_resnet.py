"""The torchvision ResNet body shared by the networks of SSUL's lineage (``tv_deeplab``) and
DKD's (``dkd_deeplab``): torchvision's ResNet (plain BatchNorm + ReLU) without ``avgpool``
and ``fc``, dilated for output stride 16 (``layer4``) or 8 (``layer3`` and ``layer4``) as
torchvision's ``replace_stride_with_dilation`` does it, basic blocks (ResNet-18/34, which
torchvision refuses to dilate) by the same rule; where its ImageNet file is found; BN momentum.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1..4``), so torchvision's and
the original methods' checkpoints load as they are.
"""
import os

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as tv_resnet

from utils.errors import RunError

__all__ = ["TV_BACKBONES", "ResNetBody", "torchvision_resnet", "imagenet_weights_file",
           "set_bn_momentum"]

# torchvision constructors and their output channels
TV_BACKBONES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                "resnet152": 2048}
_DILATE = {16: (False, False, True), 8: (False, True, True)}
# torchvision's ImageNet files: the current name, then the one SSUL's torchvision used
_WEIGHT_FILES = {
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    "resnet34": ("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
    "resnet152": ("resnet152-394f9c45.pth", "resnet152-b121ed2d.pth"),
}


def _dilate_basic_blocks(layer, dilation, previous):
    """What torchvision's ``replace_stride_with_dilation`` does, for BasicBlock layers
    (torchvision refuses them): stride 1, first block at the previous dilation, the others at
    ``dilation``."""
    for i, block in enumerate(layer):
        d = previous if i == 0 else dilation
        block.conv1.stride = (1, 1)
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def torchvision_resnet(name, output_stride):
    """torchvision's ResNet ``name`` with random weights, dilated for ``output_stride``."""
    if name not in TV_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(TV_BACKBONES)}")
    if output_stride not in _DILATE:
        raise ValueError(f"output stride must be 8 or 16, got {output_stride}")
    build = getattr(tv_resnet, name)
    if TV_BACKBONES[name] == 2048:
        return build(weights=None, replace_stride_with_dilation=list(_DILATE[output_stride]))
    net = build(weights=None)
    dilation = 1
    for layer_name, dilate in zip(("layer2", "layer3", "layer4"), _DILATE[output_stride]):
        if dilate:
            previous, dilation = dilation, dilation * 2
            _dilate_basic_blocks(getattr(net, layer_name), dilation, previous)
    return net


def imagenet_weights_file(backbone, path=None):
    """The torchvision ImageNet file of ``backbone``: ``path`` if given, else the first of
    its names found in torchvision's cache (``$TORCH_HOME/hub/checkpoints``). Never downloads."""
    if backbone not in _WEIGHT_FILES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(_WEIGHT_FILES)}")
    if path:
        if not os.path.isfile(path):
            raise RunError(f"ImageNet weights {path} not found: give the path of torchvision's "
                           f"{_WEIGHT_FILES[backbone][0]}")
        return path
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in _WEIGHT_FILES[backbone]:
        candidate = os.path.join(cache, name)
        if os.path.isfile(candidate):
            return candidate
    raise RunError(f"no ImageNet weights for {backbone} in {cache}: put torchvision's "
                   f"{_WEIGHT_FILES[backbone][0]} there (or give its path), or start from "
                   f"random weights")


class ResNetBody(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``; returns ``layer4``'s map, of
    ``out_channels`` channels."""

    STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, net):
        super().__init__()
        for name in self.STAGES:
            self.add_module(name, getattr(net, name))
        self.out_channels = net.fc.in_features

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


def set_bn_momentum(module, momentum):
    """Every BatchNorm of ``module`` gets ``momentum``."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = momentum
