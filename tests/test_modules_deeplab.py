"""DeepLab-v3 head: layout, atrous rates, the eval-time pooling and its padding, init."""
import math

import pytest
import torch
import torch.nn.functional as F

from modules import DeeplabV3, eval_pooling_padding, norm_act_factory

torch.set_num_threads(1)


def _head(in_channels=16, out_stride=16, pooling_size=32, hidden=8, norm_act="iabn"):
    torch.manual_seed(0)
    return DeeplabV3(in_channels, hidden, hidden, out_stride=out_stride,
                     norm_act=norm_act_factory(norm_act), pooling_size=pooling_size).double()


def test_key_layout_of_the_original_head():
    head = DeeplabV3(2048, 256, 256, norm_act=norm_act_factory("iabn_sync"), pooling_size=32)
    shapes = [(k, tuple(v.shape)) for k, v in head.state_dict().items()]
    norm = ("weight", "bias", "running_mean", "running_var")
    expected = [(f"map_convs.{i}.weight", (256, 2048, 1 if i == 0 else 3, 1 if i == 0 else 3))
                for i in range(4)]
    expected += [(f"map_bn.{n}", (1024,)) for n in norm]
    expected += [("global_pooling_conv.weight", (256, 2048, 1, 1))]
    expected += [(f"global_pooling_bn.{n}", (256,)) for n in norm]
    expected += [("red_conv.weight", (256, 1024, 1, 1)), ("pool_red_conv.weight", (256, 256, 1, 1))]
    expected += [(f"red_bn.{n}", (256,)) for n in norm]
    assert shapes == expected
    assert sum(1 for _ in head.parameters()) == 13


@pytest.mark.parametrize("out_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 32))])
def test_atrous_rates(out_stride, rates):
    head = _head(out_stride=out_stride)
    assert head.map_convs[0].kernel_size == (1, 1)
    for conv, rate in zip(head.map_convs[1:], rates):
        assert conv.kernel_size == (3, 3)
        assert conv.dilation == (rate, rate) and conv.padding == (rate, rate)


@pytest.mark.parametrize("k, expected", [(32, (15, 16)), (31, (15, 15)), (1, (0, 0)),
                                         (2, (0, 1)), (5, (2, 2)), (6, (2, 3))])
def test_eval_pooling_padding(k, expected):
    assert eval_pooling_padding(k, k) == expected + expected
    left_right = eval_pooling_padding(3, k)[:2]
    assert left_right == expected
    assert sum(expected) == k - 1  # back to the input size after a stride-1 pool


def test_eval_pooling_equals_global_pooling_up_to_the_pooling_size():
    head = _head(pooling_size=32)
    x = torch.randn(2, 16, 7, 32, dtype=torch.float64)
    head.eval()
    pooled = head._global_pooling(x)
    assert pooled.shape == x.shape
    torch.testing.assert_close(pooled, x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    # the whole head: a small map sees the same global branch in both modes' pooling
    head_global = _head(pooling_size=None).eval()
    head_global.load_state_dict(head.state_dict())
    torch.testing.assert_close(head(x), head_global(x))


def test_eval_pooling_is_a_sliding_mean_with_replicate_padding_on_larger_maps():
    head = _head(pooling_size=4).eval()
    x = torch.randn(1, 16, 9, 6, dtype=torch.float64)
    pooled = head._global_pooling(x)
    assert pooled.shape == x.shape
    # window 4x4 at output position (r, c) covers rows r-1..r+2 (replicated at the borders)
    r, c = 5, 2
    torch.testing.assert_close(pooled[0, :, r, c], x[0, :, r - 1:r + 3, c - 1:c + 3].mean((1, 2)))
    torch.testing.assert_close(pooled[0, :, 0, 0], x[0, :, 0:4, 0:4].mean((1, 2)))
    torch.testing.assert_close(pooled[0, :, 8, 5], x[0, :, 5:9, 2:6].mean((1, 2)))
    assert not torch.allclose(pooled[0, :, 0, 0], pooled[0, :, 8, 5])


def test_training_forward_uses_the_global_mean_tiled():
    head = _head(pooling_size=4).train()
    x = torch.randn(3, 16, 9, 6, dtype=torch.float64)
    assert head._global_pooling(x).shape == (3, 16, 1, 1)
    out = head(x)
    assert out.shape == (3, 8, 9, 6)
    # by hand: the branches, the pooled branch broadcast over space, then red_bn
    a = head.red_conv(head.map_bn(torch.cat([c(x) for c in head.map_convs], 1)))
    p = head.pool_red_conv(head.global_pooling_bn(head.global_pooling_conv(
        x.mean((2, 3), keepdim=True))))
    torch.testing.assert_close(out, head.red_bn(a + p))


def test_training_needs_more_than_one_pooled_sample_without_sync():
    head = _head().train()
    with pytest.raises(ValueError, match="more than 1 value"):
        head(torch.randn(1, 16, 4, 4, dtype=torch.float64))


def test_initialisation_xavier_normal_with_leaky_relu_gain():
    torch.manual_seed(0)
    head = DeeplabV3(2048, 256, 256, norm_act=norm_act_factory("iabn"), pooling_size=32)
    gain = math.sqrt(2 / (1 + 0.01 ** 2))
    for conv in [*head.map_convs, head.global_pooling_conv, head.red_conv, head.pool_red_conv]:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected_std = gain * math.sqrt(2 / (fan_in + fan_out))
        w = conv.weight.detach()
        assert abs(w.std().item() / expected_std - 1) < 0.03
        assert abs(w.mean().item()) < 0.05 * expected_std
    for bn in (head.map_bn, head.global_pooling_bn, head.red_bn):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_head_output_is_post_activation_and_bf16_autocast_runs():
    head = _head().float()
    x = torch.randn(2, 16, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head.train()(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 5, 5)
    ref = head(x)
    assert (ref < 0).any()
    neg = ref[ref < 0]
    # leaky-ReLU(0.01) output: negatives are small (pre-activation is normalised)
    assert neg.abs().max() < 0.1
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)
    assert F.mse_loss(out.float(), ref) < 1e-3
