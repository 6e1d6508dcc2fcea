"""Pascal VOC and ADE20K for incremental segmentation: split readers, the per-step subsets
(image selection, index cache, label remapping), joint transforms, seeded loaders and a
synthetic data generator writing both folder layouts.

The dataset classes are imported on first use, so that ``python -m dataset.synthetic``
starts without loading torch.
"""
import importlib

from .errors import CorruptFileError, DatasetError, DatasetLayoutError, IndexListError, one_line

_LAZY = {
    "VOCSegmentation": ".voc", "VOCSegmentationIncremental": ".voc",
    "AdeSegmentation": ".ade", "AdeSegmentationIncremental": ".ade",
    "FolderSegmentation": ".folder", "FolderSegmentationIncremental": ".folder",
}

__all__ = list(_LAZY) + ["DatasetError", "DatasetLayoutError", "CorruptFileError",
                         "IndexListError", "one_line", "DATASETS"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "DATASETS":
        from .ade import AdeSegmentationIncremental
        from .folder import FolderSegmentationIncremental
        from .voc import VOCSegmentationIncremental
        return {"voc": VOCSegmentationIncremental, "ade": AdeSegmentationIncremental,
                "folder": FolderSegmentationIncremental}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
