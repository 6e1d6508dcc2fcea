"""The exemplar memory of SSUL-M (docs/behaviour.md, SSUL: memory).

* ``candidate_labels`` / ``make_candidate`` / ``image_candidate``: what SSUL records per
  image;
* ``balanced_round_robin``: the class-balanced selection with SSUL's use of the NumPy
  generator. Candidates are opaque entries; ``labels_of`` says which classes an entry holds,
  so other layouts (DKD's ``[name, labels]``) and class lists reuse it unchanged;
* ``update_memory_record``: the memory file's dictionary after a selection (S7);
* ``memory_file_names``: the memory list repeated until it fills a batch;
* ``mix_memory``: half of a training batch replaced by memory rows (before both forwards).
"""
import copy
from typing import NamedTuple

import torch

from utils.errors import UserError

from .labels import class_layout, mask_and_order, pseudo_label, unknown_target

__all__ = ["candidate_labels", "make_candidate", "image_candidate", "balanced_round_robin",
           "Selection", "MemoryStallError", "ON_STALL", "update_memory_record", "memory_file_names",
           "mix_memory", "MemorySelectionError"]

IGNORE = 255
ON_STALL = ("error", "stop")


class MemorySelectionError(UserError, ValueError):
    """Inputs the memory functions are not defined for."""


class MemoryStallError(MemorySelectionError):
    """The round robin cannot fill the memory: SSUL would loop forever (S9)."""


def candidate_labels(target, *, unknown, drop_ignore=False):
    """The classes SSUL records for one image: the sorted distinct target values, minus 1 with
    the unknown class, without -1 and 0 (so unknown and background drop out). The ignore value
    255 stays as 254 (S8); ``drop_ignore`` leaves it out."""
    values = torch.unique(torch.as_tensor(target)).tolist()
    if drop_ignore:
        values = [v for v in values if v != IGNORE]
    shift = 1 if unknown else 0
    return [v - shift for v in values if v - shift not in (-1, 0)]


def make_candidate(name, target, *, fg_idx, unknown, drop_ignore=False):
    """SSUL's entry ``[name, number of labels, foreground pixels (y > fg_idx), labels]``."""
    target = torch.as_tensor(target)
    labels = candidate_labels(target, unknown=unknown, drop_ignore=drop_ignore)
    return [name, len(labels), int((target > fg_idx).sum()), labels]


def image_candidate(name, mask, classes_per_step, step, *, unknown=True, old_logits=None,
                    loss_type="bce_loss", threshold=0.7, drop_ignore=False):
    """SSUL's candidate for one image of the step ``step - 1`` training list, selecting the
    memory of ``step``: ``mask`` (original ids, already resized and centre-cropped as SSUL's
    validation transform does) labelled as step ``step - 1`` training data, then at step > 1
    pseudo-labelled with ``old_logits`` (1 x C x H x W, the step ``step - 1`` network) with
    sigmoid, or softmax for ``ce_loss`` only, and a fixed ``threshold`` 0.7 (S12)."""
    target = mask_and_order(mask, classes_per_step, step - 1, "train")
    layout = class_layout(classes_per_step, step - 1, unknown)
    if unknown:
        # unknown (0) and background (1) both drop out of the candidate: no saliency needed
        target = unknown_target(target, torch.ones_like(target))
    if step > 1:
        if old_logits is None:
            raise MemorySelectionError("candidates after step 1 need the old model's logits")
        kind = "ce_loss" if loss_type == "ce_loss" else "bce_loss"
        target = pseudo_label(target[None], old_logits, fg_idx=layout.fg_idx,
                              threshold=threshold, loss_type=kind)[0]
    return make_candidate(name, target, fg_idx=layout.fg_idx, unknown=unknown,
                          drop_ignore=drop_ignore)


class Selection(NamedTuple):
    chosen: list         # entries, concatenated in the order of ``classes``
    per_class: dict      # class -> entries taken for it
    shuffled_pool: list  # the pool after the shuffle (before anything was taken)
    class_order: list    # the classes after the shuffle


def _ssul_labels(entry):
    return entry[-1]


def balanced_round_robin(pool, classes, mem_size, rng, *, labels_of=_ssul_labels,
                         on_stall="error"):
    """Select ``mem_size`` entries of ``pool``, balanced over ``classes``.

    With ``rng`` (NumPy's legacy generator: the ``numpy.random`` module after
    ``numpy.random.seed(s)``, or a ``RandomState(s)``, same draws): shuffle a copy of the pool,
    shuffle a copy of ``classes``, then go round the shuffled classes, each taking the first
    remaining entry whose ``labels_of(entry)`` holds it, until ``mem_size`` are taken. A class
    with no entry left is skipped. When a whole round takes nothing SSUL loops forever (S9):
    ``on_stall="error"`` raises MemoryStallError, ``"stop"`` keeps what was taken.
    """
    if on_stall not in ON_STALL:
        raise MemorySelectionError(f"on_stall must be one of {ON_STALL}, got {on_stall!r}")
    if mem_size < 0:
        raise MemorySelectionError(f"memory size must be >= 0, got {mem_size}")
    remaining = list(pool)
    rng.shuffle(remaining)
    shuffled = list(remaining)
    order = list(classes)
    rng.shuffle(order)
    per_class = {c: [] for c in classes}
    taken = 0
    while taken < mem_size:
        before = taken
        for c in order:
            for i, entry in enumerate(remaining):
                if c in labels_of(entry):
                    per_class[c].append(remaining.pop(i))
                    taken += 1
                    break
            if taken >= mem_size:
                break
        if taken == before:
            if on_stall == "error":
                raise MemoryStallError(
                    f"the memory cannot hold {mem_size} images: only {taken} of the "
                    f"{len(pool)} candidates hold a class of the earlier steps (SSUL and DKD "
                    f"loop forever here); lower --mem_size, or let the selection stop short")
            break
    chosen = [entry for c in classes for entry in per_class[c]]
    return Selection(chosen, per_class, shuffled, order)


def update_memory_record(record, step, new_candidates, chosen, *, name_of=lambda e: e[0],
                         alias_previous=True):
    """The memory file's dictionary after the selection of ``step`` (a new dictionary):
    ``step_<t>`` = {"memory_candidates": chosen, "memory_list": sorted names}. SSUL appends the
    step's new candidates to the previous entry's stored candidates (S7); ``alias_previous=
    False`` leaves the previous entry as it was (the fix)."""
    out = copy.deepcopy(record) if record else {}
    previous = out.get(f"step_{step - 1}")
    if alias_previous and previous is not None:
        previous["memory_candidates"] = list(previous["memory_candidates"]) + \
            copy.deepcopy(list(new_candidates))
    out[f"step_{step}"] = {"memory_candidates": copy.deepcopy(list(chosen)),
                           "memory_list": sorted(name_of(e) for e in chosen)}
    return out


def memory_file_names(memory_list, batch_size):
    """The memory list doubled (``list * 2``) until it holds at least ``batch_size`` names."""
    names = list(memory_list)
    if not names:
        raise MemorySelectionError("the memory list is empty: there is nothing to replay")
    while len(names) < batch_size:
        names = names * 2
    return names


def mix_memory(batch, memory_batch, generator=None):
    """Replace rows ``idx = randperm(B)[:B // 2]`` of every tensor of ``batch`` by the same
    rows of ``memory_batch`` (the other memory rows are unused, S27). ``batch`` and
    ``memory_batch`` are sequences of tensors with the batch first (image, label, saliency...).
    The permutation comes from the global torch generator unless ``generator`` is given.
    Returns (mixed tensors, idx); the inputs are not modified."""
    size = batch[0].shape[0]
    if len(batch) != len(memory_batch) or any(
            m.shape[0] != size or m.shape[1:] != b.shape[1:] for b, m in zip(batch, memory_batch)):
        raise MemorySelectionError("the memory batch must match the training batch in size and "
                           "tensor shapes (both loaders drop their last incomplete batch)")
    idx = torch.randperm(size, generator=generator)[:size // 2]
    mixed = []
    for b, m in zip(batch, memory_batch):
        out = b.clone()
        out[idx] = m[idx].to(out.dtype)
        mixed.append(out)
    return mixed, idx
