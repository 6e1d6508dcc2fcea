"""Which loss terms the Trainer composes from the options (docs/behaviour.md §8.1, §8.9), with
which weights, and what validation reports (Q22): for every method preset and the explicit
loss options, the gradient the optimiser receives and the returned loss parts equal the
terms written out from their formulas."""
import pytest
import torch
from trainer_helpers import (
    RecordingSGD,
    TinySegNet,
    batch,
    bce_ignore,
    ce,
    feature_mse,
    grads_of,
    icarl_combined,
    icarl_disjoint,
    kd,
    options,
    unbiased_ce,
    unbiased_kd,
)

from engine import evaluate
from metrics import StreamSegMetrics
from train import Trainer

CPU = torch.device("cpu")
OLD, NEW = 4, 2            # step 1 of a toy task: background + 3 old classes, 2 new ones
N_OLD = OLD

# (options, (main, weighted extra terms)) as functions of z, z_old, body, body_old, labels
STEP1 = {
    "FT": (["--method", "FT"], lambda z, zo, b, bo, y: (ce(z, y), 0.0)),
    "LWF": (["--method", "LWF"], lambda z, zo, b, bo, y: (ce(z, y), 100 * kd(z, zo))),
    "ILT": (["--method", "ILT"],
            lambda z, zo, b, bo, y: (ce(z, y), 100 * kd(z, zo) + 100 * feature_mse(b, bo))),
    "MiB": (["--method", "MiB"],
            lambda z, zo, b, bo, y: (unbiased_ce(z, y, N_OLD), 10 * unbiased_kd(z, zo))),
    "LWF-MC": (["--method", "LWF-MC"],
               lambda z, zo, b, bo, y: (bce_ignore(z, y), icarl_combined(z, zo, 10))),
    "EWC without a previous state": (["--method", "EWC"],
                                     lambda z, zo, b, bo, y: (ce(z, y), 0.0)),
    "icarl importance": (["--icarl", "--icarl_importance", "3"],
                         lambda z, zo, b, bo, y: (bce_ignore(z, y), icarl_combined(z, zo, 3))),
    "icarl disjoint": (["--icarl", "--icarl_disjoint"],
                       lambda z, zo, b, bo, y: (icarl_disjoint(z, y, zo), 0.0)),
    "icarl disjoint bkg": (["--icarl", "--icarl_disjoint", "--icarl_bkg"],
                           lambda z, zo, b, bo, y: (icarl_disjoint(z, y, zo, bkg=True), 0.0)),
    "bce before unce": (["--bce", "--unce"], lambda z, zo, b, bo, y: (bce_ignore(z, y), 0.0)),
    "unce": (["--unce"], lambda z, zo, b, bo, y: (unbiased_ce(z, y, N_OLD), 0.0)),
    "kd with alpha": (["--loss_kd", "5", "--alpha", "2"],
                      lambda z, zo, b, bo, y: (ce(z, y), 5 * kd(z, zo, alpha=2))),
    "unkd with alpha": (["--loss_kd", "5", "--unkd", "--alpha", "2"],
                        lambda z, zo, b, bo, y: (ce(z, y), 5 * unbiased_kd(z, zo, alpha=2))),
    "de": (["--loss_de", "3"], lambda z, zo, b, bo, y: (ce(z, y), 3 * feature_mse(b, bo))),
    "preset wins over explicit": (["--method", "MiB", "--loss_kd", "100"],
                                  lambda z, zo, b, bo, y: (unbiased_ce(z, y, N_OLD),
                                                           10 * unbiased_kd(z, zo))),
    "explicit_overrides_preset": (["--method", "MiB", "--loss_kd", "100",
                                   "--explicit_overrides_preset"],
                                  lambda z, zo, b, bo, y: (unbiased_ce(z, y, N_OLD),
                                                           100 * unbiased_kd(z, zo))),
}
USES_OLD_MODEL = {"LWF", "ILT", "MiB", "LWF-MC", "icarl importance", "icarl disjoint",
                  "icarl disjoint bkg", "kd with alpha", "unkd with alpha", "de",
                  "preset wins over explicit", "explicit_overrides_preset"}

# at step 0 there is no old model: only the main criterion, and BCE wins with --bce/--icarl
STEP0 = {
    "FT": (["--method", "FT"], ce),
    "LWF": (["--method", "LWF"], ce),
    "ILT": (["--method", "ILT"], ce),
    "MiB": (["--method", "MiB"], ce),
    "LWF-MC": (["--method", "LWF-MC"], bce_ignore),
    "icarl disjoint": (["--icarl", "--icarl_disjoint"], bce_ignore),
    "bce": (["--bce"], bce_ignore),
}


def value(x):
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def train_once(trainer, model, images, labels):
    optim = RecordingSGD(model.parameters())
    losses = trainer.train(0, optim, [(images, labels)])
    return optim.seen[0], losses


@pytest.mark.parametrize("case", list(STEP1))
def test_step1_gradient_and_loss_parts_follow_the_options(case):
    argv, expected = STEP1[case]
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    old_calls = count_calls(model_old)
    trainer = Trainer(model, model_old, CPU, options(*argv, "--step", "1"),
                      classes=[OLD, NEW])
    images, labels = batch(0, OLD + NEW)

    z, feats = model(images, ret_intermediate=True)
    with torch.no_grad():
        zo, feats_old = model_old(images, ret_intermediate=True)
    old_calls.clear()
    main, extra = expected(z, zo, feats["body"], feats_old["body"], labels)
    reference = grads_of(main + extra, list(model.parameters()))

    seen, (epoch_loss, reg_loss) = train_once(trainer, model, images, labels)
    for got, want in zip(seen, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert epoch_loss == pytest.approx(value(main), rel=1e-5)
    assert reg_loss == pytest.approx(value(extra), rel=1e-5, abs=1e-7)
    # the old model runs only when a distillation term needs it (§8.9)
    assert len(old_calls) == (1 if case in USES_OLD_MODEL else 0)


@pytest.mark.parametrize("case", list(STEP0))
def test_step0_uses_only_the_main_criterion(case):
    argv, criterion = STEP0[case]
    model = TinySegNet([OLD], seed=1)
    trainer = Trainer(model, None, CPU, options(*argv), classes=[OLD])
    images, labels = batch(3, OLD)
    z, _ = model(images)
    reference = grads_of(criterion(z, labels), list(model.parameters()))
    seen, (epoch_loss, reg_loss) = train_once(trainer, model, images, labels)
    for got, want in zip(seen, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert epoch_loss == pytest.approx(value(criterion(z, labels)), rel=1e-5)
    assert reg_loss == 0.0


def test_unbiased_ce_counts_every_old_channel_of_the_classes_list():
    # three steps: old = background + 3 + 2 classes; UNCE must absorb all 6 old channels
    model, model_old = TinySegNet([4, 2, 3], seed=1), TinySegNet([4, 2], seed=2)
    trainer = Trainer(model, model_old, CPU, options("--unce", "--step", "1"),
                      classes=[4, 2, 3])
    images, labels = batch(5, 9)
    z, _ = model(images)
    reference = grads_of(unbiased_ce(z, labels, 6), list(model.parameters()))
    seen, _ = train_once(trainer, model, images, labels)
    for got, want in zip(seen, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# validation reports KD, DE and the penalty unweighted, the combined iCaRL term weighted (Q22)
VALIDATION = {
    "LWF": lambda z, zo, b, bo, y: (ce(z, y), kd(z, zo)),
    "ILT": lambda z, zo, b, bo, y: (ce(z, y), kd(z, zo) + feature_mse(b, bo)),
    "MiB": lambda z, zo, b, bo, y: (unbiased_ce(z, y, N_OLD), unbiased_kd(z, zo)),
    "LWF-MC": lambda z, zo, b, bo, y: (bce_ignore(z, y), icarl_combined(z, zo, 10)),
    "FT": lambda z, zo, b, bo, y: (ce(z, y), 0.0),
}


@pytest.mark.parametrize("method", list(VALIDATION))
def test_validation_reports_unweighted_distillation_and_weighted_icarl(method):
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    trainer = Trainer(model, model_old, CPU, options("--method", method, "--step", "1"),
                      classes=[OLD, NEW])
    batches = [batch(7, OLD + NEW), batch(8, OLD + NEW)]
    expected = []
    with torch.no_grad():
        for images, labels in batches:
            z, f = model(images, ret_intermediate=True)
            zo, fo = model_old(images, ret_intermediate=True)
            expected.append([float(v) for v in VALIDATION[method](z, zo, f["body"], fo["body"],
                                                                  labels)])
    metrics = StreamSegMetrics(OLD + NEW)
    evaluation = evaluate(model, batches, metrics, CPU, losses=trainer.validation_losses,
                          forward_kwargs=trainer.validation_kwargs())
    (class_loss, reg_loss), score = evaluation.loss, evaluation.score
    assert class_loss == pytest.approx(sum(e[0] for e in expected) / 2, rel=1e-5)
    assert reg_loss == pytest.approx(sum(e[1] for e in expected) / 2, rel=1e-5, abs=1e-7)
    assert score["Total samples"] == 4
