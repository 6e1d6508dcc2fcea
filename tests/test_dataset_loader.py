"""Seeded loaders: batch counts, per-sample seeds, the same batches with any number of
workers, exact resume, the cross-validation split, and the per-step dataset factory."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import random_split
from torch.utils.data.distributed import DistributedSampler

import tasks
from argparser import parse_options
from dataset import VOCSegmentationIncremental
from dataset.factory import get_dataset
from dataset.loader import (
    IndexSubset,
    SeededSampler,
    build_loader,
    cross_val_split,
    expected_length,
)
from dataset.seeding import sample_seed
from dataset.transform import train_transform


class Echo(torch.utils.data.Dataset):
    """Returns the index part of its (index, seed) key."""

    def __init__(self, n):
        self.n = n

    def __getitem__(self, item):
        index, seed = item
        return index

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,batch,world", [(10, 3, 1), (10, 3, 2), (11, 2, 3), (7, 4, 1)])
def test_loader_length_with_drop_last(n, batch, world):
    for rank in range(world):
        loader = build_loader(Echo(n), batch, shuffle=True, drop_last=True, num_workers=0,
                              seed=0, rank=rank, world_size=world)
        assert len(loader) == (-(-n // world)) // batch == expected_length(n, batch, world)
        assert len(list(loader)) == len(loader)


def test_seeds_follow_the_global_position_and_epoch():
    n, world = 7, 2
    drawn = {}
    for rank in range(world):
        sampler = SeededSampler(DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                   shuffle=True), seed=9)
        sampler.set_epoch(3)
        assert sampler.sampler.epoch == 3
        pairs = list(sampler)
        for k, (index, seed) in enumerate(pairs):
            drawn[k * world + rank] = (index, seed)
    # the padded permutation of epoch 3, cut in positions: rank-independent seeds
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    perm += perm[:8 - n]
    assert [drawn[p][0] for p in range(8)] == perm
    assert [drawn[p][1] for p in range(8)] == [sample_seed(9, 3, p) for p in range(8)]
    assert len({s for _, s in drawn.values()}) == 8


def test_sample_seed_mixes_every_input():
    base = sample_seed(1, 2, 3)
    assert base == sample_seed(1, 2, 3)
    assert len({base, sample_seed(2, 2, 3), sample_seed(1, 3, 3), sample_seed(1, 2, 4),
                sample_seed(1, 3, 2)}) == 5


@pytest.fixture(scope="module")
def voc_train(synthetic_voc):
    labels, old, _ = tasks.get_task_labels("voc", "15-5", 0)
    return VOCSegmentationIncremental(str(synthetic_voc), transform=train_transform(24),
                                      labels=labels, labels_old=old, progress=False)


def epochs(loader, which):
    out = []
    for e in which:
        loader.sampler.set_epoch(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def same(a, b):
    return all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for ea, eb in zip(a, b) for (x1, y1), (x2, y2) in zip(ea, eb))


def test_same_batches_with_zero_and_two_workers(voc_train):
    kw = dict(batch_size=4, shuffle=True, drop_last=True, seed=5)
    serial = epochs(build_loader(voc_train, num_workers=0, **kw), [0, 1])
    state = random.getstate()
    parallel = epochs(build_loader(voc_train, num_workers=2, **kw), [0, 1])
    assert random.getstate() == state     # the main process's stream is left alone
    assert len(serial[0]) == len(voc_train) // 4
    assert same(serial, parallel)
    # another epoch or another seed gives other crops
    assert not same([serial[0]], [serial[1]])
    other = epochs(build_loader(voc_train, num_workers=0, **dict(kw, seed=6)), [0])
    assert not same([serial[0]], other)


def test_resume_at_an_epoch_sees_the_same_batches(voc_train):
    kw = dict(batch_size=3, shuffle=True, drop_last=True, num_workers=0, seed=1)
    full = epochs(build_loader(voc_train, **kw), [0, 1, 2])
    resumed = epochs(build_loader(voc_train, **kw), [2])
    assert same([full[2]], resumed)


def test_cross_val_split_is_random_split_with_the_global_rng(voc_train):
    torch.manual_seed(17)
    train, val = cross_val_split(voc_train)
    torch.manual_seed(17)
    ref_train, ref_val = random_split(range(len(voc_train)),
                                      [int(0.8 * len(voc_train)),
                                       len(voc_train) - int(0.8 * len(voc_train))])
    assert train.indices == list(ref_train.indices) and val.indices == list(ref_val.indices)
    assert len(train) == int(0.8 * len(voc_train))
    x, y = train[(2, 77)]
    x_ref, y_ref = voc_train[(train.indices[2], 77)]
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert isinstance(train, IndexSubset)
    loader = build_loader(train, 2, shuffle=True, drop_last=True, num_workers=0, seed=0)
    assert len(list(loader)) == len(train) // 2


def test_factory_builds_the_three_sets(synthetic_voc, tmp_path):
    opts = parse_options(["--dataset", "voc", "--task", "15-5", "--step", "1", "--data_root",
                          str(synthetic_voc), "--index_dir", str(tmp_path), "--crop_size",
                          "32", "--num_workers", "0"])
    train, val, test, n_classes = get_dataset(opts)
    assert n_classes == 21
    folder = tmp_path / "voc" / "15-5"
    assert sorted(p.name for p in folder.glob("*.npy")) == [
        "test_on_val-1.npy", "train-1.npy", "val-1.npy"]
    assert train.masking_value == 0 and not train.overlap and train.labels == [0, 16, 17, 18,
                                                                             19, 20]
    assert val.masking_value == 255 and val.overlap and val.labels_old[1:] == list(range(1, 16))
    assert test.labels == list(range(21)) and test.labels_old == [0]
    assert tuple(train[0][0].shape) == (3, 32, 32)
    # overlapped lists live in the -ov folder; test on the training split uses m = 0
    opts = parse_options(["--dataset", "voc", "--task", "15-5", "--step", "1", "--data_root",
                          str(synthetic_voc), "--index_dir", str(tmp_path), "--overlap",
                          "--val_on_trainset", "--cross_val", "--num_workers", "0"])
    torch.manual_seed(0)
    train, val, test, _ = get_dataset(opts)
    assert (tmp_path / "voc" / "15-5-ov" / "test_on_train-1.npy").exists()
    assert not (tmp_path / "voc" / "15-5-ov" / "val-1.npy").exists()
    assert test.masking_value == 0 and isinstance(val, IndexSubset)
    assert np.load(tmp_path / "voc" / "15-5-ov" / "train-1.npy").tolist() == \
        train.dataset.indices
