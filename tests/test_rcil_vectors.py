"""RCIL's numerical core against RCIL's own numbers.

Every expected value comes from tests/data/rcil_cases.json, which was produced by running
RCIL's own code (zhangchbin/RCIL at b9aad58, in float64 on the CPU, its norm layers being
In-Place ABN with a linear activation): its ResidualBlock / DeeplabV3 forwards with the branch
draws recorded from torch.rand, run.merge / run.convert_model, the two cube distillation
functions of its train.py with autograd, init_new_classifier and one Trainer.train iteration.
Here the same values are computed through this project's networks and functions
(methods/rcil/, modules/, utils/loss.py), not through a copy of the formulas."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from methods.rcil.branches import (
    BranchMixer,
    TwinDeeplabV3,
    TwinResidualBlock,
    add_twin_branches,
    linearise_norms,
)
from methods.rcil.cube import cube_channel, cube_spatial
from methods.rcil.fold import add_fold_biases, fold_conv_norm, fold_twin_branches
from methods.rcil.loss import domain_labels, init_new_classifier_weights, rcil_loss
from modules import DeeplabV3, ResidualBlock, norm_act_factory
from segmentation_module import make_model

CASES = json.loads((Path(__file__).parent / "data" / "rcil_cases.json").read_text())
RTOL, ATOL = 1e-9, 1e-12
GRTOL, GATOL = 1e-5, 1e-8
NORM = norm_act_factory("iabn_sync")   # RCIL's --norm_act iabn_sync, one process


def t(value, dtype=torch.float64):
    return torch.tensor(value, dtype=dtype)


def close(got, want, rtol=RTOL, atol=ATOL):
    want = want if torch.is_tensor(want) else t(want)
    torch.testing.assert_close(got.detach().double(), want.double(), rtol=rtol, atol=atol)


def load_norm(norm, p):
    with torch.no_grad():
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, k).copy_(t(p[k]))
    norm.eps = p["eps"]


def load_params(module, params, prefix=""):
    """Parameters of the JSON (tensors, or a dict per norm layer) into ``module``."""
    named = dict(module.named_modules())
    for key, value in params.items():
        if isinstance(value, dict):
            load_norm(named[prefix + key], value)
        else:
            owner, name = (prefix + key).rsplit(".", 1)
            with torch.no_grad():
                getattr(named[owner], name).copy_(t(value))


def twin_block(case, channels, stride=1, dilation=1):
    in_channels = case.get("in_channels") or len(case["x"][0])
    block = ResidualBlock(in_channels, channels, stride=stride, dilation=dilation,
                          norm_act=NORM).double()
    mixer = BranchMixer()
    twin = TwinResidualBlock.from_block(block, mixer)
    linearise_norms(twin)
    return twin, mixer


# ------------------------------------------------------------------------------ branch draws
@pytest.mark.parametrize("case", CASES["rng"]["cases"], ids=lambda c: f"seed{c['seed']}")
def test_mixer_draws_rcil_numbers(case):
    torch.manual_seed(case["seed"])
    mixer = BranchMixer()
    mixer.record = []
    mixer.weights(case["channels"], True, "cpu")
    assert torch.equal(mixer.record[0].flatten(), t(case["r"], torch.float32))


def _model(backbone):
    opts = SimpleNamespace(backbone=backbone, output_stride=16, norm_act="iabn_sync",
                           norm_impl="torch", no_pretrained=True, pretrained_dir="",
                           pooling=32, protocol="mib", fusion_mode="mean")
    return make_model(opts, classes=[2])


@pytest.mark.parametrize("backbone", ["resnet101", "resnet50"])
def test_draw_order_and_state_dict_of_a_whole_network(backbone):
    want = CASES["rng"]["draw_order"][backbone]
    with torch.device("meta"):   # shapes only: the draws stay on the CPU generator
        model = _model(backbone)
        mixer = add_twin_branches(model)
    mixer.record = []
    model.eval()
    with torch.no_grad():
        model(torch.empty(1, 3, 32, 32, device="meta"))
    assert [r.shape[1] for r in mixer.record] == want["sizes"]
    assert len(mixer.record) == want["calls"]
    assert sum(r.numel() for r in mixer.record) == want["per_forward"]
    assert all(r.shape == (1, r.shape[1], 1, 1) and r.dtype == torch.float32
               for r in mixer.record)
    body, head = model.body.state_dict(), model.head.state_dict()
    assert len(body) == want["body_state_dict_entries"]
    assert len(head) == want["head_state_dict_entries"]
    new_body = {k.split(".", 2)[2] for k in body if "_new" in k}
    assert new_body == set(want["body_new_keys"])
    assert {k for k in head if "_new" in k} == set(want["head_new_keys"])


# ------------------------------------------------------------------------------ block forward
@pytest.mark.parametrize("case", CASES["block_forward"], ids=lambda c: c["name"])
def test_block_forward(case):
    twin, mixer = twin_block(case, case["channels"], case["stride"], case["dilation"])
    load_params(twin, case["params"])
    twin.train(case["mode"] == "train")
    x = t(case["x"])
    e = case["expected"]
    mixer.record = []
    torch.manual_seed(case["seed"])
    out, b1, b2, mid = twin.forward_parts(x)
    assert len(mixer.record) == e["n_draws"]
    assert torch.equal(mixer.record[0].flatten(), t(e["r_drawn"], torch.float32))
    close(b1, e["branch1"])
    close(b2, e["branch2"])
    close(mid, e["mid"])
    close(out, e["out"])
    if case["last"]:
        torch.manual_seed(case["seed"])
        returned = twin(x, return_preact=True)
        assert len(returned) == 2 and returned[1] is returned[0]   # attention is the output
        assert e["att_is_out"]
        close(returned[0], e["out"])
        close(b1, e["returned_branch1"])


# ------------------------------------------------------------------------------ the fold
@pytest.mark.parametrize("case", CASES["merge"], ids=lambda c: c["name"])
def test_fold_conv_norm(case):
    bn = NORM(len(case["bn"]["weight"]), activation="identity").double()
    load_norm(bn, case["bn"])
    bias = None if case["conv_bias"] is None else t(case["conv_bias"])
    w, b = fold_conv_norm(t(case["conv_weight"]), bias, bn)
    close(w, case["expected"]["weight"])
    close(b, case["expected"]["bias"])


@pytest.mark.parametrize("case", CASES["convert_block"], ids=lambda c: c["name"])
def test_fold_block(case):
    p = case["params"]
    mid, inp = np.shape(p["convs.conv1.weight"])[:2]
    out_ch = np.shape(p["convs.conv3.weight"])[0]
    twin, mixer = twin_block({"in_channels": inp, "x": case["x"]}, [mid, mid, out_ch])
    net = nn.Module()
    net.blk = twin
    add_fold_biases(net)
    load_params(twin, p)
    x = t(case["x"])
    e = case["expected"]
    net.eval()
    out_before, b1, b2, mid_before = twin.forward_parts(x)
    close(b1, e["branch1_eval_before"])
    close(b2, e["branch2_eval_before"])
    close(mid_before, e["mid_eval_before"])
    close(out_before, e["out_eval_before"])
    close(out_before, e["out_eval_old_model"])     # the old network is the unfolded one

    net.train()
    fold_twin_branches(net)
    c = twin.convs
    close(c.conv2.weight, e["conv2.weight"])
    close(c.conv2.bias, e["conv2.bias"])
    for k in ("weight", "bias", "running_mean", "running_var"):
        close(getattr(c.bn2, k), e["bn2"][k])
    assert c.bn2.eps == e["bn2"]["eps"] == 0.0
    assert {k: v.requires_grad for k, v in net.named_parameters()} == e["requires_grad"]
    modules = dict(net.named_modules())
    assert {k: modules[k].training for k in e["training_after_convert"]} \
        == e["training_after_convert"]

    net.eval()
    out_after, merged, _, _ = twin.forward_parts(x)
    close(merged, e["merged_branch_eval"])
    close(merged, mid_before, rtol=1e-9, atol=1e-11)   # the folded branch = the old average
    close(out_after, e["out_eval_after"])
    moved = (out_after - out_before).abs().max().item()
    assert moved == pytest.approx(e["max_abs_out_after_minus_before"], rel=1e-9)  # RC7


def _head_case():
    h = CASES["convert_head"]
    rs = np.random.RandomState(h["recipe"]["seed"])
    state = {}
    for key, shape, kind in h["recipe"]["keys"]:
        value = (rs.uniform(0.5, 1.5, shape) if kind == "var"
                 else rs.standard_normal(shape) * h["recipe"]["scale"])
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float64))
    head = DeeplabV3(h["in_channels"], h["out_channels"], h["hidden_channels"],
                     out_stride=h["out_stride"], norm_act=NORM,
                     pooling_size=h["pooling_size"]).double()
    twin = TwinDeeplabV3.from_head(head, BranchMixer())
    linearise_norms(twin)
    add_fold_biases(twin)    # zero biases before the load, as at step > 0
    for i in range(4):
        state[f"map_convs.{i}.bias"] = torch.zeros(h["hidden_channels"], dtype=torch.float64)
    twin.load_state_dict(state, strict=True)
    return h, twin


def test_fold_head():
    h, head = _head_case()
    e = h["expected"]
    x = t(h["x"])
    head.eval()
    with torch.no_grad():
        before = head(x)
        a, a_new = head.aspp_branches(x)
    close(before, e["out_eval_before"])
    close(before, e["out_eval_old"])
    head.train()
    fold_twin_branches(head)
    for i, conv in enumerate(head.map_convs):
        close(conv.weight, e["map_convs.weight"][i], rtol=1e-11, atol=1e-13)
        close(conv.bias, e["map_convs.bias"][i])
    bn, want = head.map_bn, e["map_bn_after"]
    assert (bool(torch.all(bn.weight == 1)), bool(torch.all(bn.bias == 0)),
            bool(torch.all(bn.running_mean == 0)), bool(torch.all(bn.running_var == 1)),
            bn.eps, bn.training) == (want["weight_all_one"], want["bias_all_zero"],
                                     want["running_mean_all_zero"],
                                     want["running_var_all_one"], want["eps"], want["training"])
    assert {k: v.requires_grad for k, v in head.named_parameters()} == e["requires_grad"]
    head.eval()
    with torch.no_grad():
        merged, _ = head.aspp_branches(x)
        after = head(x)
    gap = (merged - (0.5 * a + 0.5 * a_new)).abs().max().item()
    assert gap < 1e-10 and e["max_abs_merged_minus_average"] < 1e-10
    close(after, e["out_eval_after"])


# ------------------------------------------------------------------------- cube distillation
D = CASES["distillation"]
FUNCTIONS = {"spatial": cube_spatial, "channel": cube_channel}


def _maps(inputs, grad=False):
    old = [t(m) for m in D["inputs"][inputs]["old"]]
    new = [t(m).requires_grad_(grad) for m in D["inputs"][inputs]["new"]]
    return old, new


@pytest.mark.parametrize("case", D["cases"], ids=lambda c: c["name"])
def test_cube_distillation(case):
    old, new = _maps(case["inputs"], grad=True)
    value = FUNCTIONS[case["function"]](
        old, new, index_new_class=case["index_new_class"],
        nb_current_classes=case["nb_current_classes"], nb_new_classes=case["nb_new_classes"],
        dataset=case["dataset"])
    close(value, case["expected"])
    if "expected_grad_new" in case:
        value.backward()
        for m, want in zip(new, case["expected_grad_new"]):
            if want is None:     # the channel term drops the logits
                assert m.grad is None or not m.grad.any()
            else:
                close(m.grad, want, GRTOL, GATOL)


@pytest.mark.parametrize("per_map", D["per_map"], ids=lambda c: c["function"])
def test_cube_distillation_per_map(per_map):
    old, new = _maps(per_map["inputs"])
    kwargs = dict(index_new_class=3, nb_current_classes=5, nb_new_classes=2,
                  dataset=per_map["dataset"])
    for i, want in enumerate(per_map["single_map_lists_expected"]):
        if per_map["function"] == "spatial":
            got = cube_spatial([old[i]], [new[i]], **kwargs)
        else:   # the map is followed by the logits, which the channel term drops
            got = cube_channel([old[i], old[-1]], [new[i], new[-1]], **kwargs)
        close(got, want)


# ------------------------------------------------------------------- classifier and the loss
def test_init_new_classifier_copies_weights_only():
    case = CASES["init_new_classifier"]
    model = nn.Module()
    model.cls = nn.ModuleList([nn.Conv2d(4, n, 1).double() for n in case["classes"]])
    load_params(model, case["before"])
    init_new_classifier_weights(model)
    for key, want in case["expected_after"].items():
        close(model.state_dict()[key], want)


@pytest.mark.parametrize("case", CASES["train_step"]["cases"], ids=lambda c: c["name"])
def test_training_iteration_loss(case):
    inputs = CASES["train_step"]["inputs"]
    data = inputs[case["inputs"]]
    e = case["expected"]
    z = t(data["outputs"]).requires_grad_(True)
    z_old = t(data["outputs_old"])
    labels = t(inputs["labels"], torch.int64)
    domain = case["dataset"] == "cityscapes_domain"
    if domain:
        labels = domain_labels(labels, z.shape[1])
    assert torch.equal(labels, t(e["labels_used"], torch.int64))
    maps = [t(m).requires_grad_(True) for m in data["attentions"] + [data["sem_logits_small"]]]
    maps_old = [t(m) for m in data["attentions_old"] + [data["sem_logits_small_old"]]]
    n_old = z_old.shape[1]
    loss = rcil_loss(z, z_old, labels, maps, maps_old, nb_old_classes=n_old,
                     dataset=case["dataset"], unce=not domain, unkd=not domain,
                     loss_kd=e["loss_kd"], nb_new_classes=e["nb_new_classes"])
    close(loss.main_per_pixel, e["main_per_pixel"])
    close(loss.main, e["main"])
    if e["kd_per_pixel_unweighted"] is not None:
        close(loss.kd_per_pixel, e["kd_per_pixel_unweighted"])
    close(loss.kd, e["kd_weighted"])
    close(loss.spatial, e["pod_spatial"])
    close(loss.channel, e["pod_channel"])
    close(loss.cube, e["pod"])
    close(loss.total, e["total"])
    close(torch.stack(loss.epoch_statistics()), e["epoch_loss_returned"])
    loss.total.backward()
    close(z.grad, e["grad_outputs"], GRTOL, GATOL)
    for m, want in zip(maps[:5], e["grad_attentions"]):
        close(m.grad, want, GRTOL, GATOL)
    close(maps[5].grad, e["grad_sem_logits_small"], GRTOL, GATOL)
