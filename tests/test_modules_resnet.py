"""ResNet body: the In-Place ABN ImageNet models' key names and shapes, strides, dilations
and feature sizes at every depth and output stride."""
import math

import pytest
import torch

from modules import make_resnet, norm_act_factory

torch.set_num_threads(1)

NORM = ("weight", "bias", "running_mean", "running_var")


def _norm_keys(prefix, channels):
    return [(f"{prefix}.{n}", (channels,)) for n in NORM]


def _expected_bottleneck_keys(blocks_per_stage):
    """Key names and shapes of the In-Place ABN ImageNet ResNets (bottleneck), in order."""
    keys = [("mod1.conv1.weight", (64, 3, 7, 7))] + _norm_keys("mod1.bn1", 64)
    in_ch = 64
    for stage, (n_blocks, mid) in enumerate(zip(blocks_per_stage, (64, 128, 256, 512)), 2):
        out = 4 * mid
        for b in range(1, n_blocks + 1):
            p = f"mod{stage}.block{b}"
            keys += [(f"{p}.convs.conv1.weight", (mid, in_ch, 1, 1))]
            keys += _norm_keys(f"{p}.convs.bn1", mid)
            keys += [(f"{p}.convs.conv2.weight", (mid, mid, 3, 3))]
            keys += _norm_keys(f"{p}.convs.bn2", mid)
            keys += [(f"{p}.convs.conv3.weight", (out, mid, 1, 1))]
            keys += _norm_keys(f"{p}.convs.bn3", out)
            if b == 1:
                keys += [(f"{p}.proj_conv.weight", (out, in_ch, 1, 1))]
                keys += _norm_keys(f"{p}.proj_bn", out)
            in_ch = out
    return keys


def _keys_and_shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def test_resnet101_keys_and_shapes_are_the_inplace_abn_ones():
    body = make_resnet("resnet101", norm_act_factory("iabn_sync"), output_stride=16)
    expected = _expected_bottleneck_keys((3, 4, 23, 3))
    assert len(expected) == 520
    assert _keys_and_shapes(body) == expected
    assert sum(1 for _ in body.parameters()) == 312
    assert body.out_channels == 2048


@pytest.mark.parametrize("backbone, blocks", [("resnet50", (3, 4, 6, 3)),
                                              ("resnet152", (3, 8, 36, 3))])
def test_other_bottleneck_depths_follow_the_same_layout(backbone, blocks):
    body = make_resnet(backbone, norm_act_factory("abn"))
    assert _keys_and_shapes(body) == _expected_bottleneck_keys(blocks)
    if backbone == "resnet50":
        assert len(body.state_dict()) == 265


def test_basic_block_names_and_projection_only_where_shape_changes():
    body = make_resnet("resnet18", norm_act_factory("iabn"))
    keys = dict(_keys_and_shapes(body))
    assert keys["mod2.block1.convs.conv1.weight"] == (64, 64, 3, 3)
    assert keys["mod2.block1.convs.conv2.weight"] == (64, 64, 3, 3)
    assert "mod2.block1.convs.conv3.weight" not in keys
    assert "mod2.block1.proj_conv.weight" not in keys  # 64 -> 64, stride 1
    assert keys["mod3.block1.proj_conv.weight"] == (128, 64, 1, 1)
    assert keys["mod5.block2.convs.bn2.running_var"] == (512,)
    assert body.mod2.block1.convs.bn2.activation == "identity"
    assert body.mod2.block1.convs.bn1.activation == "leaky_relu"
    assert body.out_channels == 512
    assert sum(k.startswith("mod3.") for k in keys) == 2 * 10 + 5  # 2 blocks + projection


def test_last_norm_and_projection_norm_have_identity_activation():
    body = make_resnet("resnet50", norm_act_factory("iabn"))
    block = body.mod3.block1
    assert [block.convs.bn1.activation, block.convs.bn2.activation,
            block.convs.bn3.activation, block.proj_bn.activation] == \
        ["leaky_relu", "leaky_relu", "identity", "identity"]
    assert body.mod1.bn1.activation == "leaky_relu"
    assert isinstance(body.mod1.pool1, torch.nn.MaxPool2d)


@pytest.mark.parametrize("output_stride, dilations, first_strides",
                         [(16, (1, 1, 1, 2), (1, 2, 2, 1)), (8, (1, 1, 2, 4), (1, 2, 1, 1))])
def test_strides_and_dilations_per_stage(output_stride, dilations, first_strides):
    body = make_resnet("resnet50", norm_act_factory("iabn"), output_stride=output_stride)
    for stage, dilation, stride in zip((body.mod2, body.mod3, body.mod4, body.mod5),
                                       dilations, first_strides):
        for i, block in enumerate(stage):
            conv2 = block.convs.conv2
            assert conv2.dilation == (dilation, dilation) and conv2.padding == conv2.dilation
            assert conv2.stride == ((stride, stride) if i == 0 else (1, 1))
            assert block.convs.conv1.stride == (1, 1)
        assert stage.block1.proj_conv.stride == (stride, stride)


def _expected_size(size, output_stride):
    halvings = 4 if output_stride == 16 else 3  # conv1, pool1, mod3[, mod4]
    for _ in range(halvings):
        size = math.ceil(size / 2)
    return size


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101",
                                      "resnet152"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_feature_sizes(backbone, output_stride):
    torch.manual_seed(0)
    body = make_resnet(backbone, norm_act_factory("iabn"), output_stride=output_stride)
    x = torch.randn(2, 3, 33, 48)
    with torch.no_grad():
        y = body.eval()(x)
    assert y.shape == (2, body.out_channels, _expected_size(33, output_stride),
                       _expected_size(48, output_stride))
    assert body.out_channels == (512 if backbone in ("resnet18", "resnet34") else 2048)


def test_unknown_backbone_or_output_stride():
    with pytest.raises(ValueError, match="resnet50"):
        make_resnet("resnet51", norm_act_factory("iabn"))
    with pytest.raises(ValueError, match="output stride"):
        make_resnet("resnet50", norm_act_factory("iabn"), output_stride=32)


def test_train_forward_backward_in_double_and_channels_last():
    torch.manual_seed(0)
    body = make_resnet("resnet18", norm_act_factory("iabn_sync")).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = body(x)
    y.sum().backward()
    assert y.dtype == torch.float64
    assert all(p.grad is not None for p in body.parameters())
    body.eval()
    with torch.no_grad():
        ref = body(x)
        cl = body.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref)
