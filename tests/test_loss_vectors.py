"""The losses reproduce the hand-computed test vectors: one batch of 5 pixels, 5 channels
(background + 2 old classes + 2 new), an old model with 3 channels, labels with an old-class
pixel and an ignored one.

Where the numbers come from: each expected value is the formula of the original MiB's loss
(docs/behaviour.md §8) worked out by hand, in float64 to 10 digits, on the inputs below; no
code of this project produced them, so they check the implementation independently. There is
no script to regenerate them: to check one, evaluate its formula on these inputs (plain
cross-entropy of a pixel, for instance, is logsumexp(z) - z[y]; the softmax of every pixel is
the first step of most of them)."""
import pytest
import torch

from utils.loss import (
    BCEWithLogitsLossWithIgnoreIndex,
    EncoderDistillationLoss,
    IcarlDistillationLoss,
    IcarlLoss,
    KnowledgeDistillationLoss,
    PixelCrossEntropy,
    UnbiasedCrossEntropy,
    UnbiasedKnowledgeDistillationLoss,
)

# pixel-major: row w = the channel vector of pixel (0, 0, w)
NEW_LOGITS = [
    [1.0, 0.5, -0.5, 2.0, 0.0],
    [0.2, 1.5, 0.3, -1.0, 0.8],
    [-0.3, 0.0, 2.2, 0.4, 1.1],
    [0.5, -0.2, 0.1, 0.3, -0.7],
    [0.0, 0.0, 0.0, -0.5, 1.5],
]
OLD_LOGITS = [
    [2.0, 0.1, -1.0],
    [0.0, 1.0, 0.5],
    [0.3, 0.3, 0.3],
    [-1.0, 2.0, 0.0],
    [1.0, -1.0, 0.5],
]
LABELS = [3, 0, 1, 255, 4]
N_OLD = 3


def as_bchw(rows, dtype):
    """pixels x channels -> 1 x C x 1 x W"""
    return torch.tensor(rows, dtype=dtype).t().reshape(1, len(rows[0]), 1, len(rows))


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def batch(request):
    dtype = request.param
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    return (as_bchw(NEW_LOGITS, dtype), as_bchw(OLD_LOGITS, dtype),
            torch.tensor(LABELS).reshape(1, 1, 5), tol)


def check(value, expected, tol):
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(value.double().reshape(expected.shape), expected, **tol)


def test_cross_entropy_counts_ignored_pixels_in_the_mean(batch):
    z, _, y, tol = batch
    per_pixel = [0.5924590010, 2.0665817830, 2.7253544448, 0.0, 0.5904086488]
    check(PixelCrossEntropy(reduction="none")(z, y), per_pixel, tol)
    check(PixelCrossEntropy()(z, y), 1.1949607755, tol)
    check(PixelCrossEntropy(reduction="sum")(z, y), sum(per_pixel), tol)


def test_unbiased_cross_entropy(batch):
    z, _, y, tol = batch
    per_pixel = [0.5924590010, 0.3131357238, 0.3489770554, 0.0, 0.5904086488]
    check(UnbiasedCrossEntropy(old_cl=N_OLD, reduction="none")(z, y), per_pixel, tol)
    # the trainer's reduction: the mean over all five pixels, the ignored one included
    check(UnbiasedCrossEntropy(old_cl=N_OLD, reduction="none")(z, y).mean(), 0.3689960858, tol)
    check(UnbiasedCrossEntropy(old_cl=N_OLD, reduction="sum")(z, y), sum(per_pixel), tol)
    # the class's own 'mean' (an NLL with ignore_index): over the four pixels not ignored
    check(UnbiasedCrossEntropy(old_cl=N_OLD)(z, y), sum(per_pixel) / 4, tol)


@pytest.mark.parametrize("alpha, per_pixel, mean", [
    (1.0, [0.2429172037, 0.3547673208, 0.5810146853, 0.4698781458, 0.3662040962], 0.4029562904),
    (2.0, [0.2062242514, 0.2880533232, 0.5810146853, 0.4887391675, 0.3662040962], 0.3860471047),
])
def test_knowledge_distillation(batch, alpha, per_pixel, mean):
    z, z_old, _, tol = batch
    check(KnowledgeDistillationLoss(reduction="none", alpha=alpha)(z, z_old), per_pixel, tol)
    check(KnowledgeDistillationLoss(alpha=alpha)(z, z_old), mean, tol)


@pytest.mark.parametrize("alpha, per_pixel, mean", [
    (1.0, [0.1811482933, 0.3884115532, 0.4800390002, 0.5982308372, 0.3511284220], 0.3997916212),
    (2.0, [0.0778418013, 0.3582534622, 0.4800390002, 0.6270055277, 0.2624350372], 0.3611149657),
])
def test_unbiased_knowledge_distillation(batch, alpha, per_pixel, mean):
    z, z_old, _, tol = batch
    check(UnbiasedKnowledgeDistillationLoss(reduction="none", alpha=alpha)(z, z_old),
          per_pixel, tol)
    check(UnbiasedKnowledgeDistillationLoss(alpha=alpha)(z, z_old), mean, tol)


def test_method_totals(batch):
    z, z_old, y, tol = batch
    mib = UnbiasedCrossEntropy(old_cl=N_OLD, reduction="none")(z, y).mean() + \
        10 * UnbiasedKnowledgeDistillationLoss()(z, z_old)
    lwf = PixelCrossEntropy()(z, y) + 100 * KnowledgeDistillationLoss()(z, z_old)
    check(mib, 4.3669122977, tol)
    check(lwf, 41.4905898131, tol)


def test_bce_with_ignore_index(batch):
    z, _, y, tol = batch
    per_pixel = [3.5814908475, 4.6382697453, 5.8529363223, 0.0, 2.7549318038]
    check(BCEWithLogitsLossWithIgnoreIndex(reduction="none")(z, y), per_pixel, tol)
    check(BCEWithLogitsLossWithIgnoreIndex(reduction="none")(z, y).mean(), 3.3655257438, tol)
    # the class's own 'mean' and 'sum' skip the ignored pixel
    check(BCEWithLogitsLossWithIgnoreIndex()(z, y), sum(per_pixel) / 4, tol)
    check(BCEWithLogitsLossWithIgnoreIndex(reduction="sum")(z, y), sum(per_pixel), tol)


def test_combined_icarl_term(batch):
    z, z_old, _, tol = batch
    check(IcarlDistillationLoss()(z, z_old), 2.1144138285, tol)
    check(IcarlDistillationLoss(importance=10)(z, z_old), 21.1441382849, tol)


@pytest.mark.parametrize("bkg, per_pixel, mean", [
    (False, [2.5726748864, 3.4549440780, 4.7614955404, 3.5658425119, 2.7549318038],
     3.4219777641),
    (True, [3.4534719644, 3.3549440780, 4.5891627853, 3.7003132226, 2.7549318038],
     3.5705647708),
])
def test_disjoint_icarl_keeps_ignored_pixels(batch, bkg, per_pixel, mean):
    z, z_old, y, tol = batch
    # the original trainer hands the old model's sigmoid probabilities to IcarlLoss
    check(IcarlLoss(reduction="none", bkg=bkg)(z, y, torch.sigmoid(z_old)), per_pixel, tol)
    check(IcarlLoss(bkg=bkg)(z, y, torch.sigmoid(z_old)), mean, tol)


def test_encoder_distillation_is_the_element_mean_squared_error():
    b = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    b_old = torch.tensor([[0.0, -1.5], [1.0, 0.5]])
    assert EncoderDistillationLoss()(b, b_old).item() == pytest.approx(0.4375, abs=1e-7)
