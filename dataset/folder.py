"""A user's own dataset in one folder layout (``--dataset folder``):

    <data_root>/classes.txt          one class name per line: line 1 is label 0 (background),
                                     line k+1 is label k
    <data_root>/images/<id>.jpg      (or .jpeg / .png)
    <data_root>/masks/<id>.png       label ids per pixel: a grey ("L") or palette ("P") PNG
                                     whose values are the labels (the palette only colours
                                     them); 255 = ignore (unlabelled, borders)
    <data_root>/splits/train.txt     one <id> per line (blank lines skipped)
    <data_root>/splits/val.txt

Index i of a split is line i of its list. Label 0 is the background, as VOC's: it belongs to
step 0, and masked or future classes become 0 in training and 255 in validation. The steps
come from a task file (``--task_file``); the task ``offline`` (every class in one step) is
always there.
"""
import hashlib
import os

from PIL import Image

from .base import IncrementalSegmentation, SegmentationSplit
from .errors import DatasetLayoutError

CLASSES_FILE = "classes.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IGNORE = 255
MASK_MODES = ("L", "P")
SPLITS = {True: "train", False: "val"}
LAYOUT = "docs/custom_data.md"


def read_class_names(root):
    """The class names of ``classes.txt`` (line k = label k - 1); one error line when the file
    is missing, empty or names more than 255 classes."""
    path = os.path.join(os.path.expanduser(root), CLASSES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path} does not exist; a folder dataset needs a class-name "
                                 f"file, one name per line, background first ({LAYOUT})") from None
    while names and not names[-1]:
        names.pop()
    if len(names) < 2:
        raise DatasetLayoutError(f"{path} names {len(names)} class(es); it needs the "
                                 "background and at least one class, one per line")
    if len(names) > IGNORE:
        raise DatasetLayoutError(f"{path} names {len(names)} classes; at most {IGNORE} fit "
                                 f"in 8-bit masks with {IGNORE} as ignore")
    empty = [k for k, name in enumerate(names) if not name]
    if empty:
        raise DatasetLayoutError(f"{path} line {empty[0] + 1} is empty; give every label "
                                 "0..n-1 a name")
    return names


class FolderSegmentation(SegmentationSplit):
    """A whole split of a folder dataset: ``train`` (splits/train.txt) or val."""

    def __init__(self, root, train=True, transform=None):
        super().__init__(transform)
        root = os.path.expanduser(root)
        names = read_class_names(root)
        self.known_labels = tuple(range(len(names)))
        split_f = os.path.join(root, "splits", SPLITS[train] + ".txt")
        if not os.path.isfile(split_f):
            raise DatasetLayoutError(f"the '{SPLITS[train]}' split list {split_f} does not "
                                     f"exist; write one image id per line ({LAYOUT})")
        with open(split_f, encoding="utf-8") as f:
            ids = [line.strip() for line in f if line.strip()]
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        images = self._by_stem(image_dir, IMAGE_EXTENSIONS)
        masks = self._by_stem(mask_dir, (".png",))
        for number, image_id in enumerate(ids, 1):
            if image_id not in images:
                raise DatasetLayoutError(f"{split_f} line {number}: no image '{image_id}' "
                                         f"({'/'.join(IMAGE_EXTENSIONS)}) in {image_dir}")
            if image_id not in masks:
                raise DatasetLayoutError(f"{split_f} line {number}: no mask '{image_id}.png' "
                                         f"in {mask_dir}")
        self.root = root
        self.split_name = split_f
        self.images = [(images[i], masks[i]) for i in ids]
        if self.images:
            self._check_mask_mode(self.images[0][1])
        self.source = {
            "dataset": "folder",
            "data_root": os.path.abspath(root),
            "split_file": os.path.abspath(split_f),
            "entries": len(ids),
            "split_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
            "classes": len(names),
        }

    @staticmethod
    def _by_stem(folder, extensions):
        if not os.path.isdir(folder):
            raise DatasetLayoutError(f"{folder} does not exist; a folder dataset has images/, "
                                     f"masks/ and splits/ beside {CLASSES_FILE} ({LAYOUT})")
        found = {}
        for entry in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(entry)
            if ext.lower() in extensions:
                found.setdefault(stem, os.path.join(folder, entry))
        return found

    @staticmethod
    def _check_mask_mode(path):
        """Label ids must be the pixel values: grey or palette PNGs (an RGB mask would be
        read as colours, not labels)."""
        with Image.open(path) as mask:
            mode = mask.mode
        if mode not in MASK_MODES:
            raise DatasetLayoutError(f"mask {path} is a {mode} image; save masks as grey (L) "
                                     "or palette (P) PNGs whose pixel values are the label ids")


class FolderSegmentationIncremental(IncrementalSegmentation):
    """The images of a folder dataset for one incremental step (VOC's rules: label 0 is the
    background, 255 is ignored; keywords as ``IncrementalSegmentation``)."""

    zero_is_background = True
    void_value = IGNORE

    def __init__(self, root, train=True, transform=None, labels=None, labels_old=None,
                 idxs_path=None, masking=True, overlap=True, void_as_ignore=False,
                 num_workers=0, progress=True, save_index=True, protocol="mib"):
        base = FolderSegmentation(root, train=train)
        super().__init__(base, train=train, transform=transform, labels=labels,
                         labels_old=labels_old, idxs_path=idxs_path, masking=masking,
                         overlap=overlap, void_as_ignore=void_as_ignore,
                         num_workers=num_workers, progress=progress, save_index=save_index,
                         protocol=protocol)
