"""Two processes on gloo with DistributedDataParallel (docs/behaviour.md §9, §10.10): the
gradient the optimiser applies is the average of the two task gradients plus the penalty
gradient once (not averaged again, not halved), and only rank 0 updates the importances,
from the averaged task gradient."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_helpers import (
    RecordingSGD,
    TinySegNet,
    batch,
    ce,
    grads_of,
    min_max,
    options,
    regularizer_of,
)

OLD, NEW = 4, 2
IMPORTANCE = 500          # the EWC preset's --reg_importance
OLD_NAMES = ("body.weight", "body.bias", "cls.0.weight", "cls.0.bias")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def previous_fisher():
    g = torch.Generator().manual_seed(21)
    shapes = dict(TinySegNet([OLD]).named_parameters())
    return {f"module.{n}": torch.rand(shapes[n].shape, generator=g) + 0.1 for n in OLD_NAMES}


def models():
    model_old = TinySegNet([OLD], seed=2)
    for p in model_old.parameters():
        p.requires_grad_(False)
    return TinySegNet([OLD, NEW], seed=1), model_old


def rank_batch(rank):
    return batch(100 + rank, OLD + NEW)


def _worker(rank, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    from train import Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, model_old = models()
        trainer = Trainer(DistributedDataParallel(model), model_old, torch.device("cpu"),
                          options("--method", "EWC", "--step", "1"),
                          trainer_state={"regularizer": {"name": "ewc", "alpha": 0.9,
                                                         "fisher": previous_fisher()}},
                          classes=[OLD, NEW])
        optim = RecordingSGD(model.parameters())
        trainer.train(0, optim, [rank_batch(rank)])
        torch.save({"grads": optim.seen[0],
                    "fisher": regularizer_of(trainer).state_dict()["fisher"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_penalty_gradient_is_added_once_to_the_averaged_task_gradient(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, model_old = models()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    task = []
    for r in range(2):
        images, labels = rank_batch(r)
        task.append(grads_of(ce(model(images)[0], labels), params))
    average = [(a + b) / 2 for a, b in zip(*task)]
    fisher = previous_fisher()
    old = dict(model_old.named_parameters())
    penalty = sum((min_max(fisher[f"module.{n}"]) * (p - old[n]) ** 2).sum()
                  for n, p in zip(names, params) if n in OLD_NAMES)
    expected = [a + IMPORTANCE * g for a, g in zip(average, grads_of(penalty, params))]

    for r in range(2):
        for n, got, want in zip(names, ranks[r]["grads"], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"rank {r} {n}")
    # rank 0 updated the running Fisher from the averaged task gradient; rank 1 did not
    for n, g in zip(names, average):
        before = fisher.get(f"module.{n}", torch.ones_like(g))
        torch.testing.assert_close(ranks[0]["fisher"][f"module.{n}"],
                                   0.9 * g ** 2 + 0.1 * before, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ranks[1]["fisher"][f"module.{n}"], before)
