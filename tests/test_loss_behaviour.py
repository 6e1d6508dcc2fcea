"""Losses on random batches: values and gradients against straightforward float64
formulations written with explicit probabilities and one-hot targets, gradcheck of the
custom forms, reductions, masks, upcasting of half-precision logits, bad input."""
import pytest
import torch
import torch.nn.functional as F

from utils.loss import (
    BCEWithLogitsLossWithIgnoreIndex,
    IcarlDistillationLoss,
    IcarlLoss,
    KnowledgeDistillationLoss,
    LossError,
    PixelCrossEntropy,
    UnbiasedCrossEntropy,
    UnbiasedKnowledgeDistillationLoss,
)

B, C, H, W, C_OLD = 2, 6, 3, 4, 4


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2).requires_grad_()
    z_old = torch.randn(B, C_OLD, H, W, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (B, H, W), generator=g)
    y[0, 0, :2] = 255
    y[1, 2, 3] = 255
    y[1, 0, 0] = 2                      # an old class
    y[0, 1, 1] = 5                      # a new class
    return z, z_old, y


def per_pixel(z):
    """B x C x H x W -> list of (b, h, w, channel vector)"""
    return [(b, h, w, z[b, :, h, w]) for b in range(z.shape[0]) for h in range(z.shape[2])
            for w in range(z.shape[3])]


def reference_unce(z, y):
    out = torch.zeros(y.shape, dtype=z.dtype)
    for b, h, w, v in per_pixel(z):
        t = int(y[b, h, w])
        if t == 255:
            continue
        p = torch.exp(v) / torch.exp(v).sum()
        out[b, h, w] = -torch.log(p[:C_OLD].sum() if t < C_OLD else p[t])
    return out


def reference_kd(z, z_old, alpha):
    out = torch.zeros(z.shape[0], z.shape[2], z.shape[3], dtype=z.dtype)
    for b, h, w, v in per_pixel(z):
        p = torch.exp(v[:C_OLD]) / torch.exp(v[:C_OLD]).sum()
        q = torch.exp(alpha * z_old[b, :, h, w]) / torch.exp(alpha * z_old[b, :, h, w]).sum()
        out[b, h, w] = -(q * torch.log(p)).sum() / C_OLD
    return out


def reference_unkd(z, z_old, alpha):
    out = torch.zeros(z.shape[0], z.shape[2], z.shape[3], dtype=z.dtype)
    for b, h, w, v in per_pixel(z):
        p = torch.exp(v) / torch.exp(v).sum()
        q = torch.exp(alpha * z_old[b, :, h, w]) / torch.exp(alpha * z_old[b, :, h, w]).sum()
        p_bg = p[0] + p[C_OLD:].sum()
        out[b, h, w] = -(q[0] * torch.log(p_bg) + (q[1:] * torch.log(p[1:C_OLD])).sum()) / C_OLD
    return out


def explicit_bce(x, t):
    s = torch.sigmoid(x)
    return -(t * torch.log(s) + (1 - t) * torch.log(1 - s))


def one_hot(y, n):
    t = torch.zeros(y.shape[0], n, *y.shape[1:], dtype=torch.float64)
    for b in range(y.shape[0]):
        for h in range(y.shape[1]):
            for w in range(y.shape[2]):
                if int(y[b, h, w]) != 255:
                    t[b, int(y[b, h, w]), h, w] = 1
    return t


def reference_bce_ignore(z, y):
    return explicit_bce(z, one_hot(y, z.shape[1])).sum(1) * (y != 255)


def reference_icarl_disjoint(z, y, p_old, bkg):
    t = one_hot(y, z.shape[1])
    first = 1 if bkg else 0
    t[:, first:C_OLD] = p_old[:, first:]
    return explicit_bce(z, t).sum(1)


def assert_same_value_and_gradient(loss_fn, reference_fn, z):
    value = loss_fn(z)
    expected = reference_fn(z)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=torch.float64).reshape(value.shape)
    grad, = torch.autograd.grad((value * weights).sum(), z)
    grad_ref, = torch.autograd.grad((expected * weights).sum(), z)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_unbiased_ce_matches_explicit_probabilities(data):
    z, _, y = data
    assert_same_value_and_gradient(
        lambda x: UnbiasedCrossEntropy(old_cl=C_OLD, reduction="none")(x, y),
        lambda x: reference_unce(x, y), z)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_kd_matches_explicit_probabilities(data, alpha):
    z, z_old, _ = data
    assert_same_value_and_gradient(
        lambda x: KnowledgeDistillationLoss(reduction="none", alpha=alpha)(x, z_old),
        lambda x: reference_kd(x, z_old, alpha), z)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_unbiased_kd_matches_explicit_probabilities(data, alpha):
    z, z_old, _ = data
    assert_same_value_and_gradient(
        lambda x: UnbiasedKnowledgeDistillationLoss(reduction="none", alpha=alpha)(x, z_old),
        lambda x: reference_unkd(x, z_old, alpha), z)


def test_bce_with_ignore_matches_one_hot_form(data):
    z, _, y = data
    assert_same_value_and_gradient(
        lambda x: BCEWithLogitsLossWithIgnoreIndex(reduction="none")(x, y),
        lambda x: reference_bce_ignore(x, y), z)


@pytest.mark.parametrize("bkg", [False, True])
def test_disjoint_icarl_matches_one_hot_form(data, bkg):
    z, z_old, y = data
    p_old = torch.sigmoid(z_old)
    assert_same_value_and_gradient(
        lambda x: IcarlLoss(reduction="none", bkg=bkg)(x, y, p_old),
        lambda x: reference_icarl_disjoint(x, y, p_old, bkg), z)


def test_combined_icarl_is_importance_times_per_pixel_sum(data):
    z, z_old, _ = data
    per_pix = explicit_bce(z[:, :C_OLD], torch.sigmoid(z_old)).sum(1)
    expected = 10 * per_pix.mean()
    torch.testing.assert_close(IcarlDistillationLoss(importance=10)(z, z_old), expected)


def test_gradcheck_of_the_custom_forms(data):
    z, z_old, y = data
    small = z.detach()[:1, :, :2, :2].clone().requires_grad_()
    small_old, small_y = z_old[:1, :, :2, :2], y[:1, :2, :2].clone()
    small_y[0, 0, 0] = 255
    checks = [
        lambda x: UnbiasedCrossEntropy(old_cl=C_OLD)(x, small_y),
        lambda x: KnowledgeDistillationLoss(alpha=2.0)(x, small_old),
        lambda x: UnbiasedKnowledgeDistillationLoss(alpha=2.0)(x, small_old),
        lambda x: BCEWithLogitsLossWithIgnoreIndex()(x, small_y),
        lambda x: IcarlLoss(bkg=True)(x, small_y, torch.sigmoid(small_old)),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (small,))


def test_unbiased_ce_leaves_the_callers_targets_alone(data):
    z, _, y = data
    before = y.clone()
    UnbiasedCrossEntropy(old_cl=C_OLD)(z, y)
    assert torch.equal(y, before)


@pytest.mark.parametrize("make, mean_over", [
    (lambda r: PixelCrossEntropy(reduction=r), "all"),
    (lambda r: UnbiasedCrossEntropy(old_cl=C_OLD, reduction=r), "valid"),
    (lambda r: BCEWithLogitsLossWithIgnoreIndex(reduction=r), "valid"),
])
def test_label_loss_reductions(data, make, mean_over):
    z, _, y = data
    none = make("none")(z, y)
    assert none.shape == (B, H, W)
    assert (none[y == 255] == 0).all()
    torch.testing.assert_close(make("sum")(z, y), none.sum())
    count = B * H * W if mean_over == "all" else int((y != 255).sum())
    assert count < B * H * W or mean_over == "all"
    torch.testing.assert_close(make("mean")(z, y), none.sum() / count)


# Four pixels (C = 3, two old channels): targets background, new class 2, ignored, old
# class 1. Per-pixel values computed by hand with math.log/exp (see the comments).
HAND_Z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 1.0, 0.0], [0.2, -0.3, 0.1]],
                      dtype=torch.float64).T.reshape(1, 3, 1, 4)
HAND_Y = torch.tensor([[[0, 2, 255, 1]]])
# unbiased CE: LSE(z) - LSE(z_0, z_1) for targets < 2, LSE(z) - z_2 for target 2, 0 ignored
HAND_UNCE = [0.09434427692615754, 0.3689811354013153, 0.0, 0.44675067137315283]
# BCE: sum_c softplus(z_c) - z_target, 0 for the ignored pixel
HAND_BCE = [1.3196705555963908, 2.075081979403186, 0.0, 2.39689077392369]


@pytest.mark.parametrize("loss, expected", [
    (UnbiasedCrossEntropy(old_cl=2, reduction="none"), HAND_UNCE),
    (BCEWithLogitsLossWithIgnoreIndex(reduction="none"), HAND_BCE),
])
def test_reduction_none_matches_hand_computed_values(loss, expected):
    torch.testing.assert_close(loss(HAND_Z, HAND_Y).flatten(),
                               torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls, per_pixel", [(UnbiasedCrossEntropy, HAND_UNCE),
                                             (BCEWithLogitsLossWithIgnoreIndex, HAND_BCE)])
def test_mean_and_sum_skip_ignored_pixels_as_the_original(cls, per_pixel):
    kwargs = {"old_cl": 2} if cls is UnbiasedCrossEntropy else {}
    total = sum(per_pixel)
    assert cls(reduction="sum", **kwargs)(HAND_Z, HAND_Y).item() == pytest.approx(total, abs=1e-12)
    # three pixels are not ignored: the mean divides by 3, not by the 4 positions
    assert cls(**kwargs)(HAND_Z, HAND_Y).item() == pytest.approx(total / 3, abs=1e-12)


@pytest.mark.parametrize("cls", [UnbiasedCrossEntropy, BCEWithLogitsLossWithIgnoreIndex])
def test_mean_of_an_all_ignored_batch_is_nan_as_the_original(cls):
    kwargs = {"old_cl": 2} if cls is UnbiasedCrossEntropy else {}
    assert torch.isnan(cls(**kwargs)(HAND_Z, torch.full_like(HAND_Y, 255)))


def test_trainer_criterion_averages_over_every_pixel():
    """The trainer's reduction ('none', then the mean over all positions) is unchanged."""
    unce = UnbiasedCrossEntropy(old_cl=2, reduction="none")
    assert unce(HAND_Z, HAND_Y).mean().item() == pytest.approx(sum(HAND_UNCE) / 4, abs=1e-12)
    bce = BCEWithLogitsLossWithIgnoreIndex(reduction="none")
    assert bce(HAND_Z, HAND_Y).mean().item() == pytest.approx(sum(HAND_BCE) / 4, abs=1e-12)


@pytest.mark.parametrize("cls", [KnowledgeDistillationLoss, UnbiasedKnowledgeDistillationLoss])
def test_distillation_mask_multiplies_each_pixel(data, cls):
    z, z_old, _ = data
    mask = torch.rand(B, H, W, generator=torch.Generator().manual_seed(1)) > 0.5
    none = cls(reduction="none")(z, z_old)
    masked = cls(reduction="none")(z, z_old, mask=mask)
    torch.testing.assert_close(masked, none * mask)
    torch.testing.assert_close(cls()(z, z_old, mask=mask), (none * mask).sum() / (B * H * W))
    torch.testing.assert_close(cls(reduction="sum")(z, z_old, mask=mask), (none * mask).sum())


def test_alpha_scales_the_teacher_only(data):
    z, z_old, _ = data
    scaled = KnowledgeDistillationLoss(alpha=3.0)(z, z_old)
    assert torch.allclose(scaled, KnowledgeDistillationLoss()(z, 3.0 * z_old))
    assert not torch.allclose(scaled, KnowledgeDistillationLoss()(3.0 * z, 3.0 * z_old))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_computed_in_float32(data, half):
    z, z_old, y = data
    zh = z.detach().to(half).requires_grad_()
    zo = z_old.to(half)
    for fn in (lambda x: UnbiasedCrossEntropy(old_cl=C_OLD)(x, y),
               lambda x: UnbiasedKnowledgeDistillationLoss()(x, zo),
               lambda x: KnowledgeDistillationLoss()(x, zo),
               lambda x: BCEWithLogitsLossWithIgnoreIndex()(x, y),
               lambda x: IcarlLoss()(x, y, torch.sigmoid(zo)),
               lambda x: IcarlDistillationLoss()(x, zo),
               lambda x: PixelCrossEntropy()(x, y)):
        value = fn(zh)
        assert value.dtype == torch.float32
        # the upcast is exact, so it must equal the float32 computation bit for bit
        assert torch.equal(value, fn_float32(fn, zh))
        grad, = torch.autograd.grad(value, zh)
        assert grad.dtype == half and torch.isfinite(grad.float()).all()


def fn_float32(fn, zh):
    return fn(zh.detach().float())


def test_losses_run_under_cpu_autocast(data):
    z, z_old, y = data
    conv = torch.nn.Conv2d(C, C, 1)
    x = z.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = (UnbiasedCrossEntropy(old_cl=C_OLD)(logits, y)
                + UnbiasedKnowledgeDistillationLoss()(logits, z_old.float()))
    assert loss.dtype == torch.float32
    loss.backward()
    assert conv.weight.grad is not None


def test_unbiased_kd_refuses_a_step_without_new_classes(data):
    z, _, _ = data
    with pytest.raises(LossError, match="adds no class"):
        UnbiasedKnowledgeDistillationLoss()(z, z.detach())


def test_unbiased_ce_needs_the_old_class_count(data):
    z, _, y = data
    with pytest.raises(LossError, match="old_cl"):
        UnbiasedCrossEntropy()(z, y)


def test_unknown_reduction_is_refused():
    with pytest.raises(LossError, match="reduction"):
        KnowledgeDistillationLoss(reduction="avg")


def test_main_criterion_priority():
    """The registry picks the main loss of a step by priority, as the original chooses its
    criterion: --bce / --icarl over --unce (also at step 0), --unce only with old classes."""
    import methods
    from argparser import build_options

    def main_criterion(step, *argv):
        opts = build_options(["--task", "15-5", "--step", str(step), *argv])
        classes = [16, 5][:step + 1]
        return methods.assemble(methods.StepInfo(opts, classes, None)).main.criterion
    assert isinstance(main_criterion(1, "--icarl", "--unce"), BCEWithLogitsLossWithIgnoreIndex)
    assert isinstance(main_criterion(0, "--bce"), BCEWithLogitsLossWithIgnoreIndex)
    unce = main_criterion(1, "--unce")
    assert isinstance(unce, UnbiasedCrossEntropy) and unce.old_cl == 16
    assert unce.reduction == "none"
    assert isinstance(main_criterion(0, "--unce"), PixelCrossEntropy)
    assert isinstance(main_criterion(1), PixelCrossEntropy)


def test_plain_ce_equals_torch_cross_entropy_summed_over_all_pixels(data):
    z, _, y = data
    expected = F.cross_entropy(z, y, ignore_index=255, reduction="sum") / (B * H * W)
    torch.testing.assert_close(PixelCrossEntropy()(z, y), expected)
