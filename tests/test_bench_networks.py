"""The benchmark's yardstick and its FLOP count: the plain-PyTorch DeepLab-v3
(bench/plain_deeplab.py) is the same network as ours (parameters, FLOPs, output, dilations),
and a training iteration's FLOPs grow with batch and pixels as they should."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_model  # noqa: E402
from argparser import build_options  # noqa: E402
from plain_deeplab import PlainDeepLabV3  # noqa: E402
from segmentation_module import make_model  # noqa: E402


def ours(backbone, output_stride, classes=21):
    opts = build_options(backbone=backbone, output_stride=output_stride, norm_act="iabn_sync",
                         norm_impl="torch", no_pretrained=True)
    return make_model(opts, [classes])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def convs(model):
    """(in, out, kernel, stride, dilation, padding) of every conv, in module order."""
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation, m.padding)
            for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("backbone,output_stride", [("resnet18", 16), ("resnet50", 8),
                                                    ("resnet101", 16)])
def test_plain_build_has_our_parameters_and_flops(backbone, output_stride):
    with torch.device("meta"):
        a, b = ours(backbone, output_stride), PlainDeepLabV3(backbone, output_stride, 21)
    assert n_params(a) == n_params(b)
    fa = bench_model.iteration_flops("ours", backbone, output_stride, 21, 64, 2)
    fb = bench_model.iteration_flops("plain", backbone, output_stride, 21, 64, 2)
    assert fa == fb > 0


@pytest.mark.parametrize("output_stride", [8, 16])
def test_plain_body_convolutions_match_ours_one_by_one(output_stride):
    with torch.device("meta"):
        a, b = ours("resnet50", output_stride).body, PlainDeepLabV3("resnet50", output_stride).body
    # same multiset of conv shapes, strides, dilations and paddings (module order differs:
    # ours builds the shortcut after the block's convolutions, torchvision before)
    assert sorted(convs(a)) == sorted(convs(b))
    dilated = [c for c in convs(b) if c[4] != (1, 1)]
    assert dilated and all(c[3] == (1, 1) for c in dilated)  # dilated stages keep resolution


def test_plain_build_runs_and_gives_logits_at_input_size():
    torch.manual_seed(0)
    model = PlainDeepLabV3("resnet18", 16, 5).train()
    x = torch.randn(2, 3, 40, 56)
    out = model(x)
    assert out.shape == (2, 5, 40, 56)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())  # leaky-ReLU everywhere


def test_iteration_flops_scale_with_batch_and_pixels():
    f = bench_model.iteration_flops("ours", "resnet18", 16, 21, 64, 2)
    assert bench_model.iteration_flops("ours", "resnet18", 16, 21, 64, 4) == 2 * f
    # four times the pixels: convolutions cost four times as much (pooling branch aside)
    assert bench_model.iteration_flops("ours", "resnet18", 16, 21, 128, 2) == \
        pytest.approx(4 * f, rel=0.01)
