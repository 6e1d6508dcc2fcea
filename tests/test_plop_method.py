"""PLOP as a method of this project: its options and preset, the network's feature maps, the
trainer running its parts exactly as PLOP's functions compose them, bf16 safety, and the
thresholds under two processes. (PLOP's own vectors: tests/test_plop_functions.py; end to end
through run.py: tests/test_plop_e2e.py.)"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_helpers import RecordingSGD, grads_of

import methods
from argparser import OptionError, build_options, parse_options
from methods.plop import (
    classif_adaptive_factor,
    features_distillation,
    find_median,
    pseudo_label_targets,
)
from segmentation_module import make_model
from train import AMP_DTYPES, Trainer
from utils.loss import PixelCrossEntropy

CPU = torch.device("cpu")
CLASSES = [16, 1]           # step 1 of 15-5s (15-1)
POD_PRESET = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}

torch.set_num_threads(1)


# --- options ------------------------------------------------------------------------------

def test_the_preset_is_plops():
    opts = parse_options(["--method", "plop", "--task", "15-5s", "--step", "1"])
    assert (opts.method, opts.pod, opts.pod_factor, opts.pod_logits) == ("PLOP", "local", 0.01,
                                                                          True)
    assert opts.pod_options == POD_PRESET
    assert (opts.pseudo, opts.threshold, opts.classif_adaptive_factor) == ("entropy", 0.001,
                                                                           True)
    assert opts.init_balanced and opts.loss_kd == 0 and not opts.unce and not opts.unkd
    # PLOP's own defaults when the preset is not used
    plain = parse_options([])
    assert (plain.pod, plain.pod_factor, plain.pod_prepro, plain.spp_scales) == (
        None, 5.0, "pow", [1, 2, 4])
    assert (plain.threshold, plain.pseudo, plain.pseudo_nb_bins) == (0.9, None, None)
    assert plain.protocol == "mib"


def test_the_preset_overwrites_explicit_options_unless_asked_p14():
    opts = parse_options(["--method", "PLOP", "--threshold", "0.05"])
    assert opts.threshold == 0.001
    assert any("threshold" in w and "overriding" in w for w in opts.warnings)
    kept = parse_options(["--method", "PLOP", "--threshold", "0.05",
                          "--explicit_overrides_preset"])
    assert kept.threshold == 0.05


def test_plops_ade_command_line_parses():
    opts = parse_options(["--dataset", "ade", "--task", "100-50", "--method", "FT", "--pod",
                          "local", "--pod_factor", "0.001", "--pod_logits", "--pseudo",
                          "entropy", "--threshold", "0.001", "--classif_adaptive_factor",
                          "--init_balanced", "--pod_options",
                          '{"switch": {"after": {"extra_channels": "sum", "factor": 1e-05, '
                          '"type": "local"}}}'])
    assert opts.pod_options["switch"]["after"]["factor"] == 1e-05


@pytest.mark.parametrize("argv, warning", [
    (["--pod_apply", "last"], "--pod_apply is accepted but has no effect"),
    (["--pod_interpolate_last"], "--pod_interpolate_last is accepted but has no effect"),
    (["--step_threshold", "0.5"], "--step_threshold is accepted but has no effect"),
    (["--pseudo", "entropy_0.3"], "the suffix after '_' has no effect"),
])
def test_options_plop_ignores_are_accepted_with_a_warning(argv, warning):
    assert any(warning in w for w in parse_options(argv).warnings)


@pytest.mark.parametrize("argv, message", [
    (["--ce_on_pseudo"], "ablations of PLOP's paper"),
    (["--pseudo_soft", "soft_uncertain"], "ablations of PLOP's paper"),
    (["--pseudo", "median"], "this project implements entropy, naive"),
    (["--protocol", "plop", "--no_mask"], "--no_mask does not exist under --protocol plop"),
])
def test_options_this_project_cannot_honour_are_one_error(argv, message):
    with pytest.raises(OptionError, match=message):
        parse_options(argv)


def test_bad_pod_options_json_is_one_line(capsys):
    import run
    with pytest.raises(SystemExit) as e:
        run.main(["--pod_options", "{switch"])
    assert e.value.code == 1
    assert "--pod_options is not valid JSON" in capsys.readouterr().err


def test_plop_options_are_in_the_fingerprint():
    keys = methods.fingerprint_keys()
    assert {"pod", "pod_factor", "pod_options", "pseudo", "threshold",
            "classif_adaptive_factor", "entropy_normalized", "sync_thresholds"} <= set(keys)


# --- the network's maps -------------------------------------------------------------------

@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    opts = build_options(backbone="resnet18", no_pretrained=True)
    return make_model(opts, CLASSES), make_model(opts, CLASSES[:1])


def test_attentions_are_the_pre_activation_sums_only_when_asked(networks):
    model, _ = networks
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hooks = [stage[-1].register_forward_hook(lambda m, i, out: seen.append(out))
             for stage in (model.body.mod2, model.body.mod3, model.body.mod4, model.body.mod5)]
    with torch.no_grad():
        plain, extras = model(x)
        assert extras == {}
        logits, maps = model(x, ret_attentions=True)
    for h in hooks:
        h.remove()
    assert torch.equal(plain, logits)
    assert all(torch.is_tensor(out) for out in seen[:4])     # no extra output when not asked
    a = maps["attentions"]
    assert [t.shape[1] for t in a] == [64, 128, 256, 512, 256]
    assert a[-1] is maps["pre_logits"]
    # each block's output is leaky-ReLU of the map PLOP distils, which is kept un-activated
    for s, (pre, (out, kept)) in enumerate(zip(a[:4], seen[4:])):
        assert kept is pre
        torch.testing.assert_close(torch.nn.functional.leaky_relu(pre, 0.01), out)
        torch.testing.assert_close(out, seen[s])        # the same as without the maps
        assert (pre < 0).any()
    assert maps["sem_logits_small"].shape == (2, 17, 2, 2)
    assert torch.equal(maps["body"], seen[-1][0])


def test_state_dict_names_do_not_change(networks):
    model, _ = networks
    assert all(k.startswith(("body.", "head.", "cls.")) for k in model.state_dict())
    assert "body.mod5.block2.convs.bn2.running_var" in model.state_dict()


# --- the trainer runs PLOP's composition --------------------------------------------------

def _step1(networks, *argv, amp="off"):
    model, model_old = networks
    model_old.eval()
    opts = build_options(["--method", "PLOP", "--task", "15-5s", "--step", "1",
                          "--no_progress", *argv], amp=amp)
    info = methods.StepInfo(opts, CLASSES, CPU)
    method = methods.assemble(info)
    return opts, method


def _batch(seed, no_background_in_first=False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.randint(0, 17, (2, 32, 32), generator=g)
    labels[:, :8] = 0
    labels[:, 8:12] = 16                              # the new class
    if no_background_in_first:
        labels[0] = 16
    return images, labels


def test_one_iteration_equals_plops_functions(networks):
    model, model_old = networks
    opts, method = _step1(networks)
    assert [type(p).__name__ for p in method.parts] == ["CrossEntropy", "BackgroundInit",
                                                        "PseudoLabels", "LocalPOD"]
    images, labels = _batch(1)
    pseudo_part = method.parts[2]
    pseudo_part.before_step(methods.StepState(model, model_old, [(images, labels)], CPU))
    thresholds, max_entropy = find_median(model_old, [(images, labels)], CPU, 17,
                                          mode="entropy", threshold=0.001)
    assert torch.equal(pseudo_part.thresholds, thresholds)

    model.train()
    with torch.no_grad():
        z_old, f_old = model_old(images, ret_attentions=True)
    pseudo = pseudo_label_targets(labels, z_old, thresholds, max_entropy, 16)
    factor = classif_adaptive_factor(pseudo.mask_background, pseudo.mask_valid)
    z, f = model(images, ret_attentions=True)
    ce = PixelCrossEntropy(reduction="none")(z, pseudo.targets)
    pod = features_distillation(f_old["attentions"] + [f_old["sem_logits_small"]],
                                f["attentions"] + [f["sem_logits_small"]],
                                collapse_channels="local", labels=pseudo.targets,
                                index_new_class=16, pod_factor=0.01, pod_options=POD_PRESET,
                                outputs_old=z_old, nb_current_classes=17, nb_new_classes=1)
    expected = (factor[:, None, None] * ce).mean() + pod
    params = [p for p in model.parameters() if p.requires_grad]
    reference = grads_of(expected, params)

    trainer = Trainer(model, model_old, CPU, opts, classes=CLASSES, method=method)
    optim = RecordingSGD(params)
    result = trainer.train(0, optim, [(images, labels)])
    for got, want in zip(optim.seen[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the epoch statistics leave POD out, as PLOP (P15); the records name it
    assert result.main == pytest.approx(float((factor[:, None, None] * ce).mean().detach()),
                                        rel=1e-5)
    assert result.reg == 0.0
    assert result.terms["pod"] == pytest.approx(float(pod.detach()), rel=1e-4)
    # validation: no old model, no pseudo-labels, no POD
    assert not method.needs_old(validation=True) and method.model_kwargs(validation=True) == {}


def test_pod_in_epoch_loss_fix_counts_it(networks):
    model, model_old = networks
    opts, method = _step1(networks, "--pod_in_epoch_loss")
    images, labels = _batch(2)
    method.before_step(methods.StepState(model, model_old, [(images, labels)], CPU))
    trainer = Trainer(model, model_old, CPU, opts, classes=CLASSES, method=method)
    result = trainer.train(0, RecordingSGD(model.parameters()), [(images, labels)])
    assert result.reg == pytest.approx(result.terms["pod"], rel=1e-6) and result.reg > 0


def test_bf16_and_an_image_without_background_stay_finite(networks):
    model, model_old = networks
    opts, method = _step1(networks, amp="bf16")
    images, labels = _batch(3, no_background_in_first=True)
    method.before_step(methods.StepState(model, model_old, [(images, labels)], CPU,
                                         amp_dtype=AMP_DTYPES["bf16"]))
    trainer = Trainer(model, model_old, CPU, opts, classes=CLASSES, method=method)
    optim = RecordingSGD(model.parameters())
    result = trainer.train(0, optim, [(images, labels)])
    assert all(torch.isfinite(torch.tensor(v)) for v in (result.main, result.terms["pod"]))
    assert all(g is None or torch.isfinite(g).all() for g in optim.seen[0])


# --- thresholds under two processes (P7 and its fix) ---------------------------------------

class _Logits(torch.nn.Module):
    """An old model whose logits are the images themselves."""

    def forward(self, x):
        return x, {}


def _threshold_worker(rank, init_file, out_dir):
    from utils import distributed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(10 + rank)
        logits = torch.randn(4, 5, 6, 6, generator=g) * (1 + 3 * rank)
        labels = torch.zeros(4, 6, 6, dtype=torch.long)
        loader = [(logits, labels)]
        own, _ = find_median(_Logits(), loader, CPU, 5, mode="entropy", threshold=0.0)
        synced, _ = find_median(_Logits(), loader, CPU, 5, mode="entropy", threshold=0.0,
                                sync=distributed.all_reduce_sum)
        torch.save({"own": own, "synced": synced, "loader": loader},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_thresholds_per_process_as_plop_or_from_the_summed_histograms(tmp_path):
    mp.spawn(_threshold_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert not torch.equal(r0["own"], r1["own"])          # P7: each process its own
    assert torch.equal(r0["synced"], r1["synced"])
    both = r0["loader"] + r1["loader"]
    union, _ = find_median(_Logits(), both, CPU, 5, mode="entropy", threshold=0.0)
    assert torch.equal(r0["synced"], union)
