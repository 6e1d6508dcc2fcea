"""ResNet body with the module tree (and so the state-dict keys) of the In-Place ABN
project's ImageNet models: ``mod1`` (conv1, bn1, pool1), then ``mod2``..``mod5`` made of
``block1``..``blockN``. No classifier: the output is the last stage's feature map."""
from collections import OrderedDict

import torch.nn as nn

from .residual import ResidualBlock

# blocks per stage (mod2..mod5) and whether the blocks are bottlenecks
RESNET_STRUCTURES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}

STAGE_WIDTHS = ((64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048))

# dilation of mod2..mod5 for each output stride
STAGE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


class ResNet(nn.Module):
    """``structure``: blocks in mod2..mod5; ``bottleneck``: 3-conv blocks (else 2-conv);
    ``norm_act(num_features, activation=...)`` builds each norm layer.

    The first block of a stage has stride 2 when the stage is not dilated (and is not mod2);
    dilated stages keep the resolution, so the output is input/``output_stride`` (rounded up
    at each stride-2 layer)."""

    def __init__(self, structure, bottleneck, norm_act, output_stride=16):
        super().__init__()
        if len(structure) != 4:
            raise ValueError(f"structure must give the blocks of 4 stages, got {structure}")
        if output_stride not in STAGE_DILATIONS:
            raise ValueError(f"output stride must be one of {sorted(STAGE_DILATIONS)}, "
                             f"got {output_stride}")
        self.structure = tuple(structure)
        self.bottleneck = bottleneck
        self.output_stride = output_stride

        self.mod1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
            ("bn1", norm_act(64)),
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))

        in_channels = 64
        for index, (num_blocks, dilation) in enumerate(zip(structure,
                                                           STAGE_DILATIONS[output_stride])):
            widths = STAGE_WIDTHS[index] if bottleneck else STAGE_WIDTHS[index][:2]
            first_stride = 2 if dilation == 1 and index > 0 else 1
            blocks = []
            for b in range(num_blocks):
                block = ResidualBlock(in_channels, widths, stride=first_stride if b == 0 else 1,
                                      dilation=dilation, norm_act=norm_act)
                blocks.append((f"block{b + 1}", block))
                in_channels = block.out_channels
            self.add_module(f"mod{index + 2}", nn.Sequential(OrderedDict(blocks)))
        self.out_channels = in_channels

    def forward(self, x, ret_attentions=False):
        """The last stage's feature map; with ``ret_attentions`` also the pre-activation sums
        of the last block of mod2..mod5 (the maps PLOP distils): ``(out, [a2, a3, a4, a5])``."""
        x = self.mod1(x)
        if not ret_attentions:
            x = self.mod2(x)
            x = self.mod3(x)
            x = self.mod4(x)
            return self.mod5(x)
        attentions = []
        for stage in (self.mod2, self.mod3, self.mod4, self.mod5):
            *blocks, last = stage
            for block in blocks:
                x = block(x)
            x, preact = last(x, return_preact=True)
            attentions.append(preact)
        return x, attentions


def make_resnet(backbone, norm_act, output_stride=16):
    """The body named by ``--backbone`` (resnet18/34/50/101/152)."""
    if backbone not in RESNET_STRUCTURES:
        raise ValueError(f"unknown backbone '{backbone}'; expected one of "
                         f"{', '.join(RESNET_STRUCTURES)}")
    structure, bottleneck = RESNET_STRUCTURES[backbone]
    return ResNet(structure, bottleneck, norm_act, output_stride=output_stride)
