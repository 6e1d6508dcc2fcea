"""ADE20K (MIT scene parsing, ADEChallengeData2016) in its release layout:

    <data_root>/ADEChallengeData2016/images/{training,validation}/<name>.jpg
    <data_root>/ADEChallengeData2016/annotations/{training,validation}/<name>.png  (0 void, 1..150)

Index i of a split is the i-th name of ``sorted(os.listdir(images/<split>))`` (every entry,
as the original); the mask of ``X.jpg`` is ``X.png`` (the last three characters replaced).
"""
import hashlib
import os

from .base import IncrementalSegmentation, SegmentationSplit, layout_message
from .errors import DatasetLayoutError
from .io import first_missing

ADE_FOLDER = "ADEChallengeData2016"
SCRIPT = "data/download_ade.sh"
NUM_LABELS = 151  # 0 = void / other objects, 1..150 classes


class AdeSegmentation(SegmentationSplit):
    """A whole ADE split: training (``train``) or validation."""

    known_labels = tuple(range(NUM_LABELS))

    def __init__(self, root, train=True, transform=None):
        super().__init__(transform)
        root = os.path.expanduser(root)
        ade_root = os.path.join(root, ADE_FOLDER)
        if not os.path.isdir(ade_root):
            raise DatasetLayoutError(layout_message("ADE20K", ade_root, SCRIPT, root))
        split = "training" if train else "validation"
        image_folder = os.path.join(ade_root, "images", split)
        mask_folder = os.path.join(ade_root, "annotations", split)
        for what, folder in (("the ADE20K images", image_folder),
                             ("the ADE20K annotations", mask_folder)):
            if not os.path.isdir(folder):
                raise DatasetLayoutError(layout_message(f"{what} ({split})", folder, SCRIPT,
                                                        root))
        names = sorted(os.listdir(image_folder))
        self.root = ade_root
        self.split_name = image_folder
        self.images = [(os.path.join(image_folder, name),
                        os.path.join(mask_folder, name[:-3] + "png")) for name in names]
        missing = first_missing(p for pair in self.images for p in pair)
        if missing is not None:
            raise DatasetLayoutError(
                f"{missing} does not exist (every entry of {image_folder} is an image whose "
                f"mask is the same name with 'png' in place of its last three characters); "
                "restore the file or remove the stray entry")
        self.source = {
            "dataset": "ade",
            "data_root": os.path.abspath(root),
            "split_dir": os.path.abspath(image_folder),
            "entries": len(names),
            "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
        }


class AdeSegmentationIncremental(IncrementalSegmentation):
    """The ADE20K images of one incremental step (keywords as the original, plus ours).

    Void (0) is not background here: it takes the masking value (0 in training, 255 in
    validation), or 255 everywhere with ``void_as_ignore``.
    """

    zero_is_background = False
    void_value = 0

    def __init__(self, root, train=True, transform=None, labels=None, labels_old=None,
                 idxs_path=None, masking=True, overlap=True, void_as_ignore=False,
                 num_workers=0, progress=True, save_index=True, protocol="mib"):
        base = AdeSegmentation(root, train=train)
        super().__init__(base, train=train, transform=transform, labels=labels,
                         labels_old=labels_old, idxs_path=idxs_path, masking=masking,
                         overlap=overlap, void_as_ignore=void_as_ignore,
                         num_workers=num_workers, progress=progress, save_index=save_index,
                         protocol=protocol)
