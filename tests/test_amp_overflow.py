"""fp16 loss scaling when the scaler skips a step (an overflow): the optimiser's state and
the penalties' importances must be exactly those of a run where the step never happened.
The overflow is forced with a huge initial scale (fp16 autocast on the CPU overflows as on
CUDA); the fused SGD kernel is run on the CPU, where it behaves as the CUDA one on a skipped
first step (it allocates its momentum buffers and returns before filling them)."""
import pytest
import torch
from test_trainer_regularizer import NEW, OLD, previous_state
from trainer_helpers import TinySegNet, batch, options, regularizer_of

from engine.build import sgd_kernel
from train import NonFiniteLossError, Trainer

CPU = torch.device("cpu")
CLASSES = 6


def overflowing_scaler():
    """Overflows on the first step (fp16 gradients above 65504), fits from the second."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)


def dirty_the_allocator(model):
    """Freed memory full of huge values, so that buffers made with ``empty_like`` are not
    zero by luck."""
    junk = [torch.full_like(p, 1e18) for p in model.parameters() for _ in range(4)]
    del junk


def train_three_steps(kernel):
    model = TinySegNet([CLASSES], seed=1)
    trainer = Trainer(model, None, CPU, options(amp="fp16"), classes=[CLASSES])
    trainer.scaler = overflowing_scaler()
    dirty_the_allocator(model)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, **kernel)
    trainer.train(0, optim, [batch(i, CLASSES) for i in range(3)])
    return model, optim, trainer


def test_the_sgd_kernel_of_an_fp16_run_survives_a_skipped_first_step():
    reference, ref_optim, ref_trainer = train_three_steps({})
    model, optim, trainer = train_three_steps(sgd_kernel(on_cuda=True, amp="fp16"))
    assert ref_trainer.scaler_skipped_steps == trainer.scaler_skipped_steps == 1
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(optim.state[p]["momentum_buffer"],
                                   ref_optim.state[q]["momentum_buffer"])


def test_fused_sgd_only_where_no_loss_scaler_can_skip_a_step():
    assert sgd_kernel(on_cuda=True, amp="off") == {"fused": True}
    assert sgd_kernel(on_cuda=True, amp="bf16") == {"fused": True}
    assert sgd_kernel(on_cuda=True, amp="fp16") == {}
    assert sgd_kernel(on_cuda=False, amp="off") == {}


def test_a_non_finite_loss_stops_an_fp16_run_too():
    """The loss scaler skips steps whose gradients overflow; a loss that is itself NaN is
    not an overflow it can cure (it would skip every step and halve its scale for ever)."""
    model = TinySegNet([CLASSES], seed=1)
    trainer = Trainer(model, None, CPU, options(amp="fp16"), classes=[CLASSES])
    images, labels = batch(0, CLASSES)
    images[0, 0, 0, 0] = float("nan")
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="not finite at epoch 1, iteration 0"):
        trainer.train(0, optim, [(images, labels)])


def trained_regulariser(method, batches, scaler):
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    for p in model_old.parameters():
        p.requires_grad_(False)
    trainer = Trainer(model, model_old, CPU,
                      options("--method", method, "--step", "1", "--reg_iterations", "1",
                              amp="fp16"),
                      trainer_state={"regularizer": previous_state(method.lower())},
                      classes=[OLD, NEW])
    trainer.scaler = scaler
    trainer.train(0, torch.optim.SGD(model.parameters(), lr=0.1), batches)
    return trainer


@pytest.mark.parametrize("method", ["EWC", "PI", "RW"])
def test_a_penalty_learns_nothing_from_a_step_the_scaler_skips(method):
    """EWC's Fisher, PI's path integral and RW's score and count after [batch, overflow,
    batch] are those after the two batches alone (the skipped step's gradients are inf;
    before, the Fisher became inf for good and PI's delta NaN). The overflow comes as in a
    long run: the scaler grows its scale after a good step, too far."""
    data = [batch(i, OLD + NEW) for i in (5, 6, 7)]
    growing = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_factor=2.0 ** 30,
                                   backoff_factor=2.0 ** -30, growth_interval=1)
    skipped = trained_regulariser(method, data, growing)
    assert skipped.scaler_skipped_steps == 1
    # the same scale (2^10) on the steps taken: the same fp16 gradients
    reference = trained_regulariser(method, [data[0], data[2]],
                                    torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert reference.scaler_skipped_steps == 0
    got, want = (regularizer_of(t).full_state() for t in (skipped, reference))
    assert got.keys() == want.keys()
    for key in got:
        if isinstance(got[key], str):
            assert got[key] == want[key]
        else:
            torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


def test_counting_skipped_steps_reads_no_scale_on_the_host(monkeypatch):
    """``get_scale()`` is a device-to-host copy (a sync on CUDA); the skipped steps are
    counted on the device and read once per epoch."""
    model = TinySegNet([CLASSES], seed=1)
    trainer = Trainer(model, None, CPU, options(amp="fp16"), classes=[CLASSES])
    trainer.scaler = overflowing_scaler()

    def no_host_read(*args):
        raise AssertionError("get_scale() called during the epoch")

    monkeypatch.setattr(trainer.scaler, "get_scale", no_host_read)
    trainer.train(0, torch.optim.SGD(model.parameters(), lr=0.1),
                  [batch(i, CLASSES) for i in range(3)])
    assert trainer.scaler_skipped_steps == 1
