"""The timm bodies around the network: ``--backbone`` choices, ``timm:<name>``, the head's
rates (W1's fix), the body's optimiser groups (W8's fixes), DDP with the stage norms that
get no gradient (W11), the ImageNet-file check before a run, and the checkpoint converter
on NeST's Swin layout. Small random networks (Swin-T at 32 px, ConvNeXt-atto)."""
import io
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from argparser import build_options, get_argparser
from conftest import run_entry
from engine.body_groups import body_param_groups
from engine.build import wrap_ddp
from modules.backbones import BackboneError, TimmFeatureBody
from modules.swin import infer_swin, make_swin, merges_at_stage_end
from segmentation_module import make_model
from tools import convert_checkpoint

torch.set_num_threads(1)


def opts_for(backbone, **kw):
    values = dict(backbone=backbone, no_pretrained=True, norm_impl="torch", lr=0.01)
    values.update(kw)
    return build_options(**values)


@pytest.fixture(scope="module")
def swin_t_model():
    torch.manual_seed(0)
    return make_model(opts_for("swin_t"), classes=[3, 2])


def test_backbone_option_accepts_resnets_swins_and_timm_names():
    parser = get_argparser()
    for name in ("resnet101", "swin_b", "swin_b_224", "swin_l", "timm:convnext_atto"):
        assert parser.parse_args(["--backbone", name]).backbone == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--backbone", "swin_xl"])


def test_swin_body_gives_the_stride_32_map_to_the_head(swin_t_model):
    x = torch.randn(2, 3, 37, 50)       # not a multiple of the patch nor of any window
    swin_t_model.eval()
    logits, extras = swin_t_model(x, ret_attentions=True)
    assert logits.shape == (2, 5, 37, 50)
    assert extras["body"].shape == (2, 768, 2, 2)
    assert torch.equal(swin_t_model.body(x), extras["body"])
    # PLOP's maps: stages 1-3 after their norms, the head output, (+ the small logits): W11
    assert [tuple(a.shape[1:]) for a in extras["attentions"]] == \
        [(96, 10, 13), (192, 5, 7), (384, 3, 4), (256, 2, 2)]
    assert swin_t_model.head.map_convs[1].dilation == (6, 6)     # W1: rates of OS16


def test_head_rates_from_body_is_s1s_fix():
    model = make_model(opts_for("swin_t", head_rates_from_body=True), classes=[2])
    assert [c.dilation[0] for c in model.head.map_convs[1:]] == [3, 6, 9]


def test_any_timm_model_with_feature_maps():
    body = TimmFeatureBody("convnext_atto")
    assert body.strides == [4, 8, 16, 32] and body.out_channels == 320
    out, maps = body(torch.randn(1, 3, 64, 64), ret_attentions=True)
    assert out.shape == (1, 320, 2, 2) and [m.shape[1] for m in maps] == [40, 80, 160]
    model = make_model(opts_for("timm:convnext_atto"), classes=[4])
    assert model.eval()(torch.randn(1, 3, 64, 64))[0].shape == (1, 4, 64, 64)
    with pytest.raises(BackboneError, match="timm .* has no model 'no_such_net'"):
        TimmFeatureBody("no_such_net")


def test_body_groups_one_lr_by_default_and_the_swin_recipes_as_options(swin_t_model):
    body = swin_t_model.body
    n = len(list(body.parameters()))
    (group,) = body_param_groups(body, opts_for("swin_t", lr=0.02))
    assert len(group["params"]) == n and "lr" not in group and group["weight_decay"] == 1e-4
    decayed, free = body_param_groups(body, opts_for("swin_t", lr=0.02, body_lr_factor=0.1,
                                                     no_decay_norms=True))
    assert decayed["lr"] == pytest.approx(0.002) and free["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(free["params"]) == n
    assert all(p.ndim == 2 and p.shape[1] != 3 or p.ndim == 4 for p in decayed["params"])
    tables = [p for name, p in body.named_parameters() if name.endswith("bias_table")]
    assert all(any(t is p for p in free["params"]) for t in tables)


def test_ddp_tolerates_the_stage_norms_without_gradient(swin_t_model):
    """MiB reads no attentions: norm0..norm2 get no gradient; DDP must be told (W11)."""
    class Ctx:
        world_size, device = 2, torch.device("cpu")   # only the wrapper's choice reads it
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=0,
                                world_size=1)
        try:
            ddp = wrap_ddp(swin_t_model.train(), Ctx)
            assert ddp.find_unused_parameters
            for _ in range(2):          # the second iteration fails if DDP was not told
                ddp(torch.randn(2, 3, 32, 32))[0].sum().backward()
            assert swin_t_model.body.norm0.weight.grad is None
            assert swin_t_model.body.norm3.weight.grad is not None
        finally:
            dist.destroy_process_group()


def test_the_run_checks_for_the_swin_file_first(synthetic_voc, tmp_path):
    out = run_entry(["--data_root", synthetic_voc, "--dataset", "voc", "--task", "15-5",
                     "--backbone", "swin_b", "--pretrained_dir", "weights"], tmp_path)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ImageNet weights not found: "
                           f"weights{os.sep}swin_base_patch4_window12_384.pth")
    assert not (tmp_path / "checkpoints").exists()


def test_converter_reads_nest_swin_checkpoints(tmp_path):
    body = make_swin("swin_t")
    own = body.state_dict()
    # NeST's layout: merging at the end of a stage, index buffers saved, keys under module.body
    nest = {}
    for k, v in own.items():
        for i in (1, 2, 3):
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        nest["module.body." + k] = v
    nest["module.body.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49)
    assert infer_swin(nest) == "swin_t" and merges_at_stage_end(nest)
    torch.save({"model_state": nest}, tmp_path / "nest.pth")
    report = io.StringIO()
    convert_checkpoint.run([str(tmp_path / "nest.pth"), "--from-nest-swin", "-o",
                            str(tmp_path / "ours.pth")], out=report)
    assert "swin_t (Swin release / NeST layout" in report.getvalue()
    state = torch.load(tmp_path / "ours.pth", weights_only=False)["model_state"]
    assert {k[len("module.body."):] for k in state} == set(own)
    assert convert_checkpoint.main([str(tmp_path / "ours.pth"), "--from-nest-swin", "-o",
                                    str(tmp_path / "again.pth")]) == 1


def test_weights_from_timms_cache_when_the_folder_lacks_them(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    from safetensors.torch import save_file

    from segmentation_module import pretrained_path
    body = make_swin("swin_t")
    snapshot = tmp_path / "models--timm--swin_tiny_patch4_window7_224.ms_in1k" / "snapshots"
    (snapshot / "abc").mkdir(parents=True)
    (snapshot.parent / "refs").mkdir()
    (snapshot.parent / "refs" / "main").write_text("abc")
    save_file({k: v.contiguous() for k, v in body.state_dict().items()
               if not k.startswith("norm")}, str(snapshot / "abc" / "model.safetensors"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    assert pretrained_path("swin_t", "iabn_sync", str(tmp_path / "empty")) == \
        str(snapshot / "abc" / "model.safetensors")
    model = make_model(opts_for("swin_t", no_pretrained=False,
                                pretrained_dir=str(tmp_path / "empty")), classes=[2])
    assert torch.equal(model.body.layers[2].blocks[5].mlp.fc1.weight,
                       body.layers[2].blocks[5].mlp.fc1.weight)
