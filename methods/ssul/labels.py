"""SSUL's classes, channels and labels (docs/behaviour.md, SSUL: labels and prediction).

``classes_per_step`` is the task table: one list of original class ids per step, 0 (background)
in step 0. "Class k" below is a task-order index: the position of the id in the steps' lists
concatenated (the identity for the standard orders).
"""
import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from utils.errors import RunError, UserError

__all__ = ["ClassLayout", "class_layout", "ordering_map", "kept_classes", "uses_saliency",
           "target_lut", "mask_and_order",
           "pad_if_needed", "unknown_target", "SALIENCY_DIR", "saliency_path", "read_saliency",
           "SaliencyMissingError", "pseudo_label", "predict", "parse_class_index",
           "select_step_images", "LabelError"]

IGNORE = 255
SALIENCY_DIR = "saliency_map"   # <data root>/saliency_map/<image name>.png, as SSUL's layout


class LabelError(UserError, ValueError):
    """Labels, masks or class tables that SSUL's rules are not defined for."""


class SaliencyMissingError(RunError, FileNotFoundError):
    """A training image has no saliency map."""


class ClassLayout(NamedTuple):
    num_classes: list    # one entry per head
    channels: int        # output channels (classes + 1 with the unknown class)
    fg_idx: int          # last non-foreground channel: 1 with the unknown class, else 0
    curr_idx: list       # [first, end) of the step's classes, task order
    metric_classes: int  # classes seen, background included
    first_cls: int       # classes of step 0, background included


def class_layout(classes_per_step, step, unknown):
    """Heads and channels of ``step``: ``[n_0, ..., n_t]``, or ``[1, 1, n_0 - 1, n_1, ...,
    n_t]`` with the unknown class (channel 0 unknown, 1 background, class k on channel k + 1)."""
    if not 0 <= step < len(classes_per_step):
        raise LabelError(f"step {step} does not exist: the task has {len(classes_per_step)} steps")
    n = [len(classes_per_step[s]) for s in range(step + 1)]
    num_classes = [1, 1, n[0] - 1] + n[1:] if unknown else n
    return ClassLayout(num_classes, sum(num_classes), 1 if unknown else 0,
                       [sum(n[:-1]), sum(n)], sum(n), n[0])


def ordering_map(classes_per_step):
    """256 entries: id -> task-order index for ids below the number of classes, else 255."""
    order = [c for step in classes_per_step for c in step]
    lut = np.full(256, IGNORE, dtype=np.int64)
    position = {c: i for i, c in enumerate(order)}
    for c in range(len(order)):
        if c not in position:
            raise LabelError(f"class {c} is in no step of the task table")
        lut[c] = position[c]
    return lut


def kept_classes(classes_per_step, step, image_set):
    """The original ids that SSUL's masking keeps (every other id becomes 0): ``train`` and
    ``val`` the step's classes, ``memory`` those of every step so far (future ones become 0),
    each with 255; ``test`` keeps everything (None)."""
    if image_set == "test":
        return None
    if image_set in ("train", "val"):
        keep = set(classes_per_step[step])
    elif image_set == "memory":
        keep = {c for s in range(step + 1) for c in classes_per_step[s]}
    else:
        raise LabelError(f"image set must be train, val, test or memory, got {image_set!r}")
    return sorted(keep | {IGNORE})


def uses_saliency(voc, image_set):
    """SSUL reads saliency maps only for VOC training images; every other image gets a map of
    ones (so ADE's unknown class covers all of the background)."""
    return voc and image_set == "train"


def target_lut(classes_per_step, step, image_set):
    """The lookup table of SSUL's masking (``kept_classes``) then task order, for original
    ids 0..255."""
    order = ordering_map(classes_per_step)
    keep = kept_classes(classes_per_step, step, image_set)
    if keep is None:
        return order
    kept = np.isin(np.arange(256), keep)
    return np.where(kept, order, order[0])


def mask_and_order(mask, classes_per_step, step, image_set):
    """``mask`` (original ids, uint8 array or tensor) -> masked task-order labels (int64
    tensor); see ``target_lut``."""
    mask = torch.as_tensor(np.asarray(mask)).long()
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise LabelError("mask values must be in 0..255")
    return torch.from_numpy(target_lut(classes_per_step, step, image_set))[mask]


def pad_if_needed(array, crop, fill=0):
    """SSUL's random-crop padding of a H x W map: a short width pads **all four sides** by
    (1 + crop - W) // 2, then the same test for the height. ``fill=0`` labels the padding
    background (S10); fill 255 ignores it (the fix)."""
    x = torch.as_tensor(np.asarray(array))
    for axis in (1, 0):
        size = x.shape[axis]
        if size < crop:
            p = (1 + crop - size) // 2
            x = torch.nn.functional.pad(x[None], (p, p, p, p), value=fill)[0]
    return x


def unknown_target(target, saliency, *, voc=True, saliency_threshold=0):
    """The training target with the unknown class: 255 stays, every other label k becomes
    k + 1, then background (1) becomes unknown (0) where the saliency map is above
    ``saliency_threshold`` (VOC; any value > 0 by default, S26) or everywhere (ADE, S24)."""
    y = torch.as_tensor(np.asarray(target)).long()
    shifted = torch.where(y == IGNORE, y, y + 1)
    if voc:
        salient = torch.as_tensor(np.asarray(saliency)).long() > saliency_threshold
        if salient.shape != y.shape:
            raise LabelError(f"saliency map {tuple(salient.shape)} and mask {tuple(y.shape)} "
                             f"differ in size")
    else:
        salient = torch.ones_like(y, dtype=torch.bool)
    return torch.where((shifted == 1) & salient, torch.zeros_like(shifted), shifted)


def saliency_path(root, name):
    return os.path.join(root, SALIENCY_DIR, f"{name}.png")


def read_saliency(root, name):
    """The saliency map of image ``name`` (uint8 H x W). SSUL reads it for every VOC
    training image, with or without the unknown class (S26)."""
    path = saliency_path(root, name)
    if not os.path.isfile(path):
        raise SaliencyMissingError(
            f"saliency map {path} is missing: SSUL needs one per training image in "
            f"<data root>/{SALIENCY_DIR}/ (data/download_voc.sh has a step that fetches them)")
    with Image.open(path) as img:
        return np.array(img.convert("L") if img.mode not in ("L", "P") else img, dtype=np.uint8)


def _probabilities(logits, loss_type):
    if loss_type == "bce_loss":
        return torch.sigmoid(logits)
    if loss_type in ("ce_loss", "focal_loss"):
        return torch.softmax(logits, dim=1)
    raise LabelError(f"loss type must be bce_loss, ce_loss or focal_loss, got {loss_type!r}")


def pseudo_label(labels, old_logits, *, fg_idx, threshold, loss_type="bce_loss",
                 upcast=False):
    """SSUL's pseudo-labels (step > 0): p = sigmoid (bce_loss) or softmax of the old logits,
    s, y^ = max, first argmax; a pixel labelled unknown or background (y <= fg_idx) takes an
    old foreground class y^ > fg_idx when s >= ``threshold``; every other pixel keeps y.

    The logits are used in their dtype (with autocast, half precision: S13); ``upcast``
    computes in float32."""
    if old_logits.dim() != 4 or labels.shape != old_logits.shape[:1] + old_logits.shape[2:]:
        raise LabelError(f"labels {tuple(labels.shape)} do not match old logits "
                         f"{tuple(old_logits.shape)}")
    if upcast:
        old_logits = old_logits.float()
    score, guess = _probabilities(old_logits, loss_type).max(dim=1)
    take = (labels <= fg_idx) & (guess > fg_idx) & (score >= threshold)
    return torch.where(take, guess.to(labels.dtype), labels)


def predict(logits, *, loss_type="bce_loss", unknown=True):
    """Class per pixel: argmax (first) of sigmoid (bce_loss) or softmax probabilities; with
    the unknown class, the unknown probability is added to the background's and channel 0
    dropped, so class k is channel k."""
    p = _probabilities(logits, loss_type)
    if unknown:
        p = torch.cat([p[:, 1:2] + p[:, 0:1], p[:, 2:]], dim=1)
    return p.argmax(dim=1)


# ---------------------------------------------------------------------- image lists
def parse_class_index(lines):
    """SSUL's ``<name> c1 c2 ...`` lines (c = class id - 1) -> [(name, [ids])]."""
    out = []
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        try:
            out.append((parts[0], [int(c) + 1 for c in parts[1:]]))
        except ValueError:
            raise LabelError(f"class index line {line!r}: expected a name then class numbers") \
                from None
    return out


def select_step_images(index, classes_per_step, step, *, overlap, disjoint_old_classes=False):
    """Names of the step's training images, in index order: those with at least one class of
    the step (background aside); disjoint also requires every class to be the step's, 0, 255
    or an id in the numeric range 1 .. first step class - 1 (S21, wrong for permuted orders);
    ``disjoint_old_classes`` uses the classes of the earlier steps instead (the fix)."""
    current = [c for c in classes_per_step[step] if c != 0]
    if not current:
        raise LabelError(f"step {step} has no foreground class")
    if disjoint_old_classes:
        earlier = {c for s in range(step) for c in classes_per_step[s]}
    else:
        earlier = set(range(1, current[0]))
    allowed = set(current) | earlier | {0, IGNORE}
    names = []
    for name, classes in index:
        if not any(c in current for c in classes):
            continue
        if not overlap and not all(c in allowed for c in classes):
            continue
        names.append(name)
    return names
