"""Pascal VOC and ADE20K for incremental segmentation: split readers, the per-step subsets
(image selection, index cache, label remapping), joint transforms, seeded loaders and a
synthetic data generator writing both folder layouts."""
from .ade import AdeSegmentation, AdeSegmentationIncremental
from .errors import (CorruptFileError, DatasetError, DatasetLayoutError, IndexListError,
                     one_line)
from .voc import VOCSegmentation, VOCSegmentationIncremental

__all__ = [
    "AdeSegmentation", "AdeSegmentationIncremental", "VOCSegmentation",
    "VOCSegmentationIncremental", "DatasetError", "DatasetLayoutError", "CorruptFileError",
    "IndexListError", "one_line", "DATASETS",
]

DATASETS = {"voc": VOCSegmentationIncremental, "ade": AdeSegmentationIncremental}
