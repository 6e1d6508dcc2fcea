"""--accumulate K / --total_batch N: K batches per optimiser step. On a network without
BatchNorm the accumulated gradient equals the large batch's (to float tolerance), the poly
schedule and the regularisers' updates count optimiser steps, and the options resolve and
check the process count."""
import pytest
import torch
from trainer_helpers import RecordingSGD, TinySegNet, batch, ce, grads_of, kd, options

from argparser import OptionError, parse_options
from train import Trainer, micro_batch_group, optimizer_steps
from utils.checkpoint import fingerprint
from utils.scheduler import PolyLR

CPU = torch.device("cpu")
OLD, NEW = 4, 2


def no_ignore(seed, n_classes, n):
    images, labels = batch(seed, n_classes, n=n)
    labels[labels == 255] = 0      # equal pixel counts per batch: mean of means = mean
    return images, labels


def split(images, labels, size):
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


def test_groups_and_optimizer_steps():
    assert [micro_batch_group(i, 5, 2) for i in range(5)] == [
        (2, True, False), (2, False, True), (2, True, False), (2, False, True), (1, True, True)]
    assert [micro_batch_group(i, 3, 1) for i in range(3)] == [(1, True, True)] * 3
    assert optimizer_steps(5, 2) == 3 and optimizer_steps(4, 2) == 2 and optimizer_steps(7, 1) == 7


@pytest.mark.parametrize("method", ["FT", "LWF"])
def test_accumulated_gradient_equals_the_large_batch(method):
    images, labels = no_ignore(0, OLD + NEW, n=6)
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    z, _ = model(images)
    with torch.no_grad():
        zo, _ = model_old(images)
    loss = ce(z, labels) + (100 * kd(z, zo) if method == "LWF" else 0.0)
    reference = grads_of(loss, list(model.parameters()))

    trainer = Trainer(model, model_old, CPU, options("--method", method, "--step", "1",
                                                     "--accumulate", "3"), classes=[OLD, NEW])
    optim = RecordingSGD(model.parameters())
    trainer.train(0, optim, split(images, labels, 2))
    [seen] = optim.seen                       # three batches, one optimiser step
    for got, want in zip(seen, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_with_ignored_pixels_it_is_the_mean_of_the_batch_means():
    # what 3 processes x 2 images under DDP give: the mean over processes of each one's mean
    images, labels = batch(4, OLD, n=6)
    model = TinySegNet([OLD], seed=1)
    parts = split(images, labels, 2)
    reference = [sum(g) / 3 for g in zip(*(grads_of(ce(model(x)[0], y),
                                                    list(model.parameters()))
                                           for x, y in parts))]
    trainer = Trainer(model, None, CPU, options("--accumulate", "3"), classes=[OLD])
    optim = RecordingSGD(model.parameters())
    trainer.train(0, optim, parts)
    for got, want in zip(optim.seen[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_schedule_counts_optimizer_steps():
    images, labels = no_ignore(1, OLD, n=5)
    model = TinySegNet([OLD], seed=1)
    events = []
    optim = RecordingSGD(model.parameters(), lr=0.1, events=events)
    scheduler = PolyLR(optim, max_iters=optimizer_steps(5, 2))
    trainer = Trainer(model, None, CPU, options("--accumulate", "2"), classes=[OLD])
    trainer.train(0, optim, split(images, labels, 1), scheduler=scheduler)
    # 5 batches of 1: groups 2, 2, 1 -> 3 optimiser steps, 3 schedule steps, lr at 0
    assert events == ["zero_grad", "step"] * 3
    assert scheduler.last_epoch == 3 and optim.param_groups[0]["lr"] == 0.0


def test_last_short_group_is_its_own_mean():
    images, labels = no_ignore(2, OLD, n=3)
    model = TinySegNet([OLD], seed=1)
    reference = grads_of(ce(model(images[2:])[0], labels[2:]), list(model.parameters()))
    trainer = Trainer(model, None, CPU, options("--accumulate", "2"), classes=[OLD])
    optim = RecordingSGD(model.parameters())
    trainer.train(0, optim, split(images, labels, 1))
    assert len(optim.seen) == 2
    for got, want in zip(optim.seen[1], reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_regularizer_updates_once_per_optimizer_step():
    images, labels = no_ignore(3, OLD + NEW, n=4)
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    trainer = Trainer(model, model_old, CPU, options("--method", "EWC", "--step", "1",
                                                     "--accumulate", "2"), classes=[OLD, NEW])
    [part] = trainer.method.penalties
    calls = []
    original = part.after_backward
    part.after_backward = lambda: (calls.append(1), original())[1]
    trainer.train(0, RecordingSGD(model.parameters()), split(images, labels, 1))
    assert len(calls) == 2                    # 4 batches, 2 optimiser steps


def test_total_batch_sets_accumulate_from_the_process_count(monkeypatch):
    assert parse_options(["--batch_size", "12", "--total_batch", "24"]).accumulate == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_options(["--batch_size", "12", "--total_batch", "24"]).accumulate == 1
    with pytest.raises(OptionError, match="is not a multiple of --batch_size 5 x 2"):
        parse_options(["--batch_size", "5", "--total_batch", "24"])
    with pytest.raises(OptionError, match="--accumulate 3 and --total_batch 24 disagree"):
        parse_options(["--batch_size", "12", "--total_batch", "24", "--accumulate", "3"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(OptionError, match="--accumulate must be at least 1"):
        parse_options(["--accumulate", "0"])


def test_effective_batch_in_the_fingerprint():
    opts = parse_options(["--batch_size", "6", "--accumulate", "2"])
    fp = fingerprint(opts, world_size=2)
    assert fp["accumulate"] == 2 and fp["total_batch"] == 24
