"""What the VOC and ADE datasets share: a split reader (image/mask path pairs) and the
incremental subset of a step (image selection, index cache, transforms, label remapping)."""
import hashlib
import logging
import os
import random

import torch.utils.data as data

from . import index_cache
from .errors import DatasetLayoutError, IndexListError, SizeMismatchError
from .io import open_image, open_mask
from .remap import apply_lut, build_lut
from .seeding import python_random_seeded, split_item
from .utils import filter_images

log = logging.getLogger(__name__)


def sha1_of_file(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


class SegmentationSplit(data.Dataset):
    """A whole split: ``images`` is the list of (image path, mask path); index i = entry i.

    Subclasses fill ``images``, ``split_name`` (for messages), ``known_labels`` (the
    dataset's label ids, 255 aside) and ``source`` (what an index list is computed from).
    """

    images = ()
    split_name = "split"
    known_labels = ()
    source = {}

    def __init__(self, transform=None):
        self.transform = transform

    def load(self, index):
        """(RGB image, raw mask) of entry ``index`` as PIL images."""
        img_path, mask_path = self.images[index]
        img, mask = open_image(img_path), open_mask(mask_path)
        if img.size != mask.size:
            # the crops take their box from the image: a mask of another size would be cut
            # out of line with it and train on wrong labels without a word
            raise SizeMismatchError(
                f"image {img_path} is {img.size[0]}x{img.size[1]} but its mask {mask_path} is "
                f"{mask.size[0]}x{mask.size[1]}; give both the same size (or remove the pair "
                f"from {self.split_name})")
        return img, mask

    def __getitem__(self, index):
        img, mask = self.load(index)
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img, mask

    def extra_map_path(self, index, name):
        """Where the extra per-pixel map ``name`` of entry ``index`` is: a PNG of the same
        stem in the folder ``name`` beside the image's folder."""
        img_path = self.images[index][0]
        stem = os.path.splitext(os.path.basename(img_path))[0]
        return os.path.join(os.path.dirname(os.path.dirname(img_path)), name, stem + ".png")

    def load_extra(self, index, name):
        path = self.extra_map_path(index, name)
        if not os.path.isfile(path):
            raise DatasetLayoutError(f"extra map '{name}' of {self.images[index][0]} not found: "
                                     f"{path} does not exist (the method reads one per "
                                     "training image); make the maps or choose another method")
        return open_mask(path)

    def __len__(self):
        return len(self.images)


class IncrementalSegmentation(data.Dataset):
    """The images of a split selected for one step, with remapped and masked labels.

    ``__getitem__`` takes an index, or an ``(index, sample_seed)`` pair from
    ``dataset.loader.SeededSampler``: then Python's ``random`` is seeded with sample_seed
    before the (random) transforms run.
    """

    # Set by subclasses: VOC keeps 0 as background and marks void with 255; ADE masks its
    # void label 0 like any label outside the step.
    zero_is_background = True
    void_value = 255
    # names of the extra per-pixel maps read with every image (set by the engine when a
    # method asks for them); with none, items are (image, label) as in the original
    extra_maps = ()

    def __init__(self, base, train=True, transform=None, labels=None, labels_old=None,
                 idxs_path=None, masking=True, overlap=True, void_as_ignore=False,
                 num_workers=0, progress=True, save_index=True, protocol="mib"):
        if labels is None:
            raise ValueError("labels (the current step's label ids) must be given")
        labels = [lab for lab in labels if lab != 0]
        labels_old = [lab for lab in (labels_old or []) if lab != 0]
        if any(lab in labels_old for lab in labels):
            raise ValueError("labels and labels_old must be disjoint sets")
        self.base = base
        self.train = train
        self.transform = transform
        self.masking = masking
        self.overlap = overlap
        self.labels = [0] + labels
        self.labels_old = [0] + labels_old
        self.order = [0] + labels_old + labels
        self.inverted_order = {lab: i for i, lab in enumerate(self.order)}
        if protocol == "plop":
            # PLOP's remapping (P18): masked and future classes -> 0 in every split, label 0
            # stays 0 (ADE void is a scored class), VOC's void 255 stays ignored
            self.masking_value = 0
            void = self.void_value if self.void_value == 255 or void_as_ignore else None
            self.lut = build_lut(labels, labels_old, masking, 0, True, void)
        else:
            # the masking value follows the split: 0 for training, 255 for validation
            self.masking_value = 0 if train else 255
            self.lut = build_lut(labels, labels_old, masking, self.masking_value,
                                 self.zero_is_background,
                                 self.void_value if void_as_ignore else None)

        source = dict(base.source, labels=labels, labels_old=labels_old, overlap=overlap)

        def compute():
            return filter_images(base, labels, labels_old, overlap=overlap,
                                 num_workers=num_workers, progress=progress)

        self.indices = index_cache.cached_indices(idxs_path, compute, source,
                                                  save=save_index)
        bad = [i for i in self.indices if not 0 <= i < len(base)]
        if bad:
            raise IndexListError(f"index list {idxs_path} holds index {bad[0]} but "
                                 f"{base.split_name} has {len(base)} entries: the list "
                                 "belongs to other data; delete it or use another --index_dir")
        if not self.indices:
            log.warning("no image of %s holds a label of %s (%s selection): the dataset is "
                        "empty", base.split_name, labels, "overlapped" if overlap else "disjoint")

    def __getitem__(self, item):
        index, seed = split_item(item)
        img, mask = self.base.load(self.indices[index])
        if self.extra_maps:
            return self._with_extras(index, seed, img, mask)
        if self.transform is not None:
            if seed is None:
                img, mask = self.transform(img, mask)
            else:
                with python_random_seeded(seed):
                    img, mask = self.transform(img, mask)
        return img, apply_lut(mask, self.lut)

    def _with_extras(self, index, seed, img, mask):
        """A mapping (image, label, extras): each extra map goes through the same joint
        transform as the label, with the same draws of Python's ``random``."""
        extras = {name: self.base.load_extra(self.indices[index], name)
                  for name in self.extra_maps}
        if self.transform is not None:
            with python_random_seeded(seed if seed is not None else random.getrandbits(64)):
                state = random.getstate()
                img_t, mask = self.transform(img, mask)
                for name, extra in extras.items():
                    random.setstate(state)
                    extras[name] = self.transform(img, extra)[1]
            img = img_t
        return {"image": img, "label": apply_lut(mask, self.lut), "extras": extras}

    def __len__(self):
        return len(self.indices)


def layout_message(what, path, script, root):
    """The one-line message for a missing part of a dataset tree."""
    return (f"{what} not found: {path} does not exist; download the dataset with "
            f"'bash {script} {root}' (or point --data_root at the folder that holds it)")
