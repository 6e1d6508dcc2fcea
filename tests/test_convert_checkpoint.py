"""tools/convert_checkpoint.py on fake checkpoints in the original's formats."""
import io
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from modules import make_resnet, norm_act_factory
from tools import convert_checkpoint as tool

ROOT = Path(__file__).resolve().parent.parent


def _body_keys(backbone):
    return list(make_resnet(backbone, norm_act_factory("iabn")).state_dict())


@pytest.fixture(scope="module")
def resnet50_keys():
    return _body_keys("resnet50")


def _step_checkpoint(path, body_keys, classes=(16, 5)):
    """A step checkpoint as the original writes it (docs/behaviour.md §10.7); body tensors
    kept tiny."""
    state = OrderedDict((f"module.body.{k}", torch.zeros(1)) for k in body_keys)
    state["module.head.red_bn.weight"] = torch.ones(256)
    for k, n in enumerate(classes):
        state[f"module.cls.{k}.weight"] = torch.randn(n, 256, 1, 1)
        state[f"module.cls.{k}.bias"] = torch.randn(n)
    checkpoint = {"epoch": 30, "model_state": state, "optimizer_state": {"state": {}},
                  "scheduler_state": {"last_epoch": 7}, "best_score": 0.0,
                  "trainer_state": {"regularizer": None}}
    torch.save(checkpoint, path)
    return checkpoint


def _run(argv):
    out = io.StringIO()
    tool.run([str(a) for a in argv], out=out)
    return out.getvalue()


def test_inspect_step_checkpoint(tmp_path, resnet50_keys):
    path = tmp_path / "15-5-voc_MiB_1.pth"
    _step_checkpoint(path, resnet50_keys)
    report = _run([path])
    assert f"model keys: {len(resnet50_keys) + 5} in 'model_state'" in report
    assert "prefixed" in report and "unprefixed" not in report
    assert "backbone: resnet50" in report
    assert "classes per step: [16, 5] (total 21" in report
    assert "epoch: 30" in report
    assert "optimizer_state: dict" in report and "best_score: 0.0" in report
    listing = _run([path, "--keys"])
    assert "module.cls.1.weight\t[5, 256, 1, 1]" in listing
    assert "written by: the original code or another tool" in report


def test_inspect_reads_the_record_of_this_projects_checkpoints(tmp_path, resnet50_keys):
    from argparser import build_options
    from utils.checkpoint import checkpoint_meta, fingerprint
    path = tmp_path / "15-5-voc_MiB_1.pth"
    ckpt = _step_checkpoint(path, resnet50_keys)
    opts = build_options(["--task", "15-5", "--step", "1", "--method", "MiB", "--name", "MiB",
                          "--epochs", "30"])
    ckpt["meta"] = checkpoint_meta(opts, [16, 5], fingerprint(opts, 1))
    torch.save(ckpt, path)
    assert ("written by: this project (mib-port/1), finished step 1 of 15-5-voc, run 'MiB', "
            "method MiB, 30 epochs") in _run([path])
    ckpt["epoch"] = 4
    torch.save(ckpt, path)
    assert "unfinished step 1" in _run([path])


def test_strip_then_add_prefix_round_trip_and_input_untouched(tmp_path, resnet50_keys):
    path = tmp_path / "ckpt.pth"
    original = _step_checkpoint(path, resnet50_keys)
    before = path.read_bytes()
    plain, back = tmp_path / "plain.pth", tmp_path / "back.pth"
    assert "model keys unprefixed" in _run([path, "--strip-prefix", "-o", plain])
    assert path.read_bytes() == before
    stripped = torch.load(plain, weights_only=False)
    assert all(not k.startswith("module.") for k in stripped["model_state"])
    assert stripped["scheduler_state"] == {"last_epoch": 7} and stripped["epoch"] == 30
    _run([plain, "--add-prefix", "-o", back])
    restored = torch.load(back, weights_only=False)
    assert list(restored["model_state"]) == list(original["model_state"])
    for k, v in original["model_state"].items():
        assert torch.equal(restored["model_state"][k], v)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left nothing behind


def test_never_overwrites_without_being_asked(tmp_path, resnet50_keys, capsys):
    path = tmp_path / "ckpt.pth"
    _step_checkpoint(path, resnet50_keys)
    before = path.read_bytes()
    assert tool.main([str(path), "--strip-prefix", "-o", str(path)]) == 1
    err = capsys.readouterr().err
    assert "is the input file" in err and "--overwrite" in err and err.count("\n") == 1
    assert path.read_bytes() == before
    assert tool.main([str(path), "--strip-prefix", "-o", str(path), "--overwrite"]) == 0
    assert all(not k.startswith("module.")
               for k in torch.load(path, weights_only=False)["model_state"])


@pytest.mark.parametrize("argv, message", [(["--strip-prefix"], "-o OUT"),
                                           (["-o", "x.pth"], "--strip-prefix or --add-prefix")])
def test_bad_combinations(tmp_path, resnet50_keys, capsys, argv, message):
    path = tmp_path / "ckpt.pth"
    _step_checkpoint(path, resnet50_keys)
    assert tool.main([str(path)] + argv) == 1
    assert message in capsys.readouterr().err


def test_missing_or_foreign_file(tmp_path, capsys):
    assert tool.main([str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth" in capsys.readouterr().err
    torch.save({"epoch": 1, "notes": "no weights"}, tmp_path / "other.pth")
    assert tool.main([str(tmp_path / "other.pth")]) == 1
    assert "no model state" in capsys.readouterr().err


def test_imagenet_file_and_script_entry(tmp_path):
    keys = _body_keys("resnet18")
    state = OrderedDict((f"module.{k}", torch.zeros(1)) for k in keys)
    state["module.classifier.fc.weight"] = torch.zeros(1000, 512)
    state["module.classifier.fc.bias"] = torch.zeros(1000)
    state["module.mod1.bn1.num_batches_tracked"] = torch.tensor(3)
    path = tmp_path / "resnet18_iabn_sync.pth.tar"
    torch.save({"state_dict": state, "epoch": 90}, path)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"),
                           str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "in 'state_dict'" in done.stdout
    assert "backbone: resnet18" in done.stdout
    assert "ImageNet classifier: present" in done.stdout
    assert "num_batches_tracked entries: 1" in done.stdout
    assert "classes per step: none" in done.stdout
