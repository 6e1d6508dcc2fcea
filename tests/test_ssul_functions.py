"""SSUL's numerical core reproduces the values of SSUL's own code.

The expected values in tests/data/ssul_cases.json were produced by running SSUL's public code
(clovaai/SSUL, commit e08ee9c; its ``_meta`` says which function or block of ``main.py``
produced each section) on fake VOC/ADE trees. Every value is recomputed here through
``methods.ssul`` (labels, loss, optim, memory, evaluation) and ``metrics.StreamSegMetrics``;
the network's sections (weight transfer, freezing, the end-to-end facts) are in
tests/test_ssul_network.py. Tolerances: floats rtol 1e-5 / atol 1e-6 (SSUL computes in
float32), everything else exact. ``dataset_lists.shipped_counts`` needs SSUL's shipped list
files (real VOC/ADE) and is informational only.

The task tables (classes per step) come from the ``class_counts`` section of the same file.
"""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from methods.ssul.evaluation import (
    before_after_lines,
    current_class_score,
    is_improvement,
    ssul_scores,
    validation_interval,
)
from methods.ssul.labels import (
    LabelError,
    class_layout,
    kept_classes,
    mask_and_order,
    ordering_map,
    pad_if_needed,
    parse_class_index,
    pseudo_label,
    read_saliency,
    select_step_images,
    unknown_target,
    uses_saliency,
)
from methods.ssul.loss import SSULBCELoss, SSULFocalLoss, make_ssul_criterion
from methods.ssul.memory import (
    MemorySelectionError,
    MemoryStallError,
    balanced_round_robin,
    image_candidate,
    make_candidate,
    memory_file_names,
    mix_memory,
    update_memory_record,
)
from methods.ssul.optim import FlooredPolyLR, WarmupPolyLR, make_ssul_scheduler
from metrics import StreamSegMetrics
from utils.errors import UserError
from utils.loss import LossError

CASES = json.loads((Path(__file__).parent / "data" / "ssul_cases.json").read_text())
RTOL, ATOL = 1e-5, 1e-6
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
TASKS = {(c["dataset"], c["task"]): [s["classes"] for s in c["steps"]]
         for c in CASES["class_counts"] if c["unknown"]}


def decode(v):
    if isinstance(v, list):
        return [decode(x) for x in v]
    return NON_FINITE.get(v, v) if isinstance(v, str) else v


def f32(v):
    return torch.tensor(decode(v), dtype=torch.float32)


def i64(v):
    return torch.tensor(v, dtype=torch.long)


def close(got, want):
    want = torch.as_tensor(decode(want), dtype=torch.float64)
    got = torch.as_tensor(got).detach().double()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)


def names(cases):
    return [c["name"] for c in cases]


# ---------------------------------------------------------------------------- losses
@pytest.mark.parametrize("case", CASES["bce_loss"], ids=names(CASES["bce_loss"]))
def test_bce_loss(case):
    z, y = f32(case["logits"]).requires_grad_(), i64(case["labels"])
    mean = SSULBCELoss("mean")(z, y)
    close(mean, case["bce_mean"])
    close(SSULBCELoss("sum")(z, y), case["bce_sum"])
    close(SSULBCELoss("none")(z, y), case["bce_none"])
    close(SSULBCELoss("mean")(z, y, weight=f32(case["weight"])), case["bce_mean_weighted"])
    assert make_ssul_criterion("bce_loss")(z, y).item() == mean.item() or math.isnan(mean.item())
    if "bce_mean_grad" in case:
        mean.backward()
        close(z.grad, case["bce_mean_grad"])
    if "ce_mean" in case:
        close(make_ssul_criterion("ce_loss")(z, y), case["ce_mean"])
        close(make_ssul_criterion("focal_loss")(z, y), case["focal_mean"])
        close(SSULFocalLoss(size_average=False)(z, y), case["focal_sum"])
        close(SSULFocalLoss(gamma=2)(z, y), case["focal_gamma2_mean"])


def test_bce_loss_rejects_labels_beyond_the_channels():
    z = torch.zeros(1, 3, 1, 2)
    with pytest.raises(LossError, match="do not fit"):
        SSULBCELoss()(z, i64([[[1, 4]]]))
    with pytest.raises(UserError, match="loss type"):
        make_ssul_criterion("dice")


def test_bce_loss_upcasts_half_logits():
    z = torch.randn(2, 4, 3, 3)
    y = torch.randint(0, 4, (2, 3, 3))
    got = SSULBCELoss()(z.half(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, SSULBCELoss()(z.half().float(), y))


# ---------------------------------------------------------------------------- labels
LABEL_CASES = [c for c in CASES["labels"] if "expected_exception" not in c]


@pytest.mark.parametrize("case", LABEL_CASES, ids=names(LABEL_CASES))
def test_labels(case):
    table = TASKS[(case["dataset"], case["task"])]
    voc = case["dataset"] == "voc"
    y = mask_and_order(np.array(case["mask"], dtype=np.uint8), table, case["step"],
                       case["image_set"])
    if uses_saliency(voc, case["image_set"]):
        sal = torch.tensor(case["saliency"])
    else:
        sal = torch.ones_like(y)
    if "crop_pad" in case:
        y, sal = pad_if_needed(y, case["crop_pad"]), pad_if_needed(sal, case["crop_pad"])
    if case["image_set"] == "train" and case["unknown"]:
        y = unknown_target(y, sal, voc=voc)
    assert y.tolist() == case["expected_target"]
    assert sal.tolist() == case["saliency_used"]
    if "target_cls" in case:
        kept = kept_classes(table, case["step"], case["image_set"])
        want = sorted(case["target_cls"])
        # SSUL's test set keeps every id; it lists the step's classes and 255 all the same
        assert kept is None if case["image_set"] == "test" else kept == want
        assert ordering_map(table)[:21].tolist() == case["ordering_map_0_20"]


def test_missing_saliency_is_one_clear_error(tmp_path):
    case = next(c for c in CASES["labels"] if "expected_exception" in c)
    assert case["expected_exception"] == "FileNotFoundError"
    (tmp_path / "saliency_map").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        read_saliency(str(tmp_path), "2007_000032")
    assert isinstance(err.value, UserError)
    assert "saliency_map/2007_000032.png" in str(err.value) and "download_voc.sh" in str(err.value)


def test_saliency_is_read_as_uint8(tmp_path):
    from PIL import Image
    (tmp_path / "saliency_map").mkdir()
    values = np.array([[0, 3], [200, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "saliency_map" / "a.png")
    assert read_saliency(str(tmp_path), "a").tolist() == values.tolist()


def test_label_fixes_move_the_labels():
    # S10 fix: padding ignored; S26 fix: a saliency threshold
    assert pad_if_needed(torch.zeros(2, 2, dtype=torch.long), 4, fill=255)[0].tolist() == [255] * 4
    y = unknown_target(torch.tensor([[0, 0, 3]]), torch.tensor([[5, 200, 0]]),
                       saliency_threshold=128)
    assert y.tolist() == [[1, 0, 4]]
    with pytest.raises(LabelError, match="0..255"):
        mask_and_order(np.array([[256]]), [[0, 1]], 0, "train")


@pytest.mark.parametrize("case", CASES["class_counts"],
                         ids=[f"{c['dataset']}_{c['task']}_{c['unknown']}"
                              for c in CASES["class_counts"]])
def test_class_counts(case):
    table = [s["classes"] for s in case["steps"]]
    for s in case["steps"]:
        got = class_layout(table, s["step"], case["unknown"])._asdict()
        assert got == {k: s[k] for k in got}, s["step"]


def test_dataset_lists():
    index = parse_class_index(CASES["dataset_lists"]["fake_index"])
    for c in CASES["dataset_lists"]["fake"]:
        got = select_step_images(index, TASKS[("voc", c["task"])], c["step"], overlap=c["overlap"])
        assert got == c["expected"], (c["task"], c["step"], c["overlap"])


def test_disjoint_fix_uses_the_earlier_steps_classes():
    # S21: 15-1_b step 1 adds class 17; class 20 is a step-0 class, class 3 comes at step 2,
    # but the numeric range 1..16 takes 3 and rejects 20
    table = TASKS[("voc", "15-1_b")]
    index = [("a", [17, 20]), ("b", [17, 3])]
    assert select_step_images(index, table, 1, overlap=False) == ["b"]
    assert select_step_images(index, table, 1, overlap=False, disjoint_old_classes=True) == ["a"]


# ---------------------------------------------------------------------- pseudo-labels
@pytest.mark.parametrize("case", CASES["pseudo_labels"], ids=names(CASES["pseudo_labels"]))
def test_pseudo_labels_and_loss(case):
    y = i64(case["labels"])
    if case["pseudo"] and case["curr_step"] > 0:
        y = pseudo_label(y, f32(case["old_logits"]), fg_idx=case["fg_idx"],
                         threshold=case["pseudo_thresh"], loss_type=case["loss_type"])
        assert y.tolist() == case["expected_pseudo_labels"]
    else:
        assert case["expected_pseudo_labels"] is None
    close(make_ssul_criterion(case["loss_type"])(f32(case["new_logits"]), y),
          case["expected_loss"])


# ------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("case", CASES["validate"], ids=names(CASES["validate"]))
def test_validate(case):
    from methods.ssul.labels import predict
    pred = predict(f32(case["logits"]), loss_type=case["loss_type"], unknown=case["unknown"])
    assert pred.tolist() == case["expected_preds"]
    metrics = StreamSegMetrics(case["n_classes_metric"])
    metrics.update(i64(case["labels"]), pred)
    close(torch.from_numpy(metrics.confusion_matrix), case["expected_confusion"])
    scores = ssul_scores(metrics.confusion_matrix)
    want = case["expected_score"]
    for key in ("Overall Acc", "Mean Acc", "FreqW Acc", "Mean IoU"):
        close(scores[key], want[key])
    for key in ("Class IoU", "Class Acc"):
        assert sorted(scores[key]) == sorted(int(k) for k in want[key])
        close([scores[key][c] for c in sorted(scores[key])],
              [want[key][str(c)] for c in sorted(scores[key])])
    assert before_after_lines(scores, case["report_first_cls"]) == case["expected_report_stdout"]


@pytest.mark.parametrize("case", CASES["val_select"], ids=names(CASES["val_select"]))
def test_val_select(case):
    score = current_class_score(case["class_iou"], case["curr_idx"])
    close(score, case["expected_curr_score"])
    close(current_class_score(case["class_iou"], case["curr_idx"], with_background=True),
          case["expected_val_score_unused"])
    saved = is_improvement(score, case["best_score_before"])
    assert saved == case["expected_saved"]
    assert (score if saved else case["best_score_before"]) == case["expected_best_score_after"]


def test_validation_interval():
    # S14; the end-to-end run printed val_interval 100 for 3, 2 and 1 iterations
    assert [validation_interval(i) for i in (1, 3, 14950, 84100)] == [100, 100, 149, 841]


# -------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("case", CASES["schedule"], ids=names(CASES["schedule"]))
def test_schedule(case):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in case["base_lrs"]]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in
                                 zip(params, case["base_lrs"])], lr=0.1, momentum=0.9)
    scheduler = make_ssul_scheduler(optimizer, case["policy"], case["total_itrs"])
    if case["policy"] == "warm_poly":
        assert isinstance(scheduler, WarmupPolyLR)
        assert scheduler.warmup_iters == case["warmup_iters"]
    else:
        assert isinstance(scheduler, FlooredPolyLR)
    used = []
    for _ in range(case["total_itrs"]):
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    close(used, case["expected_lr_per_iteration"])
    close([g["lr"] for g in optimizer.param_groups], case["expected_lr_after_last"])


# ---------------------------------------------------------------------------- memory
MEMORY = CASES["memory"]


def memory_candidates(step, old_logits=None, threshold=0.7):
    """SSUL's candidates of ``step``: the step t-1 training list (overlap), each mask centre
    cropped, labelled as training data of step t-1 with the unknown class, pseudo-labelled by
    the old model at t > 1."""
    table = TASKS[("voc", "15-1")]
    listed = select_step_images(parse_class_index(MEMORY["index_file"]), table, step - 1,
                                overlap=True)
    out = []
    for k, name in enumerate(listed):
        mask = TF.center_crop(torch.tensor(MEMORY["masks"][name])[None], MEMORY["crop_size"])[0]
        logits = old_logits[k][None] if step > 1 else None
        out.append(image_candidate(name, mask.numpy(), table, step, old_logits=logits,
                                   threshold=threshold))
    return listed, out


def old_classes(step):
    return list(range(1, class_layout(TASKS[("voc", "15-1")], step - 1, True).metric_classes))


@pytest.mark.parametrize("index", range(len(MEMORY["cases"])), ids=names(MEMORY["cases"]))
def test_memory_selection(index):
    case = MEMORY["cases"][index]
    step, record = case["step"], None
    if step > 1:
        listed, new = memory_candidates(step, f32(case["old_logits"]), case["pseudo_thresh_used"])
        assert listed == case["old_logits_order"]
        record = MEMORY["cases"][index - 1]["expected_memory_json"]
        pool = [list(e) for e in record[f"step_{step - 1}"]["memory_candidates"]] + new
    else:
        _, new = memory_candidates(step)
        pool = new
    assert pool == case["candidates"]
    assert old_classes(step) == case["class_order"]
    chosen = balanced_round_robin(pool, old_classes(step), case["mem_size"],
                                  np.random.RandomState(case["seed"]))
    assert chosen.shuffled_pool == case["candidates_shuffled"]
    assert chosen.class_order == case["class_order_shuffled"]
    assert update_memory_record(record, step, new, chosen.chosen) == case["expected_memory_json"]


def test_memory_selection_uses_the_global_generator_the_same_way():
    pool = MEMORY["cases"][0]["candidates"]
    np.random.seed(1)
    by_module = balanced_round_robin(pool, old_classes(1), 4, np.random)
    assert by_module == balanced_round_robin(pool, old_classes(1), 4, np.random.RandomState(1))


def test_memory_that_cannot_be_filled_is_one_clear_error():
    hang = MEMORY["hang"]
    _, pool = memory_candidates(hang["step"])
    with_old = [c for c in pool if any(1 <= k < 16 for k in c[3])]
    assert len(with_old) == hang["images_with_an_old_class"] and not hang["finished_within_30s"]
    with pytest.raises(MemoryStallError, match=f"cannot hold {hang['mem_size']} images") as err:
        balanced_round_robin(pool, old_classes(1), hang["mem_size"], np.random.RandomState(1))
    assert isinstance(err.value, UserError)
    # S9 fix: stop short with every image that holds an old class
    stopped = balanced_round_robin(pool, old_classes(1), hang["mem_size"],
                                   np.random.RandomState(1), on_stall="stop")
    assert sorted(c[0] for c in stopped.chosen) == sorted(c[0] for c in with_old)


def test_round_robin_with_other_candidate_layouts():
    # DKD-style entries [name, labels] and its class list 1..n_old, same draws as SSUL's
    ssul = MEMORY["cases"][2]
    pool = [[c[0], c[3]] for c in ssul["candidates"]]
    got = balanced_round_robin(pool, old_classes(1), ssul["mem_size"], np.random.RandomState(1),
                               labels_of=lambda e: e[1])
    want = ssul["expected_memory_json"]["step_1"]["memory_candidates"]
    assert got.chosen == [[c[0], c[3]] for c in want]
    with pytest.raises(MemorySelectionError, match="on_stall"):
        balanced_round_robin(pool, [1], 1, np.random.RandomState(1), on_stall="loop")


def test_memory_record_fix_leaves_the_previous_step_alone():
    case = MEMORY["cases"][4]
    record = MEMORY["cases"][3]["expected_memory_json"]
    before = copy.deepcopy(record)
    got = update_memory_record(record, 2, [["x", 1, 1, [16]]], [], alias_previous=False)
    assert got["step_1"] == before["step_1"] and record == before
    assert case["expected_memory_json"]["step_1"] != before["step_1"]  # S7 changed it


def test_candidate_labels_fix_drops_the_ignore_value():
    y = torch.tensor([[0, 1, 5, 255]])
    assert make_candidate("a", y, fg_idx=1, unknown=True) == ["a", 2, 2, [4, 254]]
    assert make_candidate("a", y, fg_idx=1, unknown=True, drop_ignore=True)[3] == [4]


def test_memory_list_doubling():
    d = CASES["memory_list_doubling"]
    assert memory_file_names(d["memory_list"], d["batch_size"]) == d["expected_file_names"]


@pytest.mark.parametrize("case", CASES["memory_mix"]["cases"],
                         ids=[f"seed{c['seed']}" for c in CASES["memory_mix"]["cases"]])
def test_memory_mix(case):
    b = case["batch_size"]
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 2, 2)
    labels = (7 + torch.arange(b)).view(b, 1, 1).expand(b, 2, 2)
    sal = torch.zeros(b, 2, 2, dtype=torch.long)
    memory = (images + 100, labels + 100, sal + 1)
    torch.manual_seed(case["seed"])
    (images, labels, sal), idx = mix_memory((images, labels, sal), memory)
    assert idx.tolist() == case["rand_index"]
    assert labels.tolist() == case["expected_labels"]
    close(images[:, 0, 0, 0], case["expected_images_first_px"])
    assert sal.tolist() == case["expected_sal"]
    with pytest.raises(MemorySelectionError, match="match the training batch"):
        mix_memory((images,), (images[:1],))


def test_memory_labels_shift_fix():
    # S6: memory labels are masked to the steps so far and not shifted; the fix runs them
    # through the training rule with a map of ones (background becomes unknown)
    table = TASKS[("voc", "15-1")]
    y = mask_and_order(np.array([[0, 3, 16, 17, 255]], dtype=np.uint8), table, 1, "memory")
    assert y.tolist() == [[0, 3, 16, 0, 255]]
    assert unknown_target(y, torch.ones_like(y)).tolist() == [[0, 4, 17, 0, 255]]


def test_memory_candidates_use_sigmoid_unless_ce():
    # S12: the old model's guess counts with sigmoid for bce and focal, softmax for ce only
    table = TASKS[("voc", "15-1")]
    mask = np.zeros((1, 2), dtype=np.uint8)             # background: step 1's list, step 2
    logits = torch.full((1, 18, 1, 2), -4.0)
    logits[0, 5] = 1.0                                  # class 4: sigmoid 0.73, softmax < 0.7
    logits[0, 6] = 0.9
    sigmoid = image_candidate("a", mask, table, 2, old_logits=logits, loss_type="focal_loss")
    assert sigmoid == ["a", 1, 2, [4]]
    assert image_candidate("a", mask, table, 2, old_logits=logits, loss_type="ce_loss")[3] == []
    with pytest.raises(MemorySelectionError, match="old model's logits"):
        image_candidate("a", mask, table, 2)
