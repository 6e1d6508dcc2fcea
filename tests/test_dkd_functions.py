"""DKD's numerical core reproduces the values of DKD's own code (tests/data/dkd_cases.json,
produced by running DKD at commit fb4693f of cvlab-yonsei/DKD; see its "about"): the loss
maps, the network's classifiers with their positive/negative decomposition, the new
classifier's initialisation, one full training iteration at step 0 and at step >= 1 (losses,
logs, gradients down to the features), the prediction rule and the scores, the label rules,
the memory candidates, the schedules and the parameter groups. Every value goes through the
project's functions and modules (methods/dkd, modules/dkd_deeplab.py); the test only feeds
them and compares."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from methods.dkd import (
    DKDEvaluator,
    DKDWeights,
    ac_map,
    candidate_records,
    dkd_param_groups,
    dkd_scheduler,
    dkd_training_loss,
    has_new_class,
    has_seen_class,
    kd_map,
    log_strings,
    mask_labels,
    only_seen_classes,
    param_group_layout,
    per_channel_mean,
    predict,
    published_config,
    wbce_map,
)
from modules.dkd_deeplab import DKDDeepLab, apply_step_freezing

CASES = json.loads((Path(__file__).parent / "data" / "dkd_cases.json").read_text())
TOL = CASES["about"]["tolerance"]


def tensor(value, dtype=torch.float64):
    return torch.tensor(value, dtype=dtype)


def close(got, want, mbce=False):
    """rtol/atol of the data file; values downstream of L_mbce carry float32 rounding (D9)."""
    rtol, atol = (TOL["mbce_rtol"], TOL["mbce_atol"]) if mbce else (TOL["rtol"], TOL["atol"])
    got = got.detach().double() if torch.is_tensor(got) else tensor(got)
    want = tensor(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


def names(cases):
    return [c["name"] for c in cases]


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("case", CASES["losses"]["wbce"], ids=names(CASES["losses"]["wbce"]))
def test_wbce_map_per_class_and_gradient(case):
    logit = tensor(case["logit"]).requires_grad_()
    loss = wbce_map(logit, tensor(case["label"], torch.long), case["n_old_classes_arg"],
                    pos_weight=case["pos_weight"])
    per_class = per_channel_mean(loss)
    per_class.sum().backward()
    close(loss, case["expected_map"], mbce=True)
    close(per_class, case["expected_per_class"], mbce=True)
    close(per_class.sum(), case["expected_sum"], mbce=True)
    close(logit.grad, case["expected_grad_sum"], mbce=True)


@pytest.mark.parametrize("case", CASES["losses"]["kd"], ids=names(CASES["losses"]["kd"]))
def test_kd_map_per_class_and_gradient(case):
    logit = tensor(case["logit"]).requires_grad_()
    loss = kd_map(logit, tensor(case["logit_old"]))
    per_channel_mean(loss).sum().backward()
    close(loss, case["expected_map"])
    close(per_channel_mean(loss), case["expected_per_class"])
    close(logit.grad, case["expected_grad_sum"])


@pytest.mark.parametrize("case", CASES["losses"]["ac"], ids=names(CASES["losses"]["ac"]))
def test_ac_map_mean_and_gradient(case):
    logit = tensor(case["logit"]).requires_grad_()
    loss = ac_map(logit)
    per_channel_mean(loss).sum().backward()
    close(loss, case["expected_map"])
    close(per_channel_mean(loss), case["expected_mean"])
    close(logit.grad, case["expected_grad"])


# ----------------------------------------------------------------------------- network
class FixedFeatures(nn.Module):
    """Stands for DKD's backbone + head as DKD's vectors did: returns the given features."""

    def __init__(self, feature):
        super().__init__()
        self.feature = feature

    def forward(self, x):
        return self.feature


def stub_network(feature, weights, biases):
    classes = [len(b) for b in biases[1:]]
    model = DKDDeepLab(FixedFeatures(feature), nn.Identity(), feature.shape[1], classes).double()
    with torch.no_grad():
        for conv, w, b in zip(model.cls, weights, biases):
            conv.weight.copy_(tensor(w)[:, :, None, None])
            conv.bias.copy_(tensor(b))
    return model


def images(feature, hw):
    return torch.zeros(feature.shape[0], 3, *hw, dtype=torch.float64)


DECOMPOSITION = CASES["network"]["decomposition"]


@pytest.mark.parametrize("case", DECOMPOSITION,
                         ids=[f"{c['image_hw'][0]}x{c['image_hw'][1]}" for c in DECOMPOSITION])
def test_network_logits_and_decomposition(case):
    f = tensor(case["feature"])
    model = stub_network(f, case["cls_weight"], case["cls_bias"])
    x = images(f, case["image_hw"])
    logits, extras = model(x, ret_intermediate=True)
    close(model.forward_class_prediction(f), case["expected_sem_logits_small"])
    close(extras["pos_reg"], case["expected_pos_reg"])
    close(extras["neg_reg"], case["expected_neg_reg"])
    close(logits, case["expected_sem_logits"])
    assert sorted(extras) == case["expected_extras_keys"]
    assert sorted(model(x)[1]) == case["expected_extras_keys_without_flag"]


INIT = CASES["network"]["init_novel_classifier"]


@pytest.mark.parametrize("case", INIT, ids=names(INIT))
def test_init_novel_classifier(case):
    f = torch.zeros(1, len(case["cls_weight_before"][0][0]), 1, 1, dtype=torch.float64)
    model = stub_network(f, case["cls_weight_before"], case["cls_bias_before"])
    model.init_novel_classifier()
    for conv, w, b in zip(model.cls, case["expected_cls_weight_after"],
                          case["expected_cls_bias_after"]):
        close(conv.weight[:, :, 0, 0], w)
        close(conv.bias, b)


# ----------------------------------------------------------------- one training iteration
def run_iteration(case, incremental):
    """DKD's iteration through dkd_training_loss, with the networks' outputs kept so that
    the gradients of every intermediate can be read."""
    hp = case["hyperparameter"]
    weights = DKDWeights(pos_weight=float(hp["pos_weight"]), mbce=hp["mbce"], kd=hp["kd"],
                         dkd_pos=hp["dkd_pos"], dkd_neg=hp["dkd_neg"], ac=hp["ac"])
    f = tensor(case["feature"]).requires_grad_()
    model = stub_network(f, case["cls_weight"], case["cls_bias"])
    model_old = None
    if incremental:
        model_old = stub_network(tensor(case["feature_old"]), case["cls_weight_old"],
                                 case["cls_bias_old"]).eval()
    n_new = case["classes"][-1]
    n_old = sum(case["classes"][:-1])
    result = dkd_training_loss(model, model_old, images(f, case["image_hw"]),
                               tensor(case["label"], torch.long), n_old, n_new, weights)
    result.outputs.retain_grad()
    for value in result.extras.values():
        value.retain_grad()
    result.total.backward()
    return result, f, model


TRAIN = [(kind, c) for kind in ("base", "incremental") for c in CASES["train_step"][kind]]


@pytest.mark.parametrize("kind,case", TRAIN, ids=[f"{k}-{c['name']}" for k, c in TRAIN])
def test_training_iteration(kind, case):
    incremental = kind == "incremental"
    result, f, model = run_iteration(case, incremental)
    want = case["expected"]
    close(result.outputs, want["logit"])
    close(result.per_channel["loss_mbce"], want["loss_mbce"], mbce=True)
    close(result.per_channel["loss_ac"], want["loss_ac"])
    close(result.total, want["loss"], mbce=True)
    if incremental:
        close(result.outputs_old, want["logit_old"])
        for key in ("pos_reg", "neg_reg"):
            close(result.extras[key], want[key])
            close(result.extras_old[key], want[f"{key}_old"])
            close(result.extras[key].grad, want[f"grad_{key}"])
        close(result.per_channel["loss_kd"], want["loss_kd"])
        close(result.per_channel["loss_dkd_pos"], want["loss_dkd_pos"])
        close(result.per_channel["loss_dkd_neg"], want["loss_dkd_neg"])
    else:
        assert sorted(result.extras) == want["extras_keys"]
    logged = result.logged()
    assert sorted(logged) == sorted(want["logged_averages"])
    for key, value in want["logged_averages"].items():
        close(logged[key], value, mbce=True)
    close(result.outputs.grad, want["grad_logit"], mbce=True)
    close(f.grad, want["grad_feature"], mbce=True)
    for conv, gw, gb in zip(model.cls, want["grad_cls_weight"], want["grad_cls_bias"]):
        close(conv.weight.grad[:, :, 0, 0], gw, mbce=True)
        close(conv.bias.grad, gb, mbce=True)


# ------------------------------------------------------------------ prediction and scores
def test_prediction_confusion_matrix_and_logged_scores():
    case = CASES["prediction"]
    evaluator = DKDEvaluator(case["num_class"], case["old_classes_idx"], case["new_classes_idx"])
    for logits, labels, want in zip(case["logits"], case["labels"], case["expected_pred"]):
        pred = predict(tensor(logits))
        assert pred.tolist() == want
        evaluator.add_batch(tensor(labels, torch.long), pred)
    close(evaluator.confusion_matrix, case["expected_confusion_matrix"])
    assert log_strings(evaluator.scores()) == case["expected_log"]


@pytest.mark.parametrize("case", CASES["metrics"], ids=names(CASES["metrics"]))
def test_scores(case):
    evaluator = DKDEvaluator(case["num_class"], case["old_classes_idx"], case["new_classes_idx"])
    for gt, pred in zip(case["gt"], case["pred"]):
        evaluator.add_batch(tensor([gt], torch.long), tensor([pred], torch.long))
    close(evaluator.confusion_matrix, case["expected_confusion_matrix"])
    scores = evaluator.scores()
    for metric, want in case["expected"].items():
        assert sorted(scores[metric]) == sorted(want)
        for key, value in want.items():
            close(scores[metric][key], [float("nan") if v is None else v for v in value]
                  if key == "by_class" else value)


def test_absent_class_iou_is_negative_zero_and_counts():
    """D13: a class absent from ground truth and prediction scores -0 and pulls the means."""
    case = CASES["metrics"][0]
    evaluator = DKDEvaluator(case["num_class"], case["old_classes_idx"], case["new_classes_idx"])
    for gt, pred in zip(case["gt"], case["pred"]):
        evaluator.add_batch(tensor([gt], torch.long), tensor([pred], torch.long))
    iou = evaluator.scores()["Mean_Intersection_over_Union"]
    absent = case["num_class"] - 1
    assert iou["by_class"][absent] == 0 and str(iou["by_class"][absent]) == "-0.0"
    assert iou["new"] == pytest.approx(sum(iou["by_class"][3:5]) / 3)


# ------------------------------------------------------------------------------ labels
MASKING = CASES["labels"]["target_masking"]


@pytest.mark.parametrize("case", MASKING, ids=names(MASKING))
def test_label_masking(case):
    label = tensor(case["label"], torch.uint8)
    got = mask_labels(label, case["classes_idx_new"], case["classes_idx_old"],
                      case["masking_value"], keep_old=case["test"])
    assert got.dtype == torch.uint8
    assert got.tolist() == case["expected"]


SELECTION = CASES["labels"]["image_selection"]


@pytest.mark.parametrize("case", SELECTION, ids=names(SELECTION))
def test_image_selection_predicates(case):
    label = tensor(case["label"], torch.uint8)
    assert has_new_class(label, case["new"]) is case["expected_contains_any_new"]
    assert only_seen_classes(label, case["old"], case["new"]) is case["expected_contains_only_seen"]
    assert has_seen_class(label, case["old"], case["new"]) is case["expected_contains_any_seen"]


def collect_candidates(case, previous):
    records = [list(r) for r in previous]
    logits = case.get("logits")
    for i, batch in enumerate(case["batches"]):
        records += candidate_records(batch["image_name"], tensor(batch["label"], torch.uint8),
                                     None if logits is None else tensor(logits[i]))
    return records


def test_memory_candidates_step1_are_the_labels_as_they_are():
    case = CASES["memory"]["step1"]
    assert collect_candidates(case, []) == case["expected_shuffles"][0]["before"]


def test_memory_candidates_step2_previous_then_pseudo_labelled():
    case = CASES["memory"]["step2"]
    previous = case["previous_memory_json"]["step_1"]["memory_candidates"]
    assert collect_candidates(case, previous) == case["expected_shuffles"][0]["before"]


# ------------------------------------------------------------------ schedules and groups
@pytest.mark.parametrize("case", CASES["lr_schedule"], ids=names(CASES["lr_schedule"]))
def test_lr_schedule(case):
    params = [nn.Parameter(torch.zeros(1)) for _ in case["base_lrs"]]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr}
                                 for p, lr in zip(params, case["base_lrs"])], lr=0.1)
    scheduler = dkd_scheduler(optimizer, case["max_iters"],
                              warmup_fraction=case["kwargs"].get("warmup_iters"))
    got = []
    for _ in range(case["max_iters"]):
        got.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    close(got, case["expected_lr_per_iteration"])


class StubBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)


class StubHead(StubBody):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)


GROUPS = CASES["optimizer_groups"]


@pytest.mark.parametrize("case", GROUPS,
                         ids=[f"step{c['step']}-freeze{c['freeze_all_bn']}" for c in GROUPS])
def test_parameter_groups_and_freezing(case):
    model = DKDDeepLab(StubBody(), StubHead(), 4, case["classes"])
    step, freeze = case["step"], case["freeze_all_bn"]
    layout = param_group_layout(model, step, case["lr"], freeze_all_bn=freeze)
    groups = dkd_param_groups(model, step, case["lr"], freeze_all_bn=freeze)
    want = case["expected_groups"]
    assert [[n for n, _ in g["params"]] for g in layout] == [g["params"] for g in want]
    close([g["lr"] for g in groups], [g["lr"] for g in want])
    close([g["weight_decay"] for g in groups], [g["weight_decay"] for g in want])
    params = dict(model.named_parameters())
    assert [[id(p) for p in g["params"]] for g in groups] == \
        [[id(params[n]) for n in g["params"]] for g in want]
    torch.optim.SGD(groups, lr=case["lr"], momentum=0.9, nesterov=True)   # accepted as is
    model.train()
    apply_step_freezing(model, step, freeze)
    flags = {"backbone.bn": model.backbone.bn.training, "aspp.bn": model.aspp.bn.training,
             "aspp.drop": model.aspp.drop.training}
    assert flags == case["expected_training_flags_after_freeze"]


# ------------------------------------------------------------------- published scripts
SCRIPT_LINES = [c for c in CASES["config"]["train"] if "--multiprocessing_distributed" in c["argv"]]


@pytest.mark.parametrize("case", SCRIPT_LINES, ids=names(SCRIPT_LINES))
def test_published_script_configuration(case):
    """The effective configuration DKD's parser gives for three lines of its published scripts
    (each line's dataset, task, step and memory size are read from it)."""
    argv = case["argv"].split()
    value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    dataset = "ade" if "ade" in argv[argv.index("-c") + 1] else "voc"
    got = published_config(dataset, value["--task_name"], int(value["--task_step"]),
                           memory=int(value.get("--mem_size", 0)) > 0,
                           setting=value["--task_setting"])
    for masking in ("val_masking_value", "test_masking_value"):
        assert got.pop(masking) == CASES["config"]["defaults"][dataset]["data_loader"]["args"][
            masking.split("_")[0]]["args"]["masking_value"]
    # numbers by value: DKD's command line gives floats where its JSON has ints
    assert json.loads(json.dumps(got), parse_int=float) == \
        json.loads(json.dumps(case["expected"]), parse_int=float)


def test_iteration_gradient_matches_finite_differences():
    """The step >= 1 loss (L_mbce's target in float64, the D9 fix, so that float64 finite
    differences apply) differentiates correctly with respect to the features and every
    classifier, through the decomposition into P and N. L_ac is left out: its input is
    detached on purpose, which finite differences of the features do not see."""
    case = CASES["train_step"]["incremental"][1]
    hp = case["hyperparameter"]
    weights = DKDWeights(pos_weight=float(hp["pos_weight"]), mbce=hp["mbce"], kd=hp["kd"],
                         dkd_pos=hp["dkd_pos"], dkd_neg=hp["dkd_neg"], ac=0.0,
                         mbce_target_in_logit_dtype=True)
    f = tensor(case["feature"]).requires_grad_()
    model = stub_network(f, case["cls_weight"], case["cls_bias"])
    old = stub_network(tensor(case["feature_old"]), case["cls_weight_old"],
                       case["cls_bias_old"]).eval()
    x, labels = images(f, case["image_hw"]), tensor(case["label"], torch.long)
    n_old, n_new = sum(case["classes"][:-1]), case["classes"][-1]
    names = [n for n, _ in model.named_parameters()]

    def loss(feature, *values):
        model.backbone.feature = feature

        def network(images, ret_intermediate=False):
            return torch.func.functional_call(model, dict(zip(names, values)), (images,),
                                              {"ret_intermediate": ret_intermediate})
        return dkd_training_loss(network, old, x, labels, n_old, n_new, weights).total

    inputs = [f] + [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)
