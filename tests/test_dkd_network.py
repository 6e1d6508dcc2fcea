"""DKD's network on a real (random) torchvision ResNet: its layout and state-dict names, the
output stride, the positive/negative decomposition, the auxiliary classifier's detached input,
the freezing of BN and dropout after ``train()``, the new classifier's initialisation, one
training iteration end to end, and the fix switches of L_mbce. The rules are those of DKD's
code (docs/behaviour.md §19.3-19.6)."""
import pytest
import torch
import torch.nn as nn
import torchvision

from methods.dkd import DKDWeights, dkd_losses, dkd_training_loss, wbce_map
from modules.dkd_deeplab import (
    ResNetBody,
    apply_step_freezing,
    load_imagenet_body,
    make_dkd_deeplab,
)

BN = nn.modules.batchnorm._BatchNorm


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return make_dkd_deeplab([3, 2], backbone="resnet18")


def head_output(model, x):
    return model.aspp(model.backbone(x))


def test_state_dict_names(net):
    state = net.state_dict()
    aspp = [k[len("aspp."):] for k in state if k.startswith("aspp.")]
    assert len(aspp) == 42
    prefixes = sorted({k.rsplit(".", 1)[0] for k in aspp})
    assert prefixes == ["convs.0.0", "convs.0.1", "convs.1.0", "convs.1.1", "convs.2.0",
                        "convs.2.1", "convs.3.0", "convs.3.1", "convs.4.1", "convs.4.2",
                        "last_conv.0", "last_conv.1", "project.0", "project.1"]
    tv = [k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")]
    assert [k[len("backbone."):] for k in state if k.startswith("backbone.")] == tv
    assert [k for k in state if k.startswith("cls.")] == [
        f"cls.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert [c.out_channels for c in net.cls] == [1, 3, 2]


def test_resnet101_has_dkd_key_count():
    state = make_dkd_deeplab([15, 1], backbone="resnet101").state_dict()
    assert sum(k.startswith("backbone.") for k in state) == 624


def test_output_stride_16_matches_torchvision_dilation():
    """The last stage dilated as torchvision does it for bottleneck ResNets."""
    ours = ResNetBody("resnet50")
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])
    got = [(n, m.stride, m.dilation, m.padding) for n, m in ours.named_modules()
           if isinstance(m, nn.Conv2d)]
    want = [(n, m.stride, m.dilation, m.padding) for n, m in ref.named_modules()
            if isinstance(m, nn.Conv2d)]
    assert got == want


def test_forward_shapes_and_decomposition(net):
    net.eval()
    x = torch.randn(2, 3, 48, 32)
    logits, extras = net(x, ret_intermediate=True)
    assert logits.shape == (2, 6, 48, 32)
    f = head_output(net, x)
    assert f.shape == (2, 256, 3, 2) and bool((f >= 0).all())       # ReLU after last_conv
    pos, neg = extras["pos_reg"], extras["neg_reg"]
    assert pos.shape == neg.shape == (2, 5, 3, 2)
    assert bool((pos >= 0).all()) and bool((neg <= 0).all())
    bias = torch.cat([c.bias for c in net.cls[1:]])[None, :, None, None]
    small = net.forward_class_prediction(f)
    torch.testing.assert_close(small[:, 1:], pos + neg + bias)
    assert net(x)[1] == {}


def test_auxiliary_classifier_sees_detached_features(net):
    net.zero_grad(set_to_none=True)
    net.eval()
    f = head_output(net, torch.randn(2, 3, 32, 32))
    f.retain_grad()
    net.forward_class_prediction(f)[:, 0].sum().backward()
    assert net.cls[0].weight.grad.abs().sum() > 0
    assert not bool(f.grad.any())             # the other classifiers pass back zeros only
    assert net.cls[0].weight.abs().sum() > 0


def test_init_novel_classifier_copies_the_auxiliary_row(net):
    net.init_novel_classifier()
    new, aux = net.cls[-1], net.cls[0]
    assert torch.equal(new.weight, aux.weight.expand_as(new.weight))
    assert torch.equal(new.bias, aux.bias.expand_as(new.bias))
    assert not torch.equal(net.cls[1].weight[:1], aux.weight)      # old classifiers untouched


def test_bn_momentum_and_head_dropout():
    model = make_dkd_deeplab([2], backbone="resnet18")
    assert {m.momentum for m in model.backbone.modules() if isinstance(m, BN)} == {0.01}
    assert {m.momentum for m in model.aspp.modules() if isinstance(m, BN)} == {0.1}
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1]


@pytest.mark.parametrize("step,freeze_all_bn", [(0, False), (1, True), (1, False)])
def test_freezing_after_train(step, freeze_all_bn):
    torch.manual_seed(1)
    model = make_dkd_deeplab([2, 1], backbone="resnet18")
    model.train()
    apply_step_freezing(model, step, freeze_all_bn)
    bns = [m for m in model.modules() if isinstance(m, BN)]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert all(m.training is not freeze_all_bn for m in bns)
    assert all(m.training is (step == 0) for m in drops)
    assert all(p.requires_grad for p in model.parameters())         # D19: affine keeps grad
    before = [m.running_mean.clone() for m in bns]
    x = torch.randn(2, 3, 32, 32)
    out = model(x)[0]
    moved = any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert moved is not freeze_all_bn
    if freeze_all_bn and step > 0:                                    # deterministic
        assert torch.equal(out, model(x)[0])


def test_imagenet_body_loads_without_fc():
    source = torchvision.models.resnet18()
    body = ResNetBody("resnet18")
    result = load_imagenet_body(body, source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_bad_backbone_and_stride_are_refused():
    with pytest.raises(ValueError, match="unknown DKD backbone"):
        ResNetBody("vgg16")
    with pytest.raises(ValueError, match="output stride 16"):
        ResNetBody("resnet18", output_stride=8)


def test_identical_models_distil_nothing(net):
    """Old model = new model: sigmoid(z) = sigmoid(z°) on every distilled channel, so the
    three distillation terms alone give (float32-)zero gradients; an old classifier moved
    away from the old model's makes them flow."""
    net.train()
    apply_step_freezing(net, 1, True)
    old = make_dkd_deeplab([3], backbone="resnet18")
    old.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        for k in range(2):
            old.cls[k].weight.copy_(net.cls[k].weight)
            old.cls[k].bias.copy_(net.cls[k].bias)
    old.eval()
    weights = DKDWeights(mbce=0.0, ac=0.0)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 6, (2, 32, 32))

    def largest_gradient():
        net.zero_grad(set_to_none=True)
        result = dkd_training_loss(net, old, x, labels, 3, 2, weights)
        result.total.backward()
        assert result.total > 0
        assert all(p.grad is None for p in old.parameters())
        return max(float(p.grad.abs().max()) for p in net.parameters() if p.grad is not None)

    assert largest_gradient() < 1e-6
    with torch.no_grad():
        net.cls[1].weight.add_(0.1)
    assert largest_gradient() > 1e-3


def test_channel_count_is_checked():
    with pytest.raises(ValueError, match="1 \\+ 2 old \\+ 2 new"):
        dkd_losses(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 2, 2,
                   DKDWeights())


def test_mbce_fixes():
    """D8: 255 is a negative of every new channel unless ignored; D9: the float32 target
    rounds the loss of float64 logits unless the target takes their dtype."""
    torch.manual_seed(2)
    logit = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    label = torch.tensor([[[4, 255, 0], [5, 255, 4], [0, 0, 5]]])
    faithful = wbce_map(logit, label, 4)
    ignored = wbce_map(logit, label, 4, ignore_index=255)
    assert bool((faithful[:, :, label[0] == 255] > 0).all())
    assert bool((ignored[:, :, label[0] == 255] == 0).all())
    torch.testing.assert_close(ignored[:, :, label[0] != 255], faithful[:, :, label[0] != 255])
    assert faithful.dtype == torch.float32
    exact = wbce_map(logit, label, 4, target_dtype=None)
    assert exact.dtype == torch.float64
    target = (label[:, None] == torch.tensor([4, 5])[None, :, None, None]).double()
    formula = -(target * torch.log(torch.sigmoid(logit))
                + (1 - target) * torch.log(1 - torch.sigmoid(logit)))
    torch.testing.assert_close(exact, formula, rtol=1e-12, atol=1e-12)
    assert not torch.equal(faithful.double(), exact)
