"""RCIL's network change and fold on a whole (tiny) network: ResNet-18 at 32 px, float64, CPU.

The behaviour tested is RCIL's (docs/behaviour.md, "RCIL"): the mixing rule's draws, the eval
average, the norm-layer quirks RC1/RC2, the fold and what it freezes, the network after a
fold (RC7, and its fix), the state dict a folded network carries (RC8, and its fix), the
single-branch export (fix of RC10). The per-layer numbers themselves are checked against
RCIL's own values in tests/test_rcil_vectors.py."""
import copy
from types import SimpleNamespace

import pytest
import torch

from methods.rcil.branches import (
    BranchMixer,
    TwinDeeplabV3,
    TwinResidualBlock,
    add_twin_branches,
    linearise_norms,
    twin_layers,
)
from methods.rcil.cube import CubeDistillationError, cube_spatial
from methods.rcil.fold import (
    add_fold_biases,
    collapse_for_inference,
    fold_twin_branches,
    refreeze_folded,
    restore_folded_eps,
)
from modules import DeeplabV3, ResidualBlock, is_norm_layer, norm_act_factory
from segmentation_module import make_model

SIZES_R18 = [64, 64, 128, 128, 256, 256, 512, 512, 1024]


def plain_model(norm_act="iabn_sync", seed=0, double=True):
    torch.manual_seed(seed)
    opts = SimpleNamespace(backbone="resnet18", output_stride=16, norm_act=norm_act,
                           norm_impl="torch", no_pretrained=True, pretrained_dir="",
                           pooling=32, protocol="mib", fusion_mode="mean")
    model = make_model(opts, classes=[3, 2])
    return model.double() if double else model


def randomise_norms(model, seed=1):
    """Norm statistics and affine values away from 1/0, so that a fold has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_norm_layer(m):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)


def rcil_model(seed=0, **kwargs):
    model = plain_model(seed=seed)
    mixer = add_twin_branches(model, **kwargs)
    randomise_norms(model)
    with torch.no_grad():   # a twin that differs from its main branch, as after training
        for layer in twin_layers(model):
            convs = ([layer.branches[1][0]] if isinstance(layer, TwinResidualBlock)
                     else list(layer.map_convs_new))
            for conv in convs:
                conv.weight.mul_(1.5)
    return model, mixer


@pytest.fixture(scope="module")
def built():
    return rcil_model()


@pytest.fixture
def twin(built):
    """(a copy of the module's RCIL network, its mixer): built once, it is the slow part."""
    model = copy.deepcopy(built[0])
    return model, twin_layers(model)[0].mixer


def image(seed=2, batch=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def eval_logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


def test_the_plain_network_is_left_unchanged():
    model = plain_model(double=False)
    blocks = [b for b in model.body.modules() if isinstance(b, ResidualBlock)]
    assert blocks and all(type(b) is ResidualBlock for b in blocks)
    assert type(model.head) is DeeplabV3
    assert not any("_new" in k for k in model.state_dict())
    assert model.body.mod1.bn1.activation == "leaky_relu"


def test_transform_keeps_every_body_value_and_adds_the_twin_keys():
    model = plain_model(double=False)
    before = {k: v.clone() for k, v in model.body.state_dict().items()}
    add_twin_branches(model)
    after = model.body.state_dict()
    added = set(after) - set(before)
    assert set(before) <= set(after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # basic blocks: the twin sits beside the strided 3x3 conv1
    assert {k.split(".", 3)[3] for k in added} == {
        "conv1_new.weight", "bn1_new.weight", "bn1_new.bias", "bn1_new.running_mean",
        "bn1_new.running_var"}
    assert len(added) == 5 * 8
    block = model.body.mod3.block1
    assert torch.equal(block.convs.conv1_new.weight, block.convs.conv1.weight)  # a copy
    head = model.head
    assert isinstance(head, TwinDeeplabV3)
    assert not torch.equal(head.map_convs_new[1].weight, head.map_convs[1].weight)
    with pytest.raises(ValueError, match="already"):
        add_twin_branches(model)


def test_norm_layers_linear_and_the_stem_quirk():
    model, fixed, iabn, iabn_fixed = (plain_model(n, double=False)
                                      for n in ("iabn_sync", "iabn_sync", "iabn", "iabn"))
    add_twin_branches(model)
    acts = {m.activation for m in model.modules() if is_norm_layer(m)}
    assert acts == {"identity"}                       # RC1: every iabn_sync layer linear
    add_twin_branches(fixed, stem_activation=True)     # fix of RC1
    assert fixed.body.mod1.bn1.activation == "leaky_relu"
    assert fixed.body.mod2.block1.convs.bn1.activation == "identity"
    add_twin_branches(iabn)                            # RC2: iabn keeps its slope 0.01
    assert iabn.body.mod2.block1.convs.bn1.activation == "leaky_relu"
    add_twin_branches(iabn_fixed, linear_norms=True)
    assert iabn_fixed.body.mod2.block1.convs.bn1.activation == "identity"


def test_training_draws_mix_the_branches_and_train_both(twin):
    model, mixer = twin
    model.float()      # float32: training needs no float64 precision here, and is faster
    mixer.record = []
    model.train()
    torch.manual_seed(5)
    logits, _ = model(image(batch=2).float())
    assert [r.shape[1] for r in mixer.record] == SIZES_R18
    logits.square().mean().backward()
    block = model.body.mod4.block2
    assert block.convs.conv1.weight.grad.abs().sum() > 0
    assert block.convs.conv1_new.weight.grad.abs().sum() > 0
    # same seed, same draws, same output; another seed, other draws
    first, mixer.record = mixer.record, []
    torch.manual_seed(5)
    logits2, _ = model(image(batch=2).float())
    assert all(torch.equal(a, b) for a, b in zip(first, mixer.record))
    torch.testing.assert_close(logits2, logits.detach(), rtol=0, atol=0)
    torch.manual_seed(6)
    assert not torch.equal(model(image(batch=2).float())[0], logits2)


def test_eval_draws_then_averages(twin):
    model, mixer = twin
    block = model.body.mod3.block2
    x = torch.randn(1, 128, 4, 4, dtype=torch.float64)
    block.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        _, b1, b2, mid = block.forward_parts(x)
    assert not torch.equal(torch.get_rng_state(), state)   # drawn all the same (RC4)
    torch.testing.assert_close(mid, 0.5 * b1 + 0.5 * b2)


def test_private_generator_leaves_the_global_stream_alone(twin):
    model, mixer = twin
    mixer.generator = torch.Generator().manual_seed(3)     # fix of RC4
    model.float()
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        model(image(batch=2).float())
    assert torch.equal(torch.get_rng_state(), state)


def _merged_equals_average(model, x):
    """Each twin layer's folded branch alone, against its two-branch average before."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args: inputs.__setitem__(mod, args[0].clone())) for layer in
        twin_layers(model)]
    eval_logits(model, x)
    for h in hooks:
        h.remove()
    averages = {}
    with torch.no_grad():
        for layer, inp in inputs.items():
            if isinstance(layer, TwinResidualBlock):
                averages[layer] = layer.forward_parts(inp)[3]
            else:
                a, a_new = layer.aspp_branches(inp)
                averages[layer] = 0.5 * a + 0.5 * a_new
    return inputs, averages


def test_fold_merged_branch_is_the_old_average_and_the_output_moves(twin):
    model, _ = twin
    x = image()
    before = eval_logits(model, x)
    inputs, averages = _merged_equals_average(model, x)
    fold_twin_branches(model)
    with torch.no_grad():
        for layer, inp in inputs.items():
            merged = (layer.forward_parts(inp)[1] if isinstance(layer, TwinResidualBlock)
                      else layer.aspp_branches(inp)[0])
            torch.testing.assert_close(merged, averages[layer], rtol=1e-9, atol=1e-11)
    after = eval_logits(model, x)
    assert (after - before).abs().max() > 1e-3      # RC7: 1/4 old + 3/4 twin


def test_fold_with_reinit_twin_keeps_the_output(twin):
    model, _ = twin
    x = image()
    before = eval_logits(model, x)
    fold_twin_branches(model, reinit_twin=True)     # fix of RC7
    torch.testing.assert_close(eval_logits(model, x), before, rtol=1e-9, atol=1e-10)


def test_fold_freezes_the_main_branches_and_refreeze_after_train(twin):
    model, _ = twin
    fold_twin_branches(model)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    want = set()
    for stage in ("mod2", "mod3", "mod4", "mod5"):
        for b in ("block1", "block2"):
            pre = f"body.{stage}.{b}.convs."
            want |= {pre + "conv1.weight", pre + "conv1.bias", pre + "bn1.weight",
                     pre + "bn1.bias"}
    want |= {f"head.map_convs.{k}.{p}" for k in range(4) for p in ("weight", "bias")}
    want |= {"head.map_bn.weight", "head.map_bn.bias"}
    assert frozen == want
    model.train()
    assert model.body.mod2.block1.convs.bn1.training      # train() undoes it (RC25) ...
    refreeze_folded(model)
    assert not model.body.mod2.block1.convs.bn1.training  # ... until refrozen
    assert model.body.mod2.block1.convs.bn1_new.training
    assert not model.head.map_bn.training and model.head.map_bn_new.training


def test_folded_state_dict_round_trip(twin):
    model, _ = twin
    fold_twin_branches(model)
    state = model.state_dict()
    assert "body.mod2.block1.convs.conv1.bias" in state and "head.map_convs.0.bias" in state
    x = image()
    want = eval_logits(model, x)

    rebuilt = plain_model(seed=9)
    add_twin_branches(rebuilt)
    reloaded = copy.deepcopy(rebuilt)
    fold_twin_branches(rebuilt)           # built and folded: the same keys, eps 0
    rebuilt.load_state_dict(state, strict=True)
    torch.testing.assert_close(eval_logits(rebuilt, x), want, rtol=0, atol=0)

    add_fold_biases(reloaded)             # RCIL's --test / old model: biases, strict load
    reloaded.load_state_dict(state, strict=True)
    moved = (eval_logits(reloaded, x) - want).abs().max()
    assert 0 < moved < 1e-3               # RC8: the identity norms got eps 1e-5 back
    restore_folded_eps(reloaded)          # fix of RC8
    torch.testing.assert_close(eval_logits(reloaded, x), want, rtol=1e-12, atol=1e-12)


def test_collapse_for_inference_runs_one_branch_with_the_same_output(twin):
    model, mixer = twin
    fold_twin_branches(model)             # a step-1 network: folded main + trained twin
    x = image()
    want = eval_logits(model, x)
    collapse_for_inference(model)         # fix of RC10
    mixer.record = []
    torch.testing.assert_close(eval_logits(model, x), want, rtol=1e-9, atol=1e-10)
    assert mixer.record == []             # no draw: the twins no longer run


def test_cube_distillation_rejects_an_unknown_dataset():
    maps = [torch.rand(1, 2, 4, 4)]
    with pytest.raises(CubeDistillationError, match="datasets voc"):
        cube_spatial(maps, maps, index_new_class=1, nb_current_classes=2, nb_new_classes=1,
                     dataset="coco")


def _small_twin_block(norm_act):
    torch.manual_seed(4)
    block = ResidualBlock(8, [4, 4, 8], norm_act=norm_act_factory(norm_act)).double()
    net = torch.nn.Module()
    net.blk = TwinResidualBlock.from_block(block, BranchMixer(), copy_twin=False)
    linearise_norms(net, linear_norms=True)
    randomise_norms(net)
    with torch.no_grad():
        net.blk.convs.bn2.weight[0] = -0.7     # a negative gamma: |gamma| + eps != gamma
    return net


def test_fold_of_abn_norms_needs_the_exact_scale():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    for exact, should_match in ((False, False), (True, True)):   # RC2 and its fix
        net = _small_twin_block("abn")
        net.eval()
        with torch.no_grad():
            average = net.blk.forward_parts(x)[3]
            fold_twin_branches(net, exact_scale=exact)
            merged = net.blk.forward_parts(x)[1]
        assert torch.allclose(merged, average, rtol=1e-9, atol=1e-11) is should_match


def test_head_fold_slices_by_256_unless_told_otherwise():
    torch.manual_seed(4)
    head = DeeplabV3(8, 4, hidden_channels=16, norm_act=norm_act_factory("iabn_sync"),
                     pooling_size=32).double()
    twin = TwinDeeplabV3.from_head(head, BranchMixer())
    linearise_norms(twin)
    randomise_norms(twin)
    with pytest.raises(ValueError, match="aspp_width=None"):   # RC9: 4 x 256 > 64 channels
        fold_twin_branches(twin)
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    twin.eval()
    with torch.no_grad():
        a, a_new = twin.aspp_branches(x)
        fold_twin_branches(twin, aspp_width=None)
        merged = twin.aspp_branches(x)[0]
    torch.testing.assert_close(merged, 0.5 * a + 0.5 * a_new, rtol=1e-9, atol=1e-11)
