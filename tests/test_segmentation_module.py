"""IncrementalSegmentationModule, make_model, ImageNet weights and step checkpoints."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from argparser import build_options  # noqa: E402
from modules import make_resnet, norm_act_factory
from modules.norm import is_norm_layer
from segmentation_module import (
    CheckpointError,
    IncrementalSegmentationModule,
    PretrainedWeightsNotFound,
    add_module_prefix,
    load_model_state,
    load_trusted,
    make_model,
    model_state_for_checkpoint,
    strip_module_prefix,
)

torch.set_num_threads(1)


def _opts(**kw):
    base = dict(backbone="resnet18", output_stride=16, norm_act="iabn_sync", norm_impl="torch",
                no_pretrained=True, pretrained_dir="pretrained", pooling=32)
    base.update(kw)
    return build_options(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model(_opts(), [3, 2])


def test_structure_and_classifiers(model):
    assert [n for n, _ in model.named_children()] == ["body", "head", "cls"]
    assert [c.out_channels for c in model.cls] == [3, 2] and model.tot_classes == 5
    for c in model.cls:
        assert c.kernel_size == (1, 1) and c.in_channels == 256 and c.bias is not None
        bound = 1 / math.sqrt(256)  # PyTorch's default init
        assert c.weight.abs().max() <= bound and c.bias.abs().max() <= bound
    keys = list(model.state_dict())
    assert keys[-4:] == ["cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"]
    assert sum(k.startswith("head.") for k in keys) == 19


def test_forward_upsamples_concatenated_logits_to_the_input_size(model):
    model.eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        logits, extras = model(x)
        features = model.body(x)
        pre = model.head(features)
        small = torch.cat([model.cls[0](pre), model.cls[1](pre)], 1)
    assert extras == {}
    assert logits.shape == (2, 5, 37, 45)
    assert small.shape[2:] == (3, 3)
    torch.testing.assert_close(logits, F.interpolate(small, size=(37, 45), mode="bilinear",
                                                     align_corners=False))


@pytest.mark.parametrize("flag, wanted", [(False, False), (0.0, False), (True, True),
                                          (100.0, True), (0.5, True)])
def test_ret_intermediate_flag(model, flag, wanted):
    model.eval()
    with torch.no_grad():
        _, extras = model(torch.randn(2, 3, 32, 32), ret_intermediate=flag)
    if wanted:
        assert set(extras) == {"body", "pre_logits"}
        assert extras["body"].shape == (2, 512, 2, 2)
        assert extras["pre_logits"].shape == (2, 256, 2, 2)
        assert extras["body"].min() < 0  # post-activation leaky ReLU keeps small negatives
    else:
        assert extras == {}


def test_init_new_classifier_known_numbers():
    """docs/behaviour.md §6.10: w_bg = [0.3, -0.2, 0.1], b_bg = 0.7, one old class, N = 2."""
    net = IncrementalSegmentationModule(nn.Identity(), nn.Identity(), 3, [2, 2])
    with torch.no_grad():
        net.cls[0].weight.copy_(torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3]]).view(2, 3, 1, 1))
        net.cls[0].bias.copy_(torch.tensor([0.7, -0.2]))
    f = torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        before = net.cls[0](f).softmax(1).flatten()
    torch.testing.assert_close(before, torch.tensor([0.3775406688, 0.6224593312]))

    net.init_new_classifier(torch.device("cpu"))
    b_new = torch.tensor(-0.3986122887)
    torch.testing.assert_close(net.cls[1].bias, b_new.repeat(2))
    torch.testing.assert_close(net.cls[0].bias[0], b_new)  # the old background bias too
    torch.testing.assert_close(net.cls[0].bias[1], torch.tensor(-0.2))
    torch.testing.assert_close(net.cls[1].weight, torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
                               .expand(2, 3, 1, 1))
    with torch.no_grad():
        after = net(f)[0].softmax(1).flatten()
    torch.testing.assert_close(after[0] + after[2] + after[3], torch.tensor(0.3775406688))
    torch.testing.assert_close(after[1], torch.tensor(0.6224593312))
    assert net.cls[1].weight.requires_grad and net.cls[0].bias.requires_grad


def test_init_new_classifier_needs_a_new_step():
    with pytest.raises(ValueError, match="two steps"):
        IncrementalSegmentationModule(nn.Identity(), nn.Identity(), 3, [2]).init_new_classifier()


def test_fix_bn_freezes_norm_layers_until_train_is_called_again():
    torch.manual_seed(0)
    net = make_model(_opts(norm_act="abn"), [3])
    net.train()
    net.fix_bn()
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert len(norms) == 20 + 3  # resnet18 body + head
    assert all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad
               for m in norms)
    assert net.body.mod1.conv1.weight.requires_grad and net.cls[0].weight.requires_grad
    net.train()  # the original's quirk: training mode comes back, parameters stay frozen
    assert all(m.training and not m.weight.requires_grad for m in norms)


@pytest.mark.parametrize("norm_act", ["iabn_sync", "iabn", "abn", "std"])
def test_every_norm_variant_trains_and_runs_in_double(norm_act):
    torch.manual_seed(0)
    net = make_model(_opts(norm_act=norm_act), [2, 1]).double()
    logits, extras = net(torch.randn(2, 3, 32, 32, dtype=torch.float64), ret_intermediate=True)
    assert logits.dtype == torch.float64 and logits.shape == (2, 3, 32, 32)
    logits.logsumexp(1).mean().backward()
    assert net.body.mod1.conv1.weight.grad.abs().sum() > 0


def test_channels_last_and_bf16_autocast(model):
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)[0]
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)[0]
        model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(low).all()
    assert (low.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_make_model_needs_classes():
    with pytest.raises(ValueError, match="class counts"):
        make_model(_opts(), None)


# ------------------------------------------------------------------------------------------
# ImageNet weights

def _write_imagenet_file(path, backbone="resnet18", prefix=True, seed=1):
    """An In-Place ABN ImageNet checkpoint as released: dict with 'state_dict' (keys
    prefixed 'module.', classifier included) and training bookkeeping."""
    torch.manual_seed(seed)
    body = make_resnet(backbone, norm_act_factory("iabn_sync"))
    state = OrderedDict(body.state_dict())
    for k in state:
        if k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5
    state["classifier.fc.weight"] = torch.randn(1000, body.out_channels)
    state["classifier.fc.bias"] = torch.randn(1000)
    if prefix:
        state = add_module_prefix(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 90, "arch": backbone}, path)
    return state


@pytest.mark.parametrize("prefix", [True, False])
def test_imagenet_weights_load_strictly_from_the_original_file_name(workdir, prefix):
    saved = strip_module_prefix(
        _write_imagenet_file(workdir / "pretrained" / "resnet18_iabn_sync.pth.tar", prefix=prefix))
    net = make_model(_opts(no_pretrained=False), [3])
    body = net.body.state_dict()
    assert set(body) == set(saved) - {"classifier.fc.weight", "classifier.fc.bias"}
    for k, v in body.items():
        assert torch.equal(v, saved[k]), k


def test_plop_protocol_cuts_seven_characters_off_every_imagenet_key(workdir):
    """--protocol plop (P20): the keys lose 7 characters whether or not they carry
    'module.', so only a prefixed file loads."""
    saved = _write_imagenet_file(workdir / "pretrained" / "resnet18_iabn_sync.pth.tar")
    net = make_model(_opts(no_pretrained=False, protocol="plop"), [3])
    assert torch.equal(net.body.mod1.conv1.weight, saved["module.mod1.conv1.weight"])
    _write_imagenet_file(workdir / "pretrained" / "resnet18_iabn_sync.pth.tar", prefix=False)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        make_model(_opts(no_pretrained=False, protocol="plop"), [3])


def test_imagenet_weights_from_another_folder_and_norm_name(tmp_path):
    _write_imagenet_file(tmp_path / "w" / "resnet18_abn.pth.tar")
    net = make_model(_opts(no_pretrained=False, norm_act="abn", pretrained_dir=str(tmp_path / "w")),
                     [3])
    assert net.body.mod2.block1.convs.bn1.running_var.min() >= 0.5


def test_missing_imagenet_weights_name_the_path_and_the_way_out(workdir):
    with pytest.raises(PretrainedWeightsNotFound) as err:
        make_model(_opts(no_pretrained=False), [3])
    message = str(err.value)
    assert "pretrained/resnet18_iabn_sync.pth.tar" in message
    assert "--no_pretrained" in message and "In-Place ABN" in message
    assert "\n" not in message


def test_imagenet_weights_of_another_backbone_are_refused(workdir):
    _write_imagenet_file(workdir / "pretrained" / "resnet18_iabn_sync.pth.tar",
                         backbone="resnet34")
    with pytest.raises(CheckpointError, match="does not fit"):
        make_model(_opts(no_pretrained=False), [3])


def test_unreadable_imagenet_file(workdir):
    (workdir / "pretrained").mkdir()
    (workdir / "pretrained" / "resnet18_iabn_sync.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="resnet18_iabn_sync.pth.tar"):
        make_model(_opts(no_pretrained=False), [3])


# ------------------------------------------------------------------------------------------
# step checkpoints

def test_checkpoint_state_is_prefixed_and_round_trips(model, tmp_path):
    state = model_state_for_checkpoint(model)
    assert all(k.startswith("module.") for k in state)
    assert "module.body.mod1.conv1.weight" in state and "module.cls.1.bias" in state
    assert not any(k.endswith("num_batches_tracked") for k in state)
    # the original's step checkpoint (§10.7), read back as a user-named file
    path = tmp_path / "15-5-voc_MiB_1.pth"
    torch.save({"epoch": 30, "model_state": state, "optimizer_state": {}, "scheduler_state": {},
                "best_score": 0.5, "trainer_state": {"regularizer": None}}, path)
    checkpoint = load_trusted(path)
    torch.manual_seed(123)
    fresh = make_model(_opts(), [3, 2])
    load_model_state(fresh, checkpoint["model_state"], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # unprefixed keys and stray num_batches_tracked entries load as well
    extra = dict(strip_module_prefix(state), **{"body.mod1.bn1.num_batches_tracked":
                                                torch.tensor(5)})
    load_model_state(fresh, extra, strict=True)


def test_previous_step_loads_non_strictly_and_reports_the_new_classifier(model):
    torch.manual_seed(0)
    previous = make_model(_opts(), [3])
    result = load_model_state(model, model_state_for_checkpoint(previous), strict=False)
    assert result.missing_keys == ["cls.1.weight", "cls.1.bias"]
    assert result.unexpected_keys == []
    assert torch.equal(model.cls[0].weight, previous.cls[0].weight)
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state(model, model_state_for_checkpoint(previous), strict=True)


def test_shape_mismatch_is_a_clear_error_even_when_not_strict(model):
    state = model_state_for_checkpoint(model)
    state["module.cls.0.weight"] = torch.zeros(4, 256, 1, 1)
    with pytest.raises(CheckpointError, match=r"cls\.0\.weight \[4, 256, 1, 1\] vs model "
                                              r"\[3, 256, 1, 1\]"):
        load_model_state(model, state, strict=False, source="checkpoint x.pth")


def test_load_trusted_names_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_trusted(tmp_path / "nope.pth")


def test_prefix_helpers():
    state = OrderedDict([("module.a", 1), ("b", 2), ("module.module.c", 3)])
    assert list(strip_module_prefix(state)) == ["a", "b", "module.c"]
    assert list(add_module_prefix(state)) == ["module.a", "module.b", "module.module.c"]
