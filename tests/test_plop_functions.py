"""PLOP's numerical core: local POD, entropy, median thresholds, pseudo-labels and the
classification factor reproduce the values of PLOP's own functions (tests/data/plop_cases.json,
one test id per value; the values were produced by running PLOP's own code at the commit its
"about" entry names, on the inputs stored beside them; the project carries no script that
regenerates them, since that needs PLOP's code), one training iteration composed from these
functions reproduces PLOP's iteration (docs/behaviour.md §15.6), gradients match finite
differences, and each fix switch moves the number the way it should."""
import functools
import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from methods.plop.pod import (
    PODError,
    _global_pod,
    _local_pod,
    _local_pod_masked,
    features_distillation,
)
from methods.plop.pseudo import (
    DEFAULT_NB_BINS,
    PseudoLabelError,
    accumulate_histogram,
    classif_adaptive_factor,
    entropy,
    find_median,
    pseudo_label_targets,
    thresholds_from_histogram,
)
from utils.loss import PixelCrossEntropy

CASES = json.loads((Path(__file__).parent / "data" / "plop_cases.json").read_text())
TOL = CASES["tolerance"]
NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
VOC_OPTIONS = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, str):
        return NON_FINITE[value]
    return value


def tensor(value, dtype=torch.float64):
    return torch.tensor(decode(value), dtype=dtype)


def expect_close(got, want, grad=False):
    """Floats: rtol/atol of the data file (gradients: their own); inf/-inf/NaN exact."""
    rtol, atol = (TOL["grad_rtol"], TOL["grad_atol"]) if grad else (TOL["rtol"], TOL["atol"])
    want = want if torch.is_tensor(want) else tensor(want)
    got = torch.as_tensor(got).detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want.double(), rtol=rtol, atol=atol, equal_nan=True)


def expect_equal(got, want):
    """Integers and booleans: exact."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert torch.equal(got, want), (got.tolist(), want.tolist())


def ids(cases):
    return [c["id"] for c in cases]


# ------------------------------------------------------------------- PLOP's own values
@pytest.mark.parametrize("case", CASES["pod_embedding"], ids=ids(CASES["pod_embedding"]))
def test_local_pod_embedding(case):
    got = _local_pod(tensor(case["x"]), case["scales"], normalize_per_scale=case["per_scale"])
    expect_close(got, case["want"])


def pod_inputs(case, dtype=torch.float64):
    maps = CASES["pod_loss"]["map_sets"][case["map_set"]]
    old = [tensor(m).to(dtype) for m in maps["old_maps"]]
    new = [tensor(m).to(dtype) for m in maps["new_maps"]]
    extra = {"labels": tensor(maps["labels"], torch.long)}
    if case["use_old_logits"]:
        extra["outputs_old"] = tensor(maps["old_logits"]).to(dtype)
    return old, new, extra


@pytest.mark.parametrize("case", CASES["pod_loss"]["cases"], ids=ids(CASES["pod_loss"]["cases"]))
def test_features_distillation(case):
    old, new, extra = pod_inputs(case)
    got = features_distillation(old, new, **extra, **case["kwargs"])
    assert got.dtype == getattr(torch, case["want_dtype"]) and got.dim() == 0
    expect_close(got, case["want"])


@pytest.mark.parametrize("case", CASES["entropy"], ids=ids(CASES["entropy"]))
def test_entropy(case):
    got = entropy(tensor(case["probs"], getattr(torch, case["dtype"])))
    assert got.dtype == getattr(torch, case["dtype"])
    expect_close(got, case["want"])


class Identity(torch.nn.Module):
    """The old model of the threshold cases: its input are the old logits."""

    def forward(self, images):
        return images, {}


@functools.lru_cache(maxsize=None)
def threshold_result(case_id):
    case = next(c for c in CASES["thresholds"] if c["id"] == case_id)
    loader = [(tensor(b["old_logits"]), tensor(b["labels"], torch.long)) for b in case["batches"]]
    return case, find_median(Identity(), loader, "cpu", case["nb_classes"], mode=case["mode"],
                             threshold=case["threshold"], nb_bins=case["nb_bins"],
                             return_histogram=True)


THRESHOLD_CHECKS = [(c["id"], q) for c in CASES["thresholds"]
                    for q in ("histogram", "thresholds", "max_value")]


@pytest.mark.parametrize("case_id,quantity", THRESHOLD_CHECKS,
                         ids=[f"{c}-{q}" for c, q in THRESHOLD_CHECKS])
def test_find_median(case_id, quantity):
    case, (thresholds, max_value, hist) = threshold_result(case_id)
    if quantity == "histogram":
        expect_equal(hist, tensor(case["want_histogram"], torch.long))
    elif quantity == "thresholds":
        assert thresholds.dtype == getattr(torch, case["want_thresholds_dtype"])
        expect_close(thresholds, case["want_thresholds"])
    else:
        assert max_value.dtype == torch.float32
        expect_close(max_value, case["want_max_value"])


# ------------------------------------------------------------ one training iteration
class FixedOutputs(torch.nn.Module):
    """An old model that returns the same logits whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits, {}


def plop_targets(batch, n_old, n_cur, options, *, bg_only=False):
    """Trainer.before: thresholds once per step from the training loader (here the one
    batch); then, in the iteration, old logits -> pseudo-labels and the factor."""
    o = options
    labels = batch["labels"]
    images = torch.zeros(labels.shape[0], 3, *labels.shape[1:])
    thresholds, max_entropy, hist = find_median(
        FixedOutputs(batch["old_logits"]), [(images, labels)], "cpu", n_cur, mode="entropy",
        threshold=o["threshold"], nb_bins=o["pseudo_nb_bins"], return_histogram=True)
    with torch.no_grad():
        pseudo = pseudo_label_targets(labels, batch["old_logits"], thresholds, max_entropy, n_old)
    if o["classif_adaptive_factor"]:
        factor = classif_adaptive_factor(pseudo.mask_background, pseudo.mask_valid,
                                         min_factor=o["classif_adaptive_min_factor"],
                                         bg_only=bg_only)
    else:
        factor = torch.ones(labels.shape[0], dtype=torch.float32)
    return {"histogram": hist, "thresholds": thresholds, "max_entropy": max_entropy,
            "old_argmax": pseudo.pseudo_labels, "background": pseudo.mask_background,
            "accepted": pseudo.mask_valid, "targets": pseudo.targets, "factor": factor}


def plop_losses(batch, targets, factor, n_old, n_cur, n_new, options, *,
                accumulate_dtype=torch.float32):
    """Per-pixel CE (ignore 255) times the factor, mean over all pixels; POD over attentions
    + small logits with the rewritten targets; L = L_cls + POD."""
    o = options
    weight = factor if factor.dim() == 3 else factor[:, None, None]
    pixel_ce = PixelCrossEntropy(ignore_index=255, reduction="none")(batch["logits"], targets)
    loss_cls = (weight * pixel_ce).mean()
    loss_pod = features_distillation(
        batch["old_attentions"] + [batch["old_small_logits"]],
        batch["attentions"] + [batch["small_logits"]],
        collapse_channels=o["pod"], labels=targets, index_new_class=n_old,
        pod_factor=o["pod_factor"], prepro=o["pod_prepro"], spp_scales=o["spp_scales"],
        pod_options=o["pod_options"], outputs_old=batch["old_logits"],
        use_pod_schedule=not o["no_pod_schedule"], nb_current_classes=n_cur,
        nb_new_classes=n_new, accumulate_dtype=accumulate_dtype)
    return {"pixel_ce": pixel_ce, "loss_cls": loss_cls, "loss_pod": loss_pod,
            "loss": loss_cls + loss_pod}


def plop_iteration(batch, n_old, n_cur, n_new, options, *, bg_only=False):
    """PLOP's step > 0 iteration composed from the functions."""
    out = plop_targets(batch, n_old, n_cur, options, bg_only=bg_only)
    out.update(plop_losses(batch, out["targets"], out["factor"], n_old, n_cur, n_new, options))
    return out


def iteration_batch(name, requires_grad=False):
    raw = CASES["iteration"]["batches"][name]
    batch = {k: [tensor(t) for t in v] if k.endswith("attentions") else tensor(v)
             for k, v in raw.items() if k != "labels"}
    batch["labels"] = tensor(raw["labels"], torch.long)
    if requires_grad:
        for t in [batch["logits"], batch["small_logits"]] + batch["attentions"]:
            t.requires_grad_()
    return batch


@functools.lru_cache(maxsize=None)
def iteration_result(case_id):
    case = next(c for c in CASES["iteration"]["cases"] if c["id"] == case_id)
    batch = iteration_batch(case["batch"], requires_grad=True)
    out = plop_iteration(batch, case["n_old"], case["n_cur"], case["n_new"], case["options"])
    out["loss"].backward()
    out["grad_logits"] = batch["logits"].grad
    out["grad_small_logits"] = batch["small_logits"].grad
    out["grad_attentions"] = [t.grad for t in batch["attentions"]]
    return case, out


INTEGER_KEYS = {"histogram", "old_argmax", "background", "accepted", "targets"}
ITERATION_CHECKS = []
for _case in CASES["iteration"]["cases"]:
    for _key, _value in _case["want"].items():
        if _key == "grad_attentions":
            ITERATION_CHECKS += [(_case["id"], _key, i) for i in range(len(_value))]
        else:
            ITERATION_CHECKS.append((_case["id"], _key, None))


@pytest.mark.parametrize(
    "case_id,key,index", ITERATION_CHECKS,
    ids=[f"{c}-{k}" + ("" if i is None else f"[{i}]") for c, k, i in ITERATION_CHECKS])
def test_training_iteration(case_id, key, index):
    case, out = iteration_result(case_id)
    got, want = out[key], case["want"][key]
    if index is not None:
        got, want = got[index], want[index]
    if key in INTEGER_KEYS:
        dtype = torch.bool if key in ("background", "accepted") else torch.long
        expect_equal(got, tensor(want, dtype))
    else:
        if key in ("thresholds", "max_entropy", "factor", "loss_pod"):
            assert got.dtype == torch.float32  # float32 in PLOP
        expect_close(got, want, grad=key.startswith("grad"))


def test_every_value_of_the_data_file_is_a_test():
    n = len(CASES["pod_embedding"]) + len(CASES["pod_loss"]["cases"]) + len(CASES["entropy"])
    assert n + len(THRESHOLD_CHECKS) + len(ITERATION_CHECKS) == 115


# --------------------------------------------------------------------------- gradients
def random_maps(seed, shapes, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for s in shapes]


OLD_SHAPES = [(2, 2, 4, 4), (2, 3, 2, 2), (2, 3, 4, 4)]
NEW_SHAPES = [(2, 2, 4, 4), (2, 3, 2, 2), (2, 5, 4, 4)]
LABELS = torch.tensor([[[0, 0, 3, 3], [0, 4, 4, 3], [255, 0, 0, 0], [1, 2, 0, 4]],
                       [[4, 4, 4, 4], [0, 0, 0, 0], [3, 0, 255, 0], [0, 0, 0, 0]]])


@pytest.mark.parametrize("kwargs", [
    dict(pod_factor=0.01, pod_options=VOC_OPTIONS),
    dict(pod_factor=0.01, pod_options={"difference_function_all": "l1", "switch": {
        "before": {"norm": True, "prepro": "relu"}, "after": {"type": "local",
                                                              "extra_channels": "trim"}}}),
    dict(pod_factor=0.01, pod_deeplab_mask=True, pod_options={"switch": {"after": {
        "type": "local", "apply_mask": "old", "use_adaptative_factor": True,
        "upscale_mask_topk": 2}}}),
    dict(pod_factor=0.01, pod_deeplab_mask=True, deeplabmask_upscale=False,
         pod_options={"switch": {"mask_position": "all", "normalize_per_scale": True}}),
    dict(collapse_channels="global", spp_scales=[1, 2], pod_options={}),
    dict(collapse_channels="spatial", logits_logsumexp=True, per_axis_tiles=True),
], ids=["voc_preset", "l1_norm_relu_trim", "mask_old_topk2", "mask_downscale_all", "global",
        "spatial_fixes"])
def test_pod_gradient_matches_finite_differences(kwargs):
    old = random_maps(0, OLD_SHAPES)
    new = random_maps(1, NEW_SHAPES, requires_grad=True)
    base = dict(collapse_channels="local", labels=LABELS, index_new_class=3,
                outputs_old=old[-1], nb_current_classes=5, nb_new_classes=2,
                accumulate_dtype=torch.float64)
    base.update(kwargs)

    def pod(*maps):
        return features_distillation(old, list(maps), **base)

    assert torch.autograd.gradcheck(pod, tuple(new), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_full_loss_gradient_matches_finite_differences():
    case = next(c for c in CASES["iteration"]["cases"] if c["id"] == "plop_voc_preset")
    batch = iteration_batch(case["batch"])
    args = (case["n_old"], case["n_cur"], case["n_new"], case["options"])
    fixed = plop_targets(batch, case["n_old"], case["n_cur"], case["options"])
    leaves = [batch["logits"], batch["small_logits"]] + batch["attentions"]
    generator = torch.Generator().manual_seed(4)
    inputs = tuple((t + 0.1 * torch.randn(t.shape, dtype=t.dtype, generator=generator))
                   .requires_grad_() for t in leaves)
    n_attentions = len(batch["attentions"])

    def loss(*tensors):
        b = dict(batch, logits=tensors[0], small_logits=tensors[1],
                 attentions=list(tensors[2:2 + n_attentions]))
        return plop_losses(b, fixed["targets"], fixed["factor"], *args,
                           accumulate_dtype=torch.float64)["loss"]

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- embeddings, details
def tiled_pod(x, scales, per_axis=False):
    """Direct transcription of the tiling: every tile sliced (clipped) one at a time."""
    b, _, h, w = x.shape
    parts = []
    for s in scales:
        kh, kw = (h // s if per_axis else w // s), w // s
        if kh == 0 or kw == 0:
            continue
        for i in range(s):
            for j in range(s):
                t = x[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]
                parts += [t.mean(dim=3).reshape(b, -1), t.mean(dim=2).reshape(b, -1)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 9, 7), (2, 1, 11, 5), (1, 2, 6, 9),
                                   (1, 1, 3, 3)])
@pytest.mark.parametrize("per_axis", [False, True])
def test_local_pod_equals_tile_by_tile_slicing(shape, per_axis):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = _local_pod(x, [1, 2, 4], per_axis_tiles=per_axis)
    torch.testing.assert_close(got, tiled_pod(x, [1, 2, 4], per_axis), equal_nan=True)


def test_local_pod_normalize_and_masked_variant():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    emb = _local_pod(x, [1, 2], normalize=True)
    # 1 + 4 tiles, each [rows (3*k), cols (3*k)] with unit norm per part
    parts = torch.split(emb, [12, 12] + [6] * 8, dim=1)
    for p in parts:
        torch.testing.assert_close(p.norm(dim=1), torch.ones(2, dtype=torch.float64))
    mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    expect = _local_pod(torch.where(mask[:, None], 0., x), [1, 2], normalize_per_scale=True)
    torch.testing.assert_close(_local_pod_masked(x, mask, [1, 2], normalize_per_scale=True), expect)
    assert not torch.equal(x, torch.where(mask[:, None], 0., x))  # the input is not zeroed
    with pytest.raises(PODError, match="spm"):
        _local_pod_masked(x, mask, [1, 2], normalize_per_scale="spm")


def test_global_pod_sums_of_average_pools():
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    # scale 2: 2x2 average pools [[2.5, 4.5], [10.5, 12.5]]; scale 1: the mean 7.5
    torch.testing.assert_close(_global_pod(x, [1, 2]),
                               torch.tensor([[7.5, 7.5, 13., 17., 7., 23.]], dtype=torch.float64))
    with pytest.raises(PODError):
        _global_pod(x, [8])


def test_public_signature_is_plops():
    params = inspect.signature(features_distillation).parameters
    plop = dict(list_attentions_a=inspect.Parameter.empty,
                list_attentions_b=inspect.Parameter.empty, collapse_channels="spatial",
                normalize=True, labels=None, index_new_class=None, pod_apply="all",
                pod_deeplab_mask=False, pod_deeplab_mask_factor=None, interpolate_last=False,
                pod_factor=1., prepro="pow", deeplabmask_upscale=True, spp_scales=[1, 2, 4],
                pod_options=None, outputs_old=None, use_pod_schedule=True,
                nb_current_classes=-1, nb_new_classes=-1)
    positional = [p for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == list(plop)
    for p in positional:
        default = list(p.default) if p.name == "spp_scales" else p.default
        assert default == plop[p.name], p.name
    for name in ("per_axis_tiles", "logits_logsumexp", "per_map_options"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is False
    local = inspect.signature(_local_pod).parameters
    assert list(local)[:4] == ["x", "spp_scales", "normalize", "normalize_per_scale"]
    assert list(local["spp_scales"].default) == [1, 2, 4]
    assert local["normalize"].default is False and local["normalize_per_scale"].default is False


# -------------------------------------------------------------------------- POD fixes
def one_map_pod(old, new, **kwargs):
    base = dict(collapse_channels="local", prepro="none", spp_scales=[1], use_pod_schedule=False)
    base.update(kwargs)
    return features_distillation([old], [new], **base).item()


def test_per_axis_tiles_sees_the_rows_below_the_width():
    # 4 x 2 maps, the new one differs only in its bottom half
    old = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    new = old.clone()
    new[:, :, 2:] = 1.
    # P10: the tile is 2 x 2 (from the width), the bottom rows are dropped
    assert one_map_pod(old, new) == 0.
    # fix: one 4 x 2 tile; rows [0, 0, 1, 1], columns [0.5, 0.5]
    assert one_map_pod(old, new, per_axis_tiles=True) == pytest.approx(math.sqrt(2.5), rel=1e-7)


def test_per_axis_tiles_avoids_the_empty_tile_crash():
    old, new = random_maps(5, [(1, 1, 2, 8), (1, 1, 2, 8)])
    # P10: at scale 2 the tiles are 4 x 4, the bottom ones empty -> NaN -> error
    with pytest.raises(PODError, match="not finite"):
        one_map_pod(old, new, spp_scales=[1, 2])
    # the finiteness check comes before the factor: a zero factor does not avoid it
    with pytest.raises(PODError, match="not finite"):
        one_map_pod(old, new, spp_scales=[1, 2], pod_options={"switch": {"after": {"factor": 0.}}})
    got = one_map_pod(old, new, spp_scales=[1, 2], per_axis_tiles=True)
    emb = lambda x: tiled_pod(x, [1, 2], per_axis=True)  # noqa: E731
    assert got == pytest.approx((emb(old) - emb(new)).norm().item(), rel=1e-7)


def test_logits_logsumexp_collapse():
    old = torch.tensor([2., 1.], dtype=torch.float64).reshape(1, 2, 1, 1)
    # the new model agrees with the old one and gives the new class no evidence
    new = torch.tensor([2., 1., -30.], dtype=torch.float64).reshape(1, 3, 1, 1)
    kw = dict(prepro="pow", index_new_class=2)
    # P11: background 2 + (-30) = -28, squared: 784 vs 4; embedding [rows, cols] of 1 x 1
    assert one_map_pod(old, new, **kw) == pytest.approx(math.sqrt(2) * 780, rel=1e-7)
    # fix: background log(e^2 + e^-30) = 2 + 1e-14: no penalty
    assert one_map_pod(old, new, logits_logsumexp=True, **kw) < 1e-12
    # a new class the new model is sure of: log-sum-exp follows the probability mass
    new = torch.tensor([0., 1., 3.], dtype=torch.float64).reshape(1, 3, 1, 1)
    lse = math.log(1. + math.exp(3.))
    assert one_map_pod(old, new, logits_logsumexp=True, **kw) == pytest.approx(
        math.sqrt(2) * abs(lse ** 2 - 4.), rel=1e-7)
    assert one_map_pod(old, new, **kw) == pytest.approx(math.sqrt(2) * 5., rel=1e-7)


def test_per_map_options_stop_the_carry_over():
    ones = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    old, new = [0 * ones, 0 * ones], [ones, ones]   # each map's distance: |[1, 1]| = sqrt 2
    kw = dict(collapse_channels="local", prepro="none", spp_scales=[1], use_pod_schedule=False,
              normalize=False, pod_options={"switch": {"before": {"factor": 0.5}}})
    # P13: "before" also sets the last map: (0.5 + 0.5) sqrt2 / 2
    assert features_distillation(old, new, **kw).item() == pytest.approx(math.sqrt(2) / 2)
    # fix: the last map keeps pod_factor 1: (0.5 + 1) sqrt2 / 2
    got = features_distillation(old, new, per_map_options=True, **kw).item()
    assert got == pytest.approx(0.75 * math.sqrt(2))


def test_negative_factor_skips_the_map_like_zero():
    old, new = random_maps(0, OLD_SHAPES), random_maps(1, NEW_SHAPES)

    def pod(factor):
        return features_distillation(old, new, collapse_channels="local", index_new_class=3,
                                     pod_factor=0.01, nb_current_classes=5, nb_new_classes=2,
                                     pod_options={"switch": {"after": {"factor": factor}}})

    assert pod(-1.).item() == pod(0.).item() < pod(0.001).item()


def test_mask_factor_carries_over_unless_per_map_options():
    ones = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    old, new = [0 * ones, 0 * ones[..., :1, :1]], [ones, ones[..., :1, :1]]
    kw = dict(collapse_channels="local", labels=torch.full((1, 2, 2), 4), index_new_class=3,
              pod_deeplab_mask=True, pod_deeplab_mask_factor=0.5, prepro="none", spp_scales=[1],
              normalize=False, use_pod_schedule=False,
              pod_options={"switch": {"mask_position": "all", "after": {"type": "spatial"}}})
    # map 0: masked local POD (nothing masked), distance |[1, 1, 1, 1]| = 2, factor 0.5;
    # map 1: spatial, distance |[1, 1]| = sqrt 2, with the mask factor carried over (P13)
    assert features_distillation(old, new, **kw).item() == pytest.approx((1 + 0.5 * 2 ** .5) / 2)
    got = features_distillation(old, new, per_map_options=True, **kw).item()
    assert got == pytest.approx((1 + 2 ** .5) / 2)


def test_per_map_options_norm_honours_the_argument():
    old, new = torch.ones(1, 1, 1, 1, dtype=torch.float64), 3 * torch.ones(1, 1, 1, 1,
                                                                           dtype=torch.float64)
    # embeddings [1, 1] and [3, 3]: distance 2 sqrt2, 0 once L2-normalised
    assert one_map_pod(old, new, normalize=True) == pytest.approx(2 * math.sqrt(2))  # P13
    assert one_map_pod(old, new, normalize=True, per_map_options=True) == pytest.approx(0.)
    assert one_map_pod(old, new, normalize=False, per_map_options=True) == pytest.approx(
        2 * math.sqrt(2))


def test_masked_pod_ignores_the_masked_pixels():
    old, new = random_maps(7, [(2, 3, 4, 4), (2, 3, 4, 4)])
    labels = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(collapse_channels="local", labels=labels, index_new_class=3, pod_factor=1.,
              pod_deeplab_mask=True, deeplabmask_upscale=False, use_pod_schedule=False)
    base = features_distillation([old], [new], **kw)
    mask = F.interpolate(labels[:, None].float(), size=(4, 4))[:, 0] < 3  # nearest-resized
    changed = torch.where(mask[:, None], new + 10., new)
    torch.testing.assert_close(features_distillation([old], [changed], **kw), base)
    assert features_distillation([old], [new], **dict(kw, pod_deeplab_mask=False)) != base
    # a zero mask factor skips the map but it still counts in 1/L
    assert features_distillation([old], [new], **dict(kw, pod_deeplab_mask_factor=0.)) == 0.


@pytest.mark.parametrize("options,message", [
    ({"difference_function": "kl"}, "3-D"), ({"difference_function_all": "bce"}, "3-D"),
    ({"switch": {"before": {"prepro": "abs"}}}, "prepro"),
    ({"switch": {"after": {"type": "spp"}}}, "type"),
    ({"switch": {"after": {"extra_channels": "mean"}}}, "extra_channels"),
    ({"switch": {"after": {"factr": 1.}}}, "unknown"),
    ({"difference_function": "frobenius_mix"}, "mix_new_old"),
])
def test_pod_rejects_what_plop_cannot_compute(options, message):
    old = random_maps(0, OLD_SHAPES)
    new = random_maps(1, NEW_SHAPES)
    with pytest.raises(PODError, match=message):
        features_distillation(old, new, collapse_channels="local", labels=LABELS,
                              index_new_class=3, pod_options=options)


def test_frobenius_mix_mixes_images_0_and_1():
    old, new = random_maps(0, OLD_SHAPES), random_maps(1, NEW_SHAPES)
    options = {"difference_function": "frobenius_mix",
               "switch": {"after": {"type": "local", "mix_new_old": 0.25, "factor": 1.}}}
    got = features_distillation(old[-1:], new[-1:], collapse_channels="local", index_new_class=3,
                                pod_options=options, use_pod_schedule=False)
    b = new[-1].clone()
    b = torch.cat([b[:, :1] + b[:, 3:].sum(1, keepdim=True), b[:, 1:3]], 1)
    d = _local_pod(old[-1] ** 2, [1, 2, 4]) - _local_pod(b ** 2, [1, 2, 4])
    assert got.item() == pytest.approx((0.25 * d[0].norm() + 0.75 * d[1].norm()).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pod_half_precision_maps_give_a_float32_result(dtype):
    old, new = random_maps(0, OLD_SHAPES), random_maps(1, NEW_SHAPES)
    kw = dict(collapse_channels="local", labels=LABELS, index_new_class=3, pod_factor=0.01,
              pod_options=VOC_OPTIONS, nb_current_classes=5, nb_new_classes=2)
    ref = features_distillation([m.float() for m in old], [m.float() for m in new], **kw)
    half_new = [m.to(dtype).requires_grad_() for m in new]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = features_distillation([m.to(dtype) for m in old], half_new, **kw)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=1e-6)
    got.backward()
    assert all(m.grad is not None and m.grad.dtype == dtype and torch.isfinite(m.grad).all()
               for m in half_new)


# -------------------------------------------------------------- pseudo-labels, fixes
def test_entropy_normalized():
    uniform = torch.full((1, 4, 1, 1), 0.25, dtype=torch.float64)
    onehot = torch.tensor([1., 0., 0., 0.], dtype=torch.float64).reshape(1, 4, 1, 1)
    assert entropy(uniform, normalized=True).item() == pytest.approx(1.)
    assert entropy(onehot, normalized=True).item() == 0.
    # P1: a channel mean, so the uniform distribution gives 1/C (up to the 1e-8)
    assert entropy(uniform).item() == pytest.approx(0.25, rel=1e-7)


def median_of(row, true_median=False, mode="entropy", threshold=0.):
    hist = torch.tensor([row])
    return thresholds_from_histogram(hist, len(row), threshold, mode,
                                     true_median=true_median)[0].item()


def test_true_median_fixes_the_running_sum():
    row = [0, 0, 0, 10, 0, 0, 0, 0, 0, 0]
    # P2: the running sum before bin 3 is 0 + 1 + 2 = 3: median 0.3 + (5 - 3)/10 * 0.1
    assert median_of(row) == pytest.approx(0.32, rel=1e-6)
    # half of the 10 pixels are below the middle of bin 3
    assert median_of(row, true_median=True) == pytest.approx(0.35, rel=1e-6)


def test_true_median_fixes_the_missing_stop():
    # P4: half = 49.5 is never bracketed by the index sum (at most 36 + 11): k = 9 with the
    # full sum 45 and the empty last bin -> +inf
    assert median_of([11] * 9 + [0]) == math.inf
    assert median_of([11] * 9 + [0], true_median=True) == pytest.approx(0.45, rel=1e-6)
    # half = 8 below every bracket: (8 - 45) / 0 -> -inf (kept by a cap, raised by a floor)
    assert median_of([0] * 8 + [16, 0], mode="probability", threshold=1.) == -math.inf
    assert median_of([0] * 8 + [16, 0], threshold=0.001) == pytest.approx(0.001)
    assert median_of([0] * 8 + [16, 0], true_median=True) == pytest.approx(0.85, rel=1e-6)
    # half = 10 = the index sum at k = 5 over an empty bin: 0/0 -> NaN, which the floor keeps
    assert math.isnan(median_of([0] * 9 + [20], threshold=0.5))
    assert median_of([0] * 9 + [20], true_median=True) == pytest.approx(0.95, rel=1e-6)
    assert median_of([0] * 10, threshold=0.5) == 0.5  # empty class: median 0, floored


def test_thresholds_floor_and_cap():
    # one stop at bin 0: median 0 + (2 - 0)/4 * 1/3
    assert median_of([4, 0, 0], threshold=0.1) == pytest.approx(1 / 6)            # above the floor
    assert median_of([4, 0, 0], threshold=0.5) == pytest.approx(0.5)                 # floored
    assert median_of([4, 0, 0], mode="probability", threshold=0.5) == pytest.approx(1 / 6)
    assert median_of([4, 0, 0], mode="probability", threshold=0.1) == pytest.approx(0.1)  # cap


def test_histogram_same_mask_counts_old_class_pixels():
    logits = torch.zeros(1, 3, 1, 4, dtype=torch.float64)
    logits[0, 1, 0, :] = 20.   # confident class 1 everywhere
    labels = torch.tensor([[[0, 1, 2, 4]]])
    max_value = torch.log(torch.tensor(5.))
    hist = accumulate_histogram(torch.zeros(5, 100, dtype=torch.long), labels, logits, max_value,
                                "entropy", 100)
    assert hist.sum() == 1 and hist[1, 0] == 1          # P6: y = 0 only
    hist = accumulate_histogram(torch.zeros(5, 100, dtype=torch.long), labels, logits, max_value,
                                "entropy", 100, same_mask=True, n_old=3)
    assert hist.sum() == 3 and hist[1, 0] == 3          # y < n_old


def test_find_median_runs_the_old_model_in_eval_without_grad_and_syncs():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append((self.training, torch.is_grad_enabled(), images.dtype))
            return images

    model = Recorder().train()
    logits = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    logits[:, 2] = 10.
    loader = [(logits, torch.zeros(2, 2, 2, dtype=torch.long))]

    def sync(hist):  # another process saw 10 pixels of class 4
        hist[4, 0] += 10

    thresholds, max_value, hist = find_median(model, loader, "cpu", 5, mode="entropy",
                                              threshold=0.001, sync=sync, return_histogram=True)
    assert seen == [(False, False, torch.float32)] and model.training
    assert hist[2, 0] == 8 and hist[4, 0] == 10 and hist.sum() == 18
    # half of each class in bin 0: median 0.005; class 3 unseen: the floor
    assert thresholds.tolist() == pytest.approx([0.001, 0.001, 0.005, 0.001, 0.005])
    assert max_value.item() == pytest.approx(math.log(5), rel=1e-7)
    _, max_probability = find_median(model, loader, "cpu", 5)
    assert max_probability.item() == 1.0 and DEFAULT_NB_BINS == {"entropy": 100,
                                                                "probability": 20}


def test_pseudo_labels_naive_and_unsupported_modes():
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[[0, 1], [4, 255]]])
    out = pseudo_label_targets(labels, logits, None, None, 3, mode="naive")
    argmax = logits.argmax(dim=1)
    assert out.targets.tolist() == [[[argmax[0, 0, 0].item(), argmax[0, 0, 1].item()], [4, 255]]]
    for mode in ("median", "confidence", "threshold_0.5"):
        with pytest.raises(PseudoLabelError, match="supported: entropy, naive"):
            pseudo_label_targets(labels, logits, None, None, 3, mode=mode)


def test_image_without_background_factor():
    case = next(c for c in CASES["iteration"]["cases"] if c["id"] == "plop_voc_preset")
    batch = iteration_batch(case["batch"])
    assert not (batch["labels"][1] < case["n_old"]).any()   # image 1 has no background
    args = (batch, case["n_old"], case["n_cur"], case["n_new"], case["options"])
    plop = plop_iteration(*args)
    assert plop["factor"][1].item() == 0. and torch.isfinite(plop["factor"]).all()  # P9
    assert torch.isfinite(plop["loss"])
    fixed = plop_iteration(*args, bg_only=True)
    weight = fixed["factor"]
    assert weight.shape == batch["labels"].shape and torch.isfinite(fixed["loss"])
    assert (weight[1] == 1.).all()
    bg = plop["background"]
    torch.testing.assert_close(weight[bg], plop["factor"][:, None, None].expand_as(bg)[bg])
    assert (weight[~bg] == 1.).all()
    # the new-class pixels of images 0 and 2 are no longer scaled down: a larger loss
    assert fixed["loss_cls"] > plop["loss_cls"]
    # hand check on one image: 2 bg pixels, 1 accepted, 2 new-class pixels
    background = torch.tensor([[[True, True], [False, False]]])
    valid = torch.tensor([[[True, False], [True, False]]])
    expect = 1 / (2 + 1e-6)
    w = classif_adaptive_factor(background, valid, bg_only=True)
    torch.testing.assert_close(w, torch.tensor([[[expect, expect], [1., 1.]]]))
    assert classif_adaptive_factor(background, valid, min_factor=0.75).item() == 0.75


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pseudo_labels_from_half_precision_logits(dtype):
    case = next(c for c in CASES["iteration"]["cases"] if c["id"] == "plop_voc_preset")
    batch = iteration_batch(case["batch"])
    z_old = batch["old_logits"].float()
    thresholds = torch.full((5,), 0.05)
    max_entropy = torch.log(torch.tensor(5.))
    ref = pseudo_label_targets(batch["labels"], z_old, thresholds, max_entropy, 3)
    got = pseudo_label_targets(batch["labels"], z_old.to(dtype), thresholds, max_entropy, 3)
    assert torch.equal(got.mask_background, ref.mask_background)
    agree = (got.targets == ref.targets).float().mean()
    assert agree >= 0.9
    h_ref = entropy(torch.softmax(z_old, 1))
    h = entropy(torch.softmax(z_old.to(dtype), 1))
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=5e-2, atol=2e-3)


def test_normalized_entropy_thresholds_and_targets():
    # 4 pixels, 2 old classes; the uniform one goes to class 0 (first max)
    p = torch.tensor([[0.999, 0.5, 0.9, 0.7], [0.001, 0.5, 0.1, 0.3]], dtype=torch.float64)
    logits = p.log().reshape(1, 2, 1, 4)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    thresholds, max_value, hist = find_median(
        FixedOutputs(logits), [(torch.zeros(1, 3, 1, 4), labels)], "cpu", 3, mode="entropy",
        threshold=0.2, normalized_entropy=True, return_histogram=True, true_median=True)
    assert max_value.item() == 1.
    # -sum p ln p / ln 2: 0.0114, 1, 0.4690, 0.8813 -> bins 1, 99 (clamped), 46, 88
    h = entropy(torch.softmax(logits, 1), normalized=True)[0, 0]
    torch.testing.assert_close(h, torch.tensor([0.011408, 1., 0.468996, 0.881291],
                                               dtype=torch.float64), rtol=0, atol=1e-6)
    assert hist[0].nonzero()[:, 0].tolist() == [1, 46, 88, 99] and hist[1:].sum() == 0
    # true median: half = 2 pixels, reached at the end of bin 46 -> 0.47
    assert thresholds.tolist() == pytest.approx([0.47, 0.2, 0.2])
    out = pseudo_label_targets(labels, logits, thresholds, max_value, 2, normalized_entropy=True)
    assert out.targets.tolist() == [[[0, 255, 0, 255]]]


def test_find_median_under_autocast():
    seen = []
    with torch.random.fork_rng():       # fixed weights, whatever ran before in this process
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 4, 1)
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    loader = [(images, torch.zeros(2, 4, 4, dtype=torch.long))]
    kw = dict(mode="entropy", threshold=0.001, true_median=True, return_histogram=True)
    ref, _, ref_hist = find_median(model, loader, "cpu", 6, **kw)
    got, max_value, hist = find_median(model, loader, "cpu", 6, autocast=torch.bfloat16, **kw)
    assert seen == [torch.float32, torch.bfloat16]
    assert got.dtype == max_value.dtype == torch.float32 and torch.isfinite(got).all()
    assert hist.sum() == ref_hist.sum() == 32
    torch.testing.assert_close(got, ref, rtol=0.1, atol=0.02)


def test_errors_are_value_errors():
    assert issubclass(PODError, ValueError) and issubclass(PseudoLabelError, ValueError)
    with pytest.raises(PODError, match="only the last map"):
        features_distillation(random_maps(0, NEW_SHAPES[::-1]), random_maps(1, NEW_SHAPES),
                              index_new_class=3)
    with pytest.raises(PseudoLabelError, match="'entropy' or 'probability'"):
        find_median(Identity(), [], "cpu", 3, mode="median")


@pytest.mark.parametrize("options, where", [
    ({"pool": True, "spp": 1}, "pod_options keys ['spp']"),
    ({"switch": {"mask_position": "all", "after_": {}}}, "pod_options['switch'] keys ['after_']"),
    ({"switch": {"before": {"normalise": True}}},
     "pod_options['switch']['before'] keys ['normalise']"),
])
def test_misspelt_pod_options_are_refused_by_name(options, where):
    a = [torch.rand(1, 2, 4, 4)]
    with pytest.raises(PODError, match=re.escape(f"unknown {where}; known: ")):
        features_distillation(a, [t.clone() for t in a], pod_options=options)
