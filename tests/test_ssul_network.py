"""SSUL's network (modules.tv_deeplab) and its step-to-step handling.

The ``weight_transfer``, ``freeze`` and ``e2e`` sections of tests/data/ssul_cases.json were
produced by SSUL's own code (clovaai/SSUL e08ee9c): the weight-transfer block of its
``main.py`` on heads of 3 channels, its parameter-group block on its DeepLabV3 with a tiny
backbone, and ``main.main`` itself over VOC 15-1 steps 0-2 with ResNet-101 (see the file's
``_meta``). They are reproduced here through the network module and ``methods.ssul``.
ResNet-101 is built on the meta device where only its structure matters; forwards use small
backbones with random weights (no ImageNet file is ever downloaded).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from methods.ssul.labels import class_layout
from methods.ssul.loss import SSULBCELoss
from methods.ssul.memory import balanced_round_robin, update_memory_record
from methods.ssul.optim import FlooredPolyLR, named_param_groups, param_groups
from modules.tv_deeplab import (
    NetworkStateError,
    StepHeads,
    assemble_tv_deeplab,
    freeze_for_step,
    imagenet_weights_file,
    load_previous_step,
    make_tv_deeplab,
)
from utils.errors import UserError

CASES = json.loads((Path(__file__).parent / "data" / "ssul_cases.json").read_text())
RTOL, ATOL = 1e-5, 1e-6
VOC_15_1 = next(c for c in CASES["class_counts"] if c["task"] == "15-1" and c["unknown"])
TABLE_15_1 = [s["classes"] for s in VOC_15_1["steps"]]


def f32(v):
    return torch.tensor(v, dtype=torch.float32)


def close(got, want):
    torch.testing.assert_close(torch.as_tensor(got).double(),
                               torch.as_tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- weight transfer
class HeadsOnly(nn.Module):
    """A network whose state dict is ``classifier.head.<k>.*``, as in SSUL's vectors."""

    def __init__(self, num_classes, channels):
        super().__init__()
        self.classifier = nn.Module()
        self.classifier.head = StepHeads(num_classes, channels)


def as_state(entries):
    return {k: torch.tensor(v, dtype=torch.long if k.endswith("num_batches_tracked")
                            else torch.float32) for k, v in entries.items()}


@pytest.mark.parametrize("case", CASES["weight_transfer"],
                         ids=[c["name"] for c in CASES["weight_transfer"]])
def test_weight_transfer(case):
    features = f32(case["features"])
    model = HeadsOnly(case["num_classes"], features.shape[1])
    model.load_state_dict(as_state(case["new_model_init"]), strict=True)
    load_previous_step(model, as_state(case["checkpoint"]), unknown=case["unknown"],
                       w_transfer=case["w_transfer"])
    state = model.state_dict()
    assert sorted(state) == sorted(case["expected_state"])
    for key, want in case["expected_state"].items():
        close(state[key], want)
    model.eval()
    with torch.no_grad():
        logits = model.classifier.head(features)
    close(logits, case["expected_logits_eval"])
    if case["unknown"] and case["w_transfer"]:
        n_new = case["num_classes"][-1]
        close(logits[:, -n_new:], logits[:, :1].expand(-1, n_new, -1, -1))


def test_previous_step_that_does_not_fit_is_one_clear_error():
    model = HeadsOnly([1, 1, 2, 1], 3)
    other = HeadsOnly([1, 1, 3], 3).state_dict()
    with pytest.raises(NetworkStateError, match="does not fit") as err:
        load_previous_step(model, other, unknown=True, w_transfer=True)
    assert isinstance(err.value, UserError)
    previous = HeadsOnly([1, 1, 2], 3)
    prefixed = {f"module.{k}": v for k, v in previous.state_dict().items()}
    load_previous_step(model, prefixed, unknown=True, w_transfer=True)
    # SSUL's own checkpoint file: {"model_state", "optimizer_state", "best_score"}
    with torch.no_grad():
        previous.classifier.head[0][0].weight.fill_(0.5)
    checkpoint = {"model_state": previous.state_dict(), "optimizer_state": {}, "best_score": -1}
    load_previous_step(model, checkpoint, unknown=True, w_transfer=True)
    assert bool((model.classifier.head[3][0].weight == 0.5).all())


# ------------------------------------------------------------------- freezing, groups
class TinyBody(nn.Module):
    """The stand-in body of SSUL's freeze vectors: conv1, bn1, layer4."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer4 = nn.Conv2d(4, 8, 1, bias=False)

    def forward(self, x):
        return self.layer4(torch.relu(self.bn1(self.conv1(x))))


def bn_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("case", CASES["freeze"], ids=[c["name"] for c in CASES["freeze"]])
def test_freeze_and_groups(case):
    torch.manual_seed(0)
    step = case["curr_step"]
    model = assemble_tv_deeplab(TinyBody(), 8, case["num_classes"], head_channels=16)
    assert [n for n, _ in model.named_parameters()] == case["all_params"]
    freeze_for_step(model, step, freeze=case["freeze"], unknown=case["unknown"])
    model.bn_freeze = step > 0 and case["bn_freeze_opt"]
    groups = named_param_groups(model, step, freeze=case["freeze"], unknown=case["unknown"],
                                lr=case["lr_opt"])
    assert [[n for n, _ in g] for _, g in groups] == [g["params"] for g in case["groups"]]
    close([lr for lr, _ in groups], [g["lr"] for g in case["groups"]])
    sgd = param_groups(model, step, freeze=case["freeze"], unknown=case["unknown"],
                       lr=case["lr_opt"])
    assert [(g["weight_decay"], g["momentum"], g["nesterov"]) for g in sgd] == \
        [(g["weight_decay"], g["momentum"], g["nesterov"]) for g in case["groups"]]
    torch.optim.SGD(sgd, lr=case["lr_opt"])   # the groups are valid SGD groups

    model.train()
    bns = bn_modules(model)
    assert sorted(n for n, m in bns.items() if m.training) == case["bn_training_after_train"]
    assert {n: m.momentum for n, m in bns.items()} == case["bn_momentum"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == \
        case["requires_grad_after_train"]
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    logits = model(torch.randn(2, 3, 8, 8))
    SSULBCELoss()(logits, torch.randint(0, logits.shape[1], (2, 8, 8))).backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == \
        case["with_grad_after_backward"]
    assert sorted(n for n, m in bns.items() if not torch.equal(m.running_mean, before[n])) == \
        case["bn_stats_changed_by_forward"]
    assert model.classifier.aspp.project[3].training and model.classifier.aspp.project[3].p == 0.1


def test_scale_by_lr_and_background_factor_fixes():
    model = assemble_tv_deeplab(TinyBody(), 8, [1, 1, 2, 1], head_channels=16)
    assert [lr for lr, _ in named_param_groups(model, 0, freeze=True, unknown=True, lr=0.05,
                                               scale_by_lr=True)] == pytest.approx([0.005, 0.05])
    assert [lr for lr, _ in named_param_groups(model, 1, freeze=True, unknown=True, lr=0.05,
                                               background_lr_factor=1.0)] == [0.05] * 3


# ------------------------------------------------------------- end to end (ResNet-101)
E2E = CASES["e2e"]


def resnet101_structure(num_classes):
    with torch.device("meta"):
        return make_tv_deeplab(num_classes, "resnet101")


@pytest.mark.parametrize("record", E2E["steps"], ids=[f"step{s['step']}" for s in E2E["steps"]])
def test_e2e_network_groups_and_schedule(record):
    step = record["step"]
    layout = class_layout(TABLE_15_1, step, True)
    assert layout.num_classes == record["num_classes"]
    model = resnet101_structure(layout.num_classes)
    assert len(model.state_dict()) == record["saves"][0]["n_tensors"]
    assert not any(k.startswith("module.") for k in model.state_dict())
    bns = bn_modules(model)
    assert len(bns) == record["bn_modules"]
    freeze_for_step(model, step, freeze=True, unknown=True)
    model.bn_freeze = step > 0
    model.train()
    groups = named_param_groups(model, step, freeze=True, unknown=True, lr=0.01)
    close([lr for lr, _ in groups], [g["lr"] for g in record["groups"]])
    assert [len(g) for _, g in groups] == [g["n_params"] for g in record["groups"]]
    for (_, got), want in zip(groups, record["groups"]):
        if want["params"] is not None:
            assert [n for n, _ in got] == want["params"]
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if step == 0:
        assert len(trained) == record["with_grad_first_step"]["count"]
        assert sum(m.training for m in bns.values()) == record["bn_training_modules"]
    else:
        assert trained == record["with_grad_first_step"]
        assert sum(m.training for m in bns.values()) == record["bn_training_modules"] == 0
    params = [nn.Parameter(torch.zeros(1)) for _ in groups]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, (lr, _) in zip(params, groups)],
                                lr=0.01)
    scheduler = FlooredPolyLR(optimizer, len(record["lr_used"]))
    used = []
    for _ in record["lr_used"]:
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    close(used, record["lr_used"])


@pytest.mark.parametrize("record", E2E["steps"][1:], ids=["step1", "step2"])
def test_e2e_memory(record):
    step = record["step"]
    pool, order = record["memory_pool_and_class_order"]
    assert order == list(range(1, class_layout(TABLE_15_1, step - 1, True).metric_classes))
    assert record["np_generator_fresh_at_memory_selection"]   # seeded at the step's start
    np.random.seed(1)
    chosen = balanced_round_robin(pool, order, 2, np.random)
    want = record["memory_json"]
    assert chosen.chosen == want[f"step_{step}"]["memory_candidates"]
    assert all(254 in c[3] for c in chosen.chosen)   # S8: the ignored pixels of the crop
    previous = E2E["steps"][step - 1]["memory_json"]
    kept_before = len(previous[f"step_{step - 1}"]["memory_candidates"]) if previous else 0
    assert update_memory_record(previous, step, pool[kept_before:], chosen.chosen) == want


def test_e2e_transfer_facts_on_a_small_body():
    """The facts the end-to-end run recorded for the new head (ResNet-18 here)."""
    facts = E2E["steps"][1]["iters"][0]["transfer"]
    torch.manual_seed(1)
    old = make_tv_deeplab([1, 1, 15], "resnet18", head_channels=16)
    old.eval()
    old(torch.randn(2, 3, 24, 24))
    with torch.no_grad():   # statistics a trained step would have
        for m in old.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(7)
    new = make_tv_deeplab([1, 1, 15, 1], "resnet18", head_channels=16)
    load_previous_step(new, old.state_dict(), unknown=True, w_transfer=True)
    heads, old_heads = new.classifier.head, old.classifier.head
    assert torch.equal(heads[3][0].weight, old_heads[0][0].weight) == \
        facts["conv3x3_equals_prev_unknown"]
    assert all(torch.equal(getattr(heads[3][1], n), getattr(old_heads[0][1], n))
               for n in ("weight", "bias", "running_mean", "running_var")) == \
        facts["bn_equals_prev_unknown"]
    assert int(heads[3][1].num_batches_tracked) == facts["num_batches_tracked_new_head"]
    assert torch.equal(heads[3][3].bias, old_heads[0][3].bias) == \
        facts["bias_equals_prev_unknown_bias"]
    assert all(torch.equal(heads[k].state_dict()[n], old_heads[k].state_dict()[n])
               for k in range(3) for n in old_heads[k].state_dict()) == \
        facts["old_heads_equal_prev"]
    new.eval()
    with torch.no_grad():
        logits = new(torch.randn(2, 3, 24, 24))
    assert ((logits[:, -1] - logits[:, 0]).abs().max() < 1e-3) == \
        (facts["new_logits_minus_unknown_logit_max_abs"] < 1e-3)


# ----------------------------------------------------------------- network structure
@pytest.mark.parametrize("backbone,stride,size", [("resnet18", 16, (33, 40)),
                                                  ("resnet18", 8, (20, 20)),
                                                  ("resnet50", 16, (20, 20))])
def test_network_forward_shapes(backbone, stride, size):
    torch.manual_seed(0)
    model = make_tv_deeplab([1, 1, 3, 2], backbone, output_stride=stride, head_channels=16)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        features = model.backbone(torch.randn(1, 3, *size))
    assert out.shape == (1, 7, *size)
    assert features.shape[-1] == -(-size[1] // stride)


def test_state_dict_keys_are_ssul_names():
    model = resnet101_structure([1, 1, 15])
    keys = list(model.state_dict())
    with torch.device("meta"):
        reference = torchvision.models.resnet101(weights=None).state_dict()
    body = [k[len("backbone."):] for k in keys if k.startswith("backbone.")]
    assert body == [k for k in reference if not k.startswith("fc.")]
    assert "classifier.aspp.convs.4.1.weight" in keys and "classifier.aspp.project.1.bias" in keys
    assert [k for k in keys if k.startswith("classifier.head.2.")] == [
        f"classifier.head.2.{k}" for k in ("0.weight", "1.weight", "1.bias", "1.running_mean",
                                           "1.running_var", "1.num_batches_tracked",
                                           "3.weight", "3.bias")]


def test_imagenet_weights_from_a_file_load_strictly(tmp_path, monkeypatch):
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)
    model = make_tv_deeplab([1, 1, 2], "resnet18", weights=str(path), head_channels=16)
    assert torch.equal(model.backbone.conv1.weight, net.conv1.weight)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no ImageNet weights for resnet18"):
        imagenet_weights_file("resnet18")
    path.rename(tmp_path / "checkpoints" / path.name)
    assert imagenet_weights_file("resnet18").endswith("checkpoints/resnet18-f37072fd.pth")
    with pytest.raises(RuntimeError):
        make_tv_deeplab([1, 1, 2], "resnet34", weights=str(tmp_path / "checkpoints" / path.name),
                        head_channels=16)
