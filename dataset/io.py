"""Reading images and masks, turning decoder failures into errors that name the file."""
import contextlib
import os

import numpy as np
from PIL import Image

from .errors import CorruptFileError, DatasetLayoutError

# What PIL raises on unreadable, truncated or absurd files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# Columns of a presence row: raw values 0..255, plus one for any value above 255.
PRESENCE_COLUMNS = 257


# How to get the per-pixel maps of a folder beside the images: the hint of a missing map.
MAP_SOURCES = {
    "saliency_map": "get the maps with the optional saliency step of data/download_voc.sh "
                    "(WITH_SALIENCY=1, see data/README.md), or use python -m "
                    "dataset.synthetic, whose VOC trees have them",
}

# 8-bit modes a map may be stored in and is converted from (to grey levels).
_MAP_CONVERTED_MODES = ("1", "LA", "RGB", "RGBA")


@contextlib.contextmanager
def _reading(kind, path, missing_hint=None):
    """Turns a missing or undecodable ``kind`` ("image", "mask") file into our errors."""
    try:
        yield
    except FileNotFoundError:
        hint = f"; {missing_hint}" if missing_hint else ""
        raise DatasetLayoutError(f"{kind} file {path} is missing{hint}") from None
    except _DECODE_ERRORS as e:
        raise CorruptFileError(f"cannot read {kind} {path}: {e}; replace or re-download "
                               "the file") from None


def open_image(path):
    """The image at ``path`` as an RGB PIL image (decoded now, so errors surface here)."""
    with _reading("image", path), Image.open(path) as img:
        return img.convert("RGB")


def open_mask(path):
    """The label mask at ``path`` as a PIL image, without conversion (raw label ids)."""
    with _reading("mask", path), Image.open(path) as mask:
        mask.load()
    return mask


def pixel_map_path(images_root, folder, name):
    """Where the map of image ``name`` (its file name without extension) lives:
    ``<images_root>/<folder>/<name>.png``, beside the images' own folder."""
    return os.path.join(images_root, folder, name + ".png")


def read_pixel_map(images_root, folder, name, size=None):
    """The per-pixel map of image ``name`` in ``folder`` (e.g. saliency maps), as a uint8
    H x W array: grey and palette PNGs as stored, binary and colour ones as grey levels.

    ``size``, the image's (width, height), is checked against the map's when given. A missing
    file is one error naming it and saying how to get the maps (``MAP_SOURCES``)."""
    path = pixel_map_path(images_root, folder, name)
    hint = MAP_SOURCES.get(folder, f"every image needs a PNG of its name in {folder}/")
    with _reading("map", path, hint), Image.open(path) as img:
        img.load()
        if img.mode in _MAP_CONVERTED_MODES:
            img = img.convert("L")
        elif img.mode not in ("L", "P"):
            raise CorruptFileError(f"map {path} has {img.mode} pixels; 8-bit maps are read "
                                   "(grey, palette, binary or colour): convert the file")
        if size is not None and tuple(img.size) != tuple(size):
            raise DatasetLayoutError(
                f"map {path} is {img.size[0]}x{img.size[1]} pixels, its image "
                f"{size[0]}x{size[1]}: the maps must be made for these images")
        return np.array(img, dtype=np.uint8)


def mask_presence(path):
    """Which raw values occur in the mask at ``path``: a bool row of PRESENCE_COLUMNS.

    Reads only the mask. For 8-bit masks PIL's C histogram does the counting.
    """
    row = np.zeros(PRESENCE_COLUMNS, dtype=bool)
    with _reading("mask", path), Image.open(path) as mask:
        if mask.mode in ("L", "P"):
            row[:256] = np.asarray(mask.histogram()[:256]) > 0
            return row
        values = np.unique(np.asarray(mask))
    values = values.astype(np.int64)
    row[values[(values >= 0) & (values < 256)]] = True
    row[256] = bool(np.any(values >= 256) or np.any(values < 0))
    return row


def first_missing(paths):
    """The first path of ``paths`` (in order) that is not an existing file, or None.

    Lists each folder once instead of calling stat per file.
    """
    listing = {}
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listing:
            try:
                listing[folder] = {e.name for e in os.scandir(folder or ".") if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listing[folder] = set()
        if name not in listing[folder]:
            return path
    return None
