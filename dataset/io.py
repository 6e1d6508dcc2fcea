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


@contextlib.contextmanager
def _reading(kind, path):
    """Turns a missing or undecodable ``kind`` ("image", "mask") file into our errors."""
    try:
        yield
    except FileNotFoundError:
        raise DatasetLayoutError(f"{kind} file {path} is missing") from None
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
