"""The Swin-B body against NeST's own module. The expected values in
tests/data/swin_vectors.json come from NeST's models/swin.py (_swin_b, commit f96185b) and
from timm 1.0.31's SwinTransformer, run on fixed random weights written in the Swin release's
file layout (``{"model": ...}``); the parameter counts and optimiser groups from NeST's
make_model and run.py. Here the same weights are replayed from their recipe, written to an
original-format file, loaded through ``make_model`` and compared stage by stage (float64)."""
import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import checkpoint_filter_fn, get_relative_position_index

from argparser import build_options
from engine.build import make_optimizer
from modules.swin import load_swin_weights, make_swin
from segmentation_module import PretrainedWeightsNotFound, make_model
from utils.checkpoint import CheckpointError

torch.set_num_threads(1)
VECTORS = json.loads((Path(__file__).parent / "data" / "swin_vectors.json").read_text())
RTOL, ATOL = 1e-9, 1e-8
SHIFTED_384 = {0: [1], 1: [1], 2: [1, 3, 5, 7, 9, 11, 13, 15, 17]}     # blocks with a mask


@functools.lru_cache(maxsize=1)
def _original_file_state():
    """The weights of the recipe in the Swin release's layout: parameters (with the final
    ``norm`` and the classifier ``head``), merging at the end of a stage, and the index and
    mask buffers the classifier saves (the masks are dropped on load: zeros of their shape)."""
    rng = np.random.default_rng(VECTORS["weights"]["seed"])
    state = {}
    for name, shape, mean, std in VECTORS["weights"]["params"]:
        state[name] = torch.from_numpy(
            (mean + std * rng.standard_normal(tuple(shape))).astype(np.float32))
    index = get_relative_position_index(12, 12)
    for name in list(state):
        if name.endswith("attn.relative_position_bias_table"):
            block = name[: -len("attn.relative_position_bias_table")]
            state[block + "attn.relative_position_index"] = index.clone()
    sizes = [96, 48, 24]
    for stage, blocks in SHIFTED_384.items():
        windows = (sizes[stage] // 12) ** 2
        for j in blocks:
            state[f"layers.{stage}.blocks.{j}.attn_mask"] = torch.zeros(windows, 144, 144)
    return state


def original_file_state():
    return dict(_original_file_state())


def swin_opts(pretrained_dir, **kw):
    values = dict(backbone="swin_b", no_pretrained=False, pretrained_dir=str(pretrained_dir),
                  norm_impl="torch", lr=0.02, weight_decay=1e-4)
    values.update(kw)
    return build_options(**values)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained")
    torch.save({"model": original_file_state()}, folder / "swin_base_patch4_window12_384.pth")
    return folder


@pytest.fixture(scope="module")
def model(weights_dir):
    return make_model(swin_opts(weights_dir), classes=[16])


@pytest.fixture(scope="module")
def body64(model):
    return copy.deepcopy(model.body).double().eval()


def check_stats(tag, a, st):
    assert list(a.shape) == st["shape"], tag
    B, C, H, W = a.shape
    pattern = ((np.arange(B).reshape(-1, 1, 1, 1) + 1.0)
               * np.cos(0.1 * np.arange(C).reshape(1, -1, 1, 1)
                        + 0.7 * np.arange(H).reshape(1, 1, -1, 1)
                        + 1.3 * np.arange(W).reshape(1, 1, 1, -1)))
    got = [a.sum(), a.mean(), np.abs(a).sum(), (a * a).sum(), (a * pattern).sum()]
    want = [st[k] for k in ("sum", "mean", "abs_sum", "sq_sum", "weighted_sum")]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=tag)
    pos = [s[:4] for s in st["samples"]]
    np.testing.assert_allclose([a[b, c, h, w] for b, c, h, w in pos],
                               [s[4] for s in st["samples"]], rtol=RTOL, atol=ATOL,
                               err_msg=tag)


def stages_of(body, case):
    x = torch.from_numpy(np.random.default_rng(case["input_seed"])
                         .standard_normal(case["input_shape"]))
    with torch.no_grad():
        out, first = body(x, ret_attentions=True)
    return [m.numpy() for m in first + [out]]


def case(name):
    return next(c for c in VECTORS["forward"] if c["name"] == name)


@pytest.mark.parametrize("name", ["odd_70x50_b2", "square_96"])
def test_every_stage_equals_nests_module(body64, name):
    """Padding at every stage (70x50, batch 2: odd merges too) and maps inside one window
    (96x96): NeST pads before it shifts, which the body reproduces."""
    for i, a in enumerate(stages_of(body64, case(name))):
        check_stats(f"{name} stage {i + 1}", a, case(name)["variants"]["nest"][i])


@pytest.mark.slow
def test_every_stage_equals_nests_module_at_384(body64):
    for i, a in enumerate(stages_of(body64, case("square_384"))):
        check_stats(f"384 stage {i + 1}", a, case("square_384")["variants"]["nest"][i])


def test_timm_order_is_the_fix_and_gives_timms_numbers(body64):
    """--swin_shift_order timm: timm's own block (shift, then pad), whose maps differ from
    NeST's wherever a stage is padded."""
    body = make_swin("swin_b", shift_order="timm", init_weights=False).double().eval()
    body.load_state_dict(body64.state_dict())
    c = case("odd_70x50_b2")
    maps = stages_of(body, c)
    for i, a in enumerate(maps):
        check_stats(f"timm order stage {i + 1}", a, c["variants"]["timm_always_partition"][i])
    assert np.abs(maps[0] - stages_of(body64, c)[0]).max() > 1e-3


def test_structure_and_optimiser_groups_are_nests(model):
    params = list(model.body.parameters())
    assert [len(params), sum(p.numel() for p in params)] == \
        VECTORS["structure"]["nest_body_params"]
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for layer in model.body.layers for b in layer.blocks]
    np.testing.assert_allclose(rates, VECTORS["structure"]["drop_path_nest"], rtol=1e-6,
                               atol=1e-7)
    # no index buffer in the state dict (NeST saves 24 of them in every checkpoint: W10)
    assert not [k for k in model.state_dict() if "relative_position_index" in k]
    opts = swin_opts("unused")
    groups = make_optimizer(model, opts).param_groups
    expected = VECTORS["optimizer_step0"]["groups"]
    assert [(len(g["params"]), sum(p.numel() for p in g["params"]), g["lr"],
             g["weight_decay"], g["momentum"], g["nesterov"]) for g in groups] == \
        [(e["n_tensors"], e["n_elements"], e["lr"], e["weight_decay"], e["momentum"],
          e["nesterov"]) for e in expected]


def test_loaded_values_are_the_file_and_stage_norms_start_at_one_zero(model):
    file_state = original_file_state()
    body = model.body.state_dict()
    assert torch.equal(body["layers.1.downsample.reduction.weight"],
                       file_state["layers.0.downsample.reduction.weight"])   # merging moved
    assert torch.equal(body["layers.2.blocks.17.attn.relative_position_bias_table"],
                       file_state["layers.2.blocks.17.attn.relative_position_bias_table"])
    for i in range(4):
        assert torch.equal(body[f"norm{i}.weight"], torch.ones_like(body[f"norm{i}.weight"]))
        assert torch.equal(body[f"norm{i}.bias"], torch.zeros_like(body[f"norm{i}.bias"]))


def test_a_timm_format_file_gives_the_same_network(model, tmp_path):
    body = make_swin("swin_b", init_weights=False)
    timm_state = checkpoint_filter_fn(original_file_state(), body)
    assert "layers.1.downsample.reduction.weight" in timm_state   # timm's layout
    torch.save(timm_state, tmp_path / "timm.pth")
    load_swin_weights(body, str(tmp_path / "timm.pth"))
    ref = model.body.state_dict()
    assert {k: v.shape for k, v in body.state_dict().items()} == \
        {k: v.shape for k, v in ref.items()}
    assert all(torch.equal(v, ref[k]) for k, v in body.state_dict().items())
    # W2's fix: norm3 from the file's final norm
    load_swin_weights(body, str(tmp_path / "timm.pth"), norm3_from_file=True)
    assert torch.equal(body.norm3.weight, timm_state["norm.weight"])


def test_any_other_difference_is_one_clear_error(tmp_path):
    body = make_swin("swin_t", init_weights=False)
    state = dict(body.state_dict())
    state["layers.0.blocks.0.attn.extra"] = torch.zeros(1)
    del state["layers.3.blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"1 missing \(layers.3.blocks.1.mlp.fc2.bias\)"
                                              r".*1 unexpected"):
        load_swin_weights(body, str(tmp_path / "bad.pth"))
    # a window-12 file into a window-7 body: the tables do not fit and are not resized (W7)
    state = dict(body.state_dict())
    state["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(529, 3)
    torch.save({"model": state}, tmp_path / "w12.pth")
    with pytest.raises(CheckpointError, match="another window size.*has window 7"):
        load_swin_weights(body, str(tmp_path / "w12.pth"))


def test_a_missing_file_says_which_file_and_where(tmp_path):
    with pytest.raises(PretrainedWeightsNotFound,
                       match=r"swin_base_patch4_window12_384\.pth.*Swin Transformer releases"):
        make_model(swin_opts(tmp_path), classes=[16])
