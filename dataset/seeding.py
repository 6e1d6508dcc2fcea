"""Per-sample seeds for the random transforms.

The original seeds each DataLoader worker, so its crops and flips depend on the number of
workers. Here the sampler hands every index together with a seed derived from (run seed,
epoch, position in the epoch's permutation), and the dataset seeds Python's ``random`` (which
the transforms use) with it before transforming: the same images get the same augmentation
whatever the number of workers, with persistent workers, and after a resume.
"""
import contextlib
import random

_MASK64 = (1 << 64) - 1


def _mix(x):
    """SplitMix64 finaliser: a bijective scramble of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed, epoch, position):
    """Deterministic 64-bit seed of the sample at ``position`` of ``epoch``."""
    return _mix(_mix(_mix(seed & _MASK64) ^ (epoch & _MASK64)) ^ (position & _MASK64))


@contextlib.contextmanager
def python_random_seeded(seed):
    """Run the block with Python's ``random`` seeded by ``seed``; restore the state after,
    so that a loader without workers leaves the main process's stream untouched."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def split_item(item):
    """``(index, sample_seed)`` from a dataset key: an int or an (index, seed) pair."""
    if isinstance(item, (tuple, list)):
        index, seed = item
        return int(index), seed
    return int(item), None
