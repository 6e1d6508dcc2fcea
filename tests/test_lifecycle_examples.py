"""The five lifecycle examples of docs/adding_a_method.md, loaded from the page itself: each
trains two steps of a synthetic VOC 15-5 task through run.main with the unchanged core,
`--test` reproduces its figures, and a process killed with SIGKILL at the worst moment for a
hook (between two epochs, during after_step, right after the memory file is written, after
the final checkpoint) reruns to the same figures. Expected values come from the examples'
own definitions (a frozen body keeps the step-0 weights, a merge keeps the outputs, ...)."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from dataset.remap import apply_lut
from methods import registry

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "adding_a_method.md"
FILES = {"UNK": "unknown_channel", "FRZ": "frozen_body", "REP": "replay",
         "BRM": "branch_merge", "SAL": "saliency_weight"}
EPOCHS = {"FRZ": 2}         # FRZ is killed between its two epochs


def family_source(module_name):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    [source] = [b for b in blocks if b.startswith(f"# methods/{module_name}.py\n")]
    return source


def load_family(module_name):
    """The example module, as if it were methods/<module_name>.py."""
    spec = importlib.util.spec_from_loader(f"methods.{module_name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "methods"
    exec(compile(family_source(module_name), str(DOC), "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module


class registered:
    """The example family registered after the others while the block runs."""

    def __init__(self, method):
        self.module = load_family(FILES[method])

    def __enter__(self):
        self.saved = registry._FAMILIES
        registry._FAMILIES = registry.families() + [self.module]
        return self.module

    def __exit__(self, *exc):
        registry._FAMILIES = self.saved


def write_saliency_maps(data_root):
    """A saliency map per image: a copy of its label mask (so that the joint transform can
    be checked pixel for pixel against the label)."""
    voc = Path(data_root) / "PascalVOC12"
    (voc / "saliency").mkdir(exist_ok=True)
    for mask in (voc / "SegmentationClassAug").glob("*.png"):
        shutil.copy(mask, voc / "saliency" / mask.name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dataset.synthetic import generate
    root = tmp_path_factory.mktemp("lifecycle_voc")
    generate("voc", str(root), n_train=28, n_val=8, size=32, seed=3)
    write_saliency_maps(root)
    return root


def args_for(data_root, method, *more):
    return ["--data_root", str(data_root), "--dataset", "voc", "--task", "15-5",
            "--method", method, "--name", method, "--backbone", "resnet18", "--no_pretrained",
            "--crop_size", "24", "--batch_size", "4", "--epochs", str(EPOCHS.get(method, 1)),
            "--lr", "0.01", "--num_workers", "0", "--no_progress", *more]


def results(workdir, method, step):
    path = Path(workdir) / "logs" / "15-5-voc" / method / "results" / f"step-{step}.json"
    doc = json.loads(path.read_text())
    return doc["class_iou"], doc["mean_iou"]


def checkpoint(workdir, method, step, suffix=".pth"):
    return Path(workdir) / "checkpoints" / "step" / f"15-5-voc_{method}_{step}{suffix}"


_REFERENCE = {}


@pytest.fixture
def reference(data, tmp_path_factory):
    """The uninterrupted two-step run of an example (once per example), then --test."""
    def get(method):
        if method not in _REFERENCE:
            workdir = tmp_path_factory.mktemp(f"ref_{method}")
            cwd = os.getcwd()
            os.chdir(workdir)
            torch.set_num_threads(1)
            try:
                with registered(method):
                    run.main(args_for(data, method, "--step", "all"))
                    trained = results(workdir, method, 1)
                    run.main(args_for(data, method, "--step", "1", "--test"))
            finally:
                os.chdir(cwd)
            _REFERENCE[method] = (workdir, trained)
        return _REFERENCE[method]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", list(FILES))
def test_each_example_trains_two_steps_and_test_reproduces_its_figures(reference, method):
    workdir, trained = reference(method)
    assert results(workdir, method, 1) == trained          # --test gave the same figures
    assert 0 <= trained[1] <= 1
    ckpt1 = torch.load(checkpoint(workdir, method, 1), weights_only=False)
    ckpt0 = torch.load(checkpoint(workdir, method, 0), weights_only=False)
    assert ckpt1["resume_state"]["after_step"] is True
    state0, state1 = ckpt0["model_state"], ckpt1["model_state"]
    if method == "UNK":
        assert state1["module.unknown.weight"].shape[0] == 1
    if method == "FRZ":
        body = [k for k in state1 if k.startswith("module.body.")]
        assert body and all(torch.equal(state0[k], state1[k]) for k in body)
        head = [k for k in state1 if k.startswith("module.head.") and k.endswith("weight")]
        assert any(not torch.equal(state0[k], state1[k]) for k in head)
        assert ckpt1["scheduler_state"]["base_lrs"] == [0.01, pytest.approx(0.1)]
    if method == "REP":
        memories = [torch.load(checkpoint(workdir, method, s, ".memory.pth"),
                               weights_only=False) for s in (0, 1)]
        kept0, kept1 = memories[0]["replay"]["entries"], memories[1]["replay"]["entries"]
        assert kept0 and set(kept0) < set(kept1)
        from utils.checkpoint import sha256_of
        assert ckpt0["meta"]["memory_sha256"] == sha256_of(
            checkpoint(workdir, method, 0, ".memory.pth"))
        events = [json.loads(line) for line in
                  (workdir / "logs/15-5-voc" / method / "events.jsonl").read_text().splitlines()]
        starts = {e["step"]: e for e in events if e["event"] == "start"}
        [index1] = list(workdir.glob("**/train-1.npy"))
        assert starts[1]["train_images"] == len(np.load(index1)) + len(kept0)
    if method == "BRM":
        assert not any("branch" in k for k in list(state0) + list(state1))


def test_the_branch_merge_keeps_the_outputs():
    module = load_family("branch_merge")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=2, dilation=2),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    module.replace_convs(net, module.with_branch)
    for m in net.modules():
        if isinstance(m, module.BranchedConv):
            torch.nn.init.normal_(m.branch.weight)
            torch.nn.init.normal_(m.branch.bias)
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    module.replace_convs(net, module.BranchedConv.merged)
    assert not any(isinstance(m, module.BranchedConv) for m in net.modules())
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_an_extra_map_is_transformed_with_the_label(data):
    from dataset.seeding import sample_seed
    from dataset.transform import train_transform
    from dataset.voc import VOCSegmentationIncremental
    dst = VOCSegmentationIncremental(str(data), train=True, transform=train_transform(24),
                                     labels=list(range(1, 16)), idxs_path=None,
                                     progress=False, save_index=False)
    plain = dst[(0, sample_seed(1, 0, 0))]
    assert isinstance(plain, tuple) and len(plain) == 2     # the original's (image, label)
    dst.extra_maps = ("saliency",)
    for k in range(4):
        item = dst[(k, sample_seed(1, 0, k))]
        assert set(item) == {"image", "label", "extras"}
        torch.testing.assert_close(apply_lut(item["extras"]["saliency"], dst.lut), item["label"])
        if k == 0:
            assert torch.equal(item["image"], plain[0]) and torch.equal(item["label"], plain[1])


# the child of a killed run: the example registered, the kill point patched in
CHILD = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_lifecycle_examples import load_family
from methods import registry
module = load_family({module!r})
registry._FAMILIES.append(module)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

where = {where!r}
if where == "epoch":                       # step 1, between its two epochs
    import train
    real = train.Trainer.train
    def patched(self, epoch, *a, **k):
        if epoch == 1:
            die()
        return real(self, epoch, *a, **k)
    train.Trainer.train = patched
elif where == "after_step":                # step 1, after the merge, before its checkpoint
    real = module.BranchMerge.after_step
    def patched(self, step):
        real(self, step)
        die()
    module.BranchMerge.after_step = patched
elif where == "memory":                    # right after step 1's memory file is written
    import engine.loop
    real = engine.loop.sha256_of
    def patched(path):
        if str(path).endswith("_1.memory.pth"):
            die()
        return real(path)
    engine.loop.sha256_of = patched
import run
run.main(sys.argv[1:])
"""


def copy_step0(ref_dir, workdir, method):
    (workdir / "checkpoints" / "step").mkdir(parents=True)
    for suffix in (".pth", ".memory.pth"):       # step 0 as the reference trained it
        if checkpoint(ref_dir, method, 0, suffix).exists():
            shutil.copy(checkpoint(ref_dir, method, 0, suffix),
                        checkpoint(workdir, method, 0, suffix))


def run_child(args, cwd, method, where, err):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    script = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"),
                          module=FILES[method], where=where)
    with open(err, "w") as f:
        return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=f, timeout=600).returncode


@pytest.mark.slow
@pytest.mark.parametrize("method, where", [("FRZ", "epoch"), ("BRM", "after_step"),
                                           ("REP", "memory")])
def test_sigkill_at_the_worst_moment_of_a_hook_then_rerun_gives_the_same_figures(
        reference, data, tmp_path, method, where):
    ref_dir, trained = reference(method)
    killed = tmp_path / "killed"
    copy_step0(ref_dir, killed, method)
    args = args_for(data, method, "--step", "1")
    err = tmp_path / "killed.err"
    assert run_child(args, killed, method, where, err) == -signal.SIGKILL, \
        err.read_text()[-3000:]
    after_step_done = torch.load(checkpoint(killed, method, 1), weights_only=False) \
        .get("resume_state", {}).get("after_step", False)
    assert not after_step_done
    err = tmp_path / "resumed.err"
    assert run_child(args, killed, method, "none", err) == 0, err.read_text()[-3000:]
    assert results(killed, method, 1) == trained


class Stopped(RuntimeError):
    pass


@pytest.mark.slow
def test_a_step_stopped_after_its_final_checkpoint_resumes_to_its_test_without_after_step(
        reference, data, tmp_path, monkeypatch):
    """What a kill leaves between the final checkpoint and the manifest's record (the same
    files on disk, reached here in-process to save a process start)."""
    from utils.manifest import Manifest
    ref_dir, trained = reference("BRM")
    copy_step0(ref_dir, tmp_path, "BRM")
    monkeypatch.chdir(tmp_path)
    args = args_for(data, "BRM", "--step", "1")
    real_mark = Manifest.mark_finished

    def stop(*a, **k):
        raise Stopped
    with registered("BRM") as module:
        monkeypatch.setattr(Manifest, "mark_finished", stop)
        with pytest.raises(Stopped):
            run.main(args)
        assert torch.load(checkpoint(tmp_path, "BRM", 1),
                          weights_only=False)["resume_state"]["after_step"] is True
        monkeypatch.setattr(Manifest, "mark_finished", real_mark)
        ran = []
        monkeypatch.setattr(module.BranchMerge, "after_step", lambda self, step: ran.append(1))
        run.main(args)
    assert ran == []
    assert results(tmp_path, "BRM", 1) == trained
