"""--method RCIL through the method lifecycle: its options do not switch on PLOP's POD or
MiB's initialisation, the networks of each role fit the checkpoints of the step before and
of the step itself, the fold and its freezing reach the optimiser and every epoch, the parts
add up to RCIL's loss (``rcil_loss``, checked against RCIL's own functions in
test_rcil_vectors.py), and a 3-step VOC 10-5-5 run on synthetic data is reproduced by --test
and by a rerun after a SIGKILL right after a fold. Expected values come from RCIL's own
definitions (docs/behaviour.md §18): the old network unfolded with both branches, the fold
frozen, main + 100 x UNKD + cube."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
import methods.rcil as rcil_family
import run
from argparser import build_options
from engine.build import make_network, make_optimizer
from methods.rcil import CubeDistillation, TwinBranches
from methods.rcil.branches import twin_layers
from methods.rcil.fold import folded_parts
from methods.rcil.loss import rcil_loss
from utils.checkpoint import load_model_state
from utils.errors import OptionError

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TASK = ["--dataset", "voc", "--task", "10-5-5"]
CLASSES = [11, 5, 5]


def step_method(step, *extra):
    opts = build_options([*TASK, "--method", "RCIL", "--backbone", "resnet18",
                          "--no_pretrained", "--step", str(step), *extra])
    info = methods.StepInfo(opts, CLASSES[:step + 1], CPU)
    return opts, methods.assemble(info)


def step_networks(step, previous_state=None, *extra):
    """The train network of ``step`` (previous step loaded non-strictly, before_step run)
    and its old network (loaded strictly), as the engine builds them."""
    opts, method = step_method(step, *extra)
    torch.manual_seed(step)
    model = make_network(opts, CLASSES[:step + 1], pretrained=False, method=method)
    old = None
    if step > 0:
        old = make_network(opts, CLASSES[:step], pretrained=False, method=method, role="old")
        load_model_state(model, previous_state, strict=False)
        load_model_state(old, previous_state, strict=True)
        old.eval()
    method.before_step(methods.StepState(model, old, None, CPU))
    return opts, method, model, old


@functools.lru_cache(maxsize=None)
def trained_state(step):
    """The state dict of ``step``'s network after its before_step (weights as built)."""
    previous = trained_state(step - 1) if step > 0 else None
    return step_networks(step, previous)[2].state_dict()


def test_the_options_switch_on_rcil_parts_only():
    _, method = step_method(1)
    assert method.names() == ["UnbiasedCE", "UnbiasedDistillation", "ClassifierWeightsInit",
                              "TwinBranches", "CubeDistillation"]
    assert [t.weight for t in method.terms] == [100, 1.0]
    opts, _ = step_method(1)
    assert opts.pod is None and not opts.init_balanced       # PLOP's POD, MiB's init: off
    # RCIL's switches alone, and PLOP's alone, keep to their own family
    only_cube = build_options([*TASK, "--step", "1", "--rcil_cube"])
    assert methods.assemble(methods.StepInfo(only_cube, [11, 5], CPU)).names() == \
        ["CrossEntropy", "CubeDistillation"]
    only_pod = build_options([*TASK, "--step", "1", "--pod", "local"])
    assert methods.assemble(methods.StepInfo(only_pod, [11, 5], CPU)).names() == \
        ["CrossEntropy", "LocalPOD"]
    # step 0: cross-entropy on the twin network
    assert step_method(0)[1].names() == ["CrossEntropy", "TwinBranches"]


def test_the_cube_needs_a_dataset_with_factors():
    opts = build_options(TASK, dataset="folder", rcil_cube=True)
    with pytest.raises(OptionError, match="voc, cityscape, ade, cityscapes_domain"):
        rcil_family.check_options(opts, set())
    assert rcil_family.check_options(build_options([*TASK, "--method", "RCIL"]), set()) == []


def test_checkpoints_load_strictly_into_the_next_step_and_the_test_network():
    state0 = trained_state(0)
    assert not any(k.endswith("conv1.bias") for k in state0 if "mod2" in k)
    _, _, model1, old1 = step_networks(1, state0)
    # the old network of step 1 is the step-0 network, unfolded, both branches running
    assert not any(layer.folded for layer in twin_layers(old1))
    assert all(layer.folded for layer in twin_layers(model1))
    state1 = model1.state_dict()
    assert sum(k.endswith("conv1.bias") for k in state1) == 8        # the folded blocks
    assert all(f"head.map_convs.{k}.bias" in state1 for k in range(4))
    # the step-1 checkpoint: strictly into step 1's --test network and step 2's old network
    opts1, method1 = step_method(1)
    final1 = make_network(opts1, CLASSES[:2], pretrained=False, method=method1, role="final")
    load_model_state(final1, state1, strict=True)
    _, _, model2, old2 = step_networks(2, state1)
    opts2, method2 = step_method(2)
    final2 = make_network(opts2, CLASSES, pretrained=False, method=method2, role="final")
    load_model_state(final2, model2.state_dict(), strict=True)
    # RCIL's old network of step 2 keeps both branches: its main norms are the identity
    for (conv, norm), _ in (layer.branches for layer in twin_layers(old2)[:-1]):
        assert conv.bias is not None and torch.all(norm.weight == 1) and norm.eps == 1e-5
    # the new network's folded branch alone equals the old network's average (in eval)
    x = torch.randn(2, 3, 32, 32)
    block_new, block_old = twin_layers(model2)[0], twin_layers(old2)[0]
    model2.eval()
    stem = old2.body.mod1(x)
    (c_new, n_new), _ = block_new.branches
    (c_old, n_old), (t_old, tn_old) = block_old.branches
    torch.testing.assert_close(n_new(c_new(stem)), 0.5 * (n_old(c_old(stem))
                                                          + tn_old(t_old(stem))))


def test_exact_reload_keeps_the_folded_norms_eps_zero():
    """RC8: a network built for a folded checkpoint has eps 1e-5 in its main norms (eps is
    not saved); with --rcil_exact_reload it has RCIL's in-memory eps 0."""
    for extra, eps in (((), 1e-5), (("--rcil_exact_reload",), 0.0)):
        opts, method = step_method(1, *extra)
        final = make_network(opts, CLASSES[:2], pretrained=False, method=method, role="final")
        layers = twin_layers(final)
        assert {layer.branches[0][1].eps for layer in layers[:-1]} == {eps}
        assert layers[-1].map_bn.eps == eps and layers[-1].map_bn_new.eps == 1e-5


def test_the_fold_is_frozen_in_the_optimiser_and_after_every_train():
    opts, method, model, _ = step_networks(1, trained_state(0))
    modules, frozen = folded_parts(model)
    assert frozen and all(not p.requires_grad for p in frozen)
    optimizer = make_optimizer(model, opts, method)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen}
    twins = [layer.branches[1][0].weight for layer in twin_layers(model)[:-1]]
    assert all(id(p) in in_optimizer for p in twins)
    model.train()
    assert all(m.training for m in modules)       # what model.train() alone does (RC25)
    method.train_mode(model)
    assert not any(m.training for m in modules)


def test_the_parts_add_up_to_rcils_loss():
    opts, method, model, old = step_networks(1, trained_state(0))
    torch.manual_seed(5)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 16, (2, 32, 32))
    labels[0, :4] = 255
    batch = methods.Batch(images, labels)
    kwargs = method.model_kwargs()
    model.train()
    method.train_mode(model)
    with torch.no_grad():
        batch.outputs_old, batch.features_old = old(images, **kwargs)
    batch.outputs, batch.features = model(images, **kwargs)
    total = method.main(batch)
    for term, value in method.term_values(batch):
        total = total + term.weight * value
    maps = batch.features["attentions"] + [batch.features["sem_logits_small"]]
    maps_old = batch.features_old["attentions"] + [batch.features_old["sem_logits_small"]]
    expected = rcil_loss(batch.outputs, batch.outputs_old, labels, maps, maps_old,
                         nb_old_classes=11, dataset="voc")
    assert torch.equal(total, expected.total)
    cube = [v for t, v in method.term_values(batch) if isinstance(t, CubeDistillation)]
    assert torch.equal(cube[0], expected.cube) and expected.cube > 0
    assert not method.terms[1].in_epoch_loss        # RC17


def test_private_rng_is_in_the_resume_state_only_with_the_fix():
    opts = build_options([*TASK, "--rcil_branches", "--rcil_private_rng"])
    method = methods.assemble(methods.StepInfo(opts, [11], CPU))
    [part] = [p for p in method.parts if isinstance(p, TwinBranches)]
    state = method.full_state()
    drawn = torch.rand(3, generator=part.generator)
    method.load_full_state(state)
    assert torch.equal(torch.rand(3, generator=part.generator), drawn)
    assert method.state_dict() == {"regularizer": None, "rcil_rng": None}
    plain = methods.assemble(methods.StepInfo(build_options([*TASK, "--method", "RCIL"]),
                                              [11], CPU))
    assert plain.full_state() == {"regularizer": None}


# --- end to end -------------------------------------------------------------------------------

def args_for(data_root, *more):
    return ["--data_root", str(data_root), *TASK, "--method", "RCIL", "--name", "RCIL",
            "--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size",
            "4", "--epochs", "1", "--lr", "0.01", "--num_workers", "0", "--no_progress", *more]


def results(workdir, step):
    path = Path(workdir) / "logs" / "10-5-5-voc" / "RCIL" / "results" / f"step-{step}.json"
    doc = json.loads(path.read_text())
    return doc["class_iou"], doc["mean_iou"]


def model_state(workdir, step):
    path = Path(workdir) / "checkpoints" / "step" / f"10-5-5-voc_RCIL_{step}.pth"
    return torch.load(path, weights_only=False)["model_state"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dataset.synthetic import generate
    root = tmp_path_factory.mktemp("rcil_voc")
    generate("voc", str(root), n_train=24, n_val=6, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Three steps in one command, then --test of each step."""
    workdir = tmp_path_factory.mktemp("rcil_ref")
    cwd = os.getcwd()
    os.chdir(workdir)
    torch.set_num_threads(1)
    try:
        run.main(args_for(data, "--step", "all"))
        trained = [results(workdir, s) for s in range(3)]
        tested = []
        for step in range(3):
            run.main(args_for(data, "--step", str(step), "--test"))
            tested.append(results(workdir, step))
    finally:
        os.chdir(cwd)
    return workdir, trained, tested


@pytest.mark.slow
def test_three_steps_and_test_reproduces_each_step(reference):
    workdir, trained, tested = reference
    assert tested == trained
    states = [model_state(workdir, s) for s in range(3)]
    # step 0 unfolded; steps 1 and 2 folded (a bias on every main conv)
    assert "module.head.map_convs.0.bias" not in states[0]
    assert all("module.head.map_convs.0.bias" in s for s in states[1:])
    # the twin trains through the steps
    key = "module.head.map_convs_new.0.weight"
    assert not torch.equal(states[1][key], states[2][key])


KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import methods.rcil as rcil
real_fold = rcil.fold_twin_branches
def fold_then_die(*args, **kwargs):
    real_fold(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)      # right after the fold of the step
rcil.fold_twin_branches = fold_then_die
import run
run.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_right_after_a_fold_then_rerun_gives_the_same_figures(reference, data,
                                                                       tmp_path):
    workdir, trained, _ = reference
    ckpts = tmp_path / "checkpoints" / "step"
    ckpts.mkdir(parents=True)
    for step in (0, 1):          # steps 0 and 1 as the reference trained them
        name = f"10-5-5-voc_RCIL_{step}.pth"
        shutil.copy(workdir / "checkpoints" / "step" / name, ckpts / name)
    args = args_for(data, "--step", "2")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    code = subprocess.run([sys.executable, "-c", KILLED.format(root=str(ROOT)), *args],
                          cwd=tmp_path, env=env, capture_output=True, timeout=600).returncode
    assert code == -signal.SIGKILL
    assert not (tmp_path / "logs" / "10-5-5-voc" / "RCIL" / "results" / "step-2.json").exists()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run.main(args)
    finally:
        os.chdir(cwd)
    assert results(tmp_path, 2) == trained[2]
    final, expected = model_state(tmp_path, 2), model_state(workdir, 2)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
