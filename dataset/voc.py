"""Pascal VOC 2012 with the SBD augmentation, in the original layout:

    <data_root>/PascalVOC12/JPEGImages/<id>.jpg
    <data_root>/PascalVOC12/SegmentationClassAug/<id>.png   (0 background, 1..20, 255 void)
    <data_root>/PascalVOC12/splits/train_aug.txt, val.txt
        (lines "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png")

Index i of a split is line i of its list file.
"""
import os

from .base import IncrementalSegmentation, SegmentationSplit, layout_message, sha1_of_file
from .errors import DatasetLayoutError
from .io import first_missing

VOC_FOLDER = "PascalVOC12"
SCRIPT = "data/download_voc.sh"
NUM_LABELS = 21  # 0 = background, 1..20 classes


def read_split_file(split_f, voc_root):
    """(image, mask) paths of every line of a VOC list file, as the original reads them:
    the last character of each line (the newline) and the first character of each path
    (the leading '/') are dropped, and the paths are joined to the VOC root."""
    with open(split_f) as f:
        lines = f.readlines()
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line[:-1].split(" ")
        if len(fields) < 2:
            raise DatasetLayoutError(f"{split_f} line {number} is {line!r}; every line must "
                                     "be '/<image path> /<mask path>'")
        pairs.append((os.path.join(voc_root, fields[0][1:]),
                      os.path.join(voc_root, fields[1][1:])))
    return pairs, lines


class VOCSegmentation(SegmentationSplit):
    """A whole VOC split: ``image_set`` 'train' (train_aug with ``is_aug``) or 'val'."""

    known_labels = tuple(range(NUM_LABELS))

    def __init__(self, root, image_set="train", is_aug=True, transform=None):
        super().__init__(transform)
        root = os.path.expanduser(root)
        voc_root = os.path.join(root, VOC_FOLDER)
        if not os.path.isdir(voc_root):
            raise DatasetLayoutError(layout_message("Pascal VOC", voc_root, SCRIPT, root))
        splits_dir = os.path.join(voc_root, "splits")
        if is_aug and image_set == "train":
            mask_dir = os.path.join(voc_root, "SegmentationClassAug")
            if not os.path.isdir(mask_dir):
                raise DatasetLayoutError(layout_message("the SBD-augmented masks", mask_dir,
                                                        SCRIPT, root))
            split_f = os.path.join(splits_dir, "train_aug.txt")
        else:
            split_f = os.path.join(splits_dir, image_set + ".txt")
        if not os.path.isfile(split_f):
            raise DatasetLayoutError(layout_message(f"the '{image_set}' split list", split_f,
                                                    SCRIPT, root))
        self.root = voc_root
        self.split_file = split_f
        self.split_name = f"{split_f}"
        self.images, lines = read_split_file(split_f, voc_root)
        self._check_files(lines)
        self.source = {
            "dataset": "voc",
            "data_root": os.path.abspath(root),
            "split_file": os.path.abspath(split_f),
            "entries": len(self.images),
            "split_sha1": sha1_of_file(split_f),
        }

    def _check_files(self, lines):
        missing = first_missing(p for pair in self.images for p in pair)
        if missing is None:
            return
        number = next(n for n, pair in enumerate(self.images, 1) if missing in pair)
        hint = "; fix the list or restore the file"
        line = lines[number - 1]
        if number == len(lines) and not line.endswith("\n"):
            hint = ("; the list's last line has no newline and, as in the original, the "
                    "last character of every line is dropped: add a newline at the end")
        elif not line.startswith("/"):
            hint = "; paths in the list must start with '/' (it is dropped when reading)"
        raise DatasetLayoutError(f"{missing} (line {number} of {self.split_file}) does not "
                                 f"exist{hint}")


class VOCSegmentationIncremental(IncrementalSegmentation):
    """The VOC images of one incremental step (keywords as the original, plus ours).

    ``root`` holds ``PascalVOC12/``; ``train`` picks train_aug (masking value 0) or val
    (masking value 255). See ``IncrementalSegmentation`` for the other keywords.
    """

    zero_is_background = True
    void_value = 255

    def __init__(self, root, train=True, transform=None, labels=None, labels_old=None,
                 idxs_path=None, masking=True, overlap=True, void_as_ignore=False,
                 num_workers=0, progress=True, save_index=True, protocol="mib"):
        base = VOCSegmentation(root, "train" if train else "val", is_aug=True)
        super().__init__(base, train=train, transform=transform, labels=labels,
                         labels_old=labels_old, idxs_path=idxs_path, masking=masking,
                         overlap=overlap, void_as_ignore=void_as_ignore,
                         num_workers=num_workers, progress=progress, save_index=save_index,
                         protocol=protocol)
