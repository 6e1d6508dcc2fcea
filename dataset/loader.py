"""Data loaders whose augmentation does not depend on the number of workers.

``SeededSampler`` wraps a sampler (normally ``DistributedSampler``) and yields
``(index, sample_seed)`` pairs; the datasets of this package seed Python's ``random`` with
sample_seed before their random transforms. Deviation from the original, which seeds each
worker process (``base_seed + worker_id``) so that its crops and flips change with
``--num_workers``: here they depend only on (seed, epoch, position), so runs with 0, 1 or 8
workers, persistent workers, and a run resumed after a crash see the same augmented images.
"""
import bisect
import math
from collections.abc import Mapping

from torch.utils.data import DataLoader, Dataset, Sampler, random_split
from torch.utils.data.distributed import DistributedSampler

from .seeding import sample_seed, split_item


class SeededSampler(Sampler):
    """Yield ``(index, sample_seed)`` for every index of ``sampler``.

    The position is the index's place in the whole epoch's (padded) permutation: for a
    ``DistributedSampler``, rank r's k-th index is position ``k * num_replicas + r``, so a
    sample's seed does not depend on which process draws it. ``set_epoch`` forwards.
    """

    def __init__(self, sampler, seed):
        self.sampler = sampler
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        stride = getattr(self.sampler, "num_replicas", 1)
        offset = getattr(self.sampler, "rank", 0)
        for k, index in enumerate(self.sampler):
            yield int(index), sample_seed(self.seed, self.epoch, k * stride + offset)

    def __len__(self):
        return len(self.sampler)


def build_loader(dataset, batch_size, shuffle, drop_last, num_workers, seed, rank=0,
                 world_size=1, pin_memory=False):
    """A DataLoader over ``DistributedSampler(dataset, world_size, rank, shuffle)`` (no
    process group needed) wrapped in ``SeededSampler``; workers persist across epochs.

    Call ``loader.sampler.set_epoch(e)`` before each epoch. With ``drop_last``,
    ``len(loader) == ceil(len(dataset) / world_size) // batch_size``.
    """
    dist_sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                      shuffle=shuffle)
    return DataLoader(dataset, batch_size=batch_size, sampler=SeededSampler(dist_sampler, seed),
                      num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def expected_length(n, batch_size, world_size=1, drop_last=True):
    """Batches per process of ``build_loader`` for ``n`` items."""
    per_process = math.ceil(n / world_size)
    return per_process // batch_size if drop_last else math.ceil(per_process / batch_size)


class IndexSubset(Dataset):
    """``dataset`` restricted to ``indices``; passes ``(index, sample_seed)`` keys through."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = list(indices)

    def __getitem__(self, item):
        index, seed = split_item(item)
        inner = self.indices[index]
        return self.dataset[inner if seed is None else (inner, seed)]

    def __len__(self):
        return len(self.indices)


def cross_val_split(dataset, train_fraction=0.8):
    """The ``--cross_val`` split: ``torch.utils.data.random_split`` with the global torch
    RNG into the first ``int(0.8 N)`` items (training) and the rest (validation)."""
    n_train = int(train_fraction * len(dataset))
    train_part, val_part = random_split(dataset, [n_train, len(dataset) - n_train])
    return IndexSubset(dataset, train_part.indices), IndexSubset(dataset, val_part.indices)


def as_mapping(sample):
    """A sample (or a batch) as a mapping ``image``, ``label``, ``extras``: datasets give a
    pair, or a mapping when extra per-pixel maps are read."""
    if isinstance(sample, Mapping):
        return {"image": sample["image"], "label": sample["label"],
                "extras": dict(sample.get("extras") or {})}
    image, label = sample
    return {"image": image, "label": label, "extras": {}}


def images_and_labels(sample):
    """(images, labels) of a sample or batch, pair or mapping."""
    sample = as_mapping(sample)
    return sample["image"], sample["label"]


class MappingDataset(Dataset):
    """``dataset`` whose items are mappings (``as_mapping``); keys pass through."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        return as_mapping(self.dataset[item])

    def __len__(self):
        return len(self.dataset)


class JoinedDataset(Dataset):
    """Datasets one after the other (a step's training set and a replay memory), passing
    ``(index, sample_seed)`` keys through to the dataset that holds the index. Items are
    mappings, so that parts with and without extra maps can be joined."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        self.ends = []
        total = 0
        for d in self.datasets:
            total += len(d)
            self.ends.append(total)

    def __getitem__(self, item):
        index, seed = split_item(item)
        k = bisect.bisect_right(self.ends, index)
        inner = index - (self.ends[k - 1] if k else 0)
        return as_mapping(self.datasets[k][inner if seed is None else (inner, seed)])

    def __len__(self):
        return self.ends[-1] if self.ends else 0
