"""Label remapping (original label id -> model channel, or the masking value) by lookup table.

The original calls a Python function per pixel; a 256-entry table gives the same result in
one indexing operation. Rules (raw value v, order = [0] + old labels + current labels,
m = masking value):

* v in the current labels -> position of v in ``order``;
* v in the old labels -> position in ``order`` without masking, m with masking;
* every other value (future or unknown classes, VOC 255, ADE 0) -> m;
* except VOC background 0, which stays 0 (``zero_is_background``);
* ``void_value`` (VOC 255 / ADE 0), when given, -> 255 (the --train_void_as_ignore fix).
"""
import numpy as np
import torch
from PIL import Image

IGNORE = 255


def build_lut(labels, labels_old, masking, masking_value, zero_is_background,
              void_value=None):
    """The 256-entry uint8 table for current ``labels`` and ``labels_old`` (0 stripped)."""
    labels = [lab for lab in labels if lab != 0]
    labels_old = [lab for lab in labels_old if lab != 0]
    order = [0] + labels_old + labels
    position = {lab: i for i, lab in enumerate(order)}
    lut = np.full(256, masking_value, dtype=np.uint8)
    for lab in labels if masking else labels_old + labels:
        if 0 <= lab < 256:
            lut[lab] = position[lab]
    if zero_is_background:
        lut[0] = 0
    if void_value is not None:
        lut[void_value] = IGNORE
    return lut


def apply_lut(target, lut):
    """``target`` with every value v replaced by ``lut[v]``; keeps the container type.

    Accepts a uint8 tensor (what ToTensor gives), a NumPy array or a PIL image.
    """
    if isinstance(target, torch.Tensor):
        return torch.from_numpy(np.take(lut, target.numpy()))
    if isinstance(target, Image.Image):
        return Image.fromarray(np.take(lut, np.asarray(target, dtype=np.uint8)))
    return np.take(lut, np.asarray(target))
