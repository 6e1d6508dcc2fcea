"""Synthetic data in the exact Pascal VOC and ADE20K folder layouts.

    python -m dataset.synthetic --dataset {voc,ade} --data_root DIR --n_train N --n_val M \
        --size S --seed K

writes ``DIR/PascalVOC12`` (JPEG images, palette PNG masks with 255 borders around objects,
``splits/train_aug.txt`` and ``splits/val.txt`` in the leading-slash format, 8-bit grey
saliency maps in ``saliency_map/``) or
``DIR/ADEChallengeData2016`` (``images/`` and ``annotations/`` for training and validation,
masks 0..150 with 0 as void). The output depends only on the arguments.

Content is made to be learnable: every class has its own colour (saturated, hue by class),
texture (stripes, checks or dots with a class-specific period) and shape; each image shows
one to three objects on a cluttered grey background. The first images of each split make
sure every step of every task in ``tasks.py`` has images: in training, single-object images
of a set of classes that meets every step's label group (all 20 classes for VOC, a greedy
cover of the task groups for ADE), which both the disjoint and the overlapped selection
keep; in validation, those classes drawn on top of other objects. Longer side = S pixels,
shorter side between 3/4 S and S.

A VOC image's saliency map marks its objects (outlines included) with the errors a real
saliency detector makes: smooth blobs of background marked salient and of objects missed
(about 9 % and 6-7 % of their pixels on average), salient values between 48 and 255, 0
elsewhere. The maps have their own random stream, so images and masks are the same as
before the maps existed.
"""
import argparse
import colorsys
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

import tasks
from utils.checkpoint import atomic_write_text
from utils.errors import UserError

from .errors import DatasetError

log = logging.getLogger(__name__)

NUM_CLASSES = {"voc": 20, "ade": 150}
FOLDER = {"voc": "PascalVOC12", "ade": "ADEChallengeData2016"}
MARKER = "SYNTHETIC.json"
# Written into the marker: 2 = VOC trees carry saliency maps. A tree with another version
# is out of date (tools/experiment.py regenerates it).
VERSION = 2
SALIENCY_DIR = "saliency_map"
GOLDEN = 0.6180339887498949
N_SHAPES = 5
N_TEXTURES = 6


# --- what each class looks like (fixed per class id, independent of the seed) -------------

def class_colour(k):
    """Saturated RGB colour of class k (hue spread by the golden ratio)."""
    hue = ((k - 1) * GOLDEN) % 1.0
    sat = (1.0, 0.8, 0.65)[k % 3]
    val = (1.0, 0.78)[(k // 3) % 2]
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255


def class_texture(k):
    """(texture kind, period in pixels at 128 px) of class k."""
    return k % N_TEXTURES, 4 + 2 * ((k // N_TEXTURES) % 3)


def class_shape(k):
    return (k // 2) % N_SHAPES


def voc_palette():
    """The Pascal VOC colour palette (768 values), bit-interleaved from the label id."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette.reshape(-1).tolist()


# --- which classes each image shows ----------------------------------------------------------

def cover_classes(dataset):
    """Classes whose single-object images give every step of every task an image."""
    if dataset == "voc":
        return list(range(1, NUM_CLASSES["voc"] + 1))
    groups = {(name, step): set(labels) - {0}
              for name, steps in tasks.TASKS[dataset].items()
              for step, labels in steps.items()}
    uncovered, chosen = set(groups), []
    while uncovered:
        best = max(range(1, NUM_CLASSES[dataset] + 1),
                   key=lambda k: (sum(k in groups[g] for g in uncovered), -k))
        chosen.append(best)
        uncovered = {g for g in uncovered if best not in groups[g]}
    return chosen


def plan_split(dataset, n, train, rng):
    """Per image, the object classes in drawing order (a required class is drawn last)."""
    n_classes = NUM_CLASSES[dataset]
    cover = list(rng.permutation(cover_classes(dataset)))
    plans = []
    for i in range(n):
        if i < len(cover):
            extra = [] if train else list(rng.choice(
                [k for k in range(1, n_classes + 1) if k != cover[i]],
                size=int(rng.integers(0, 3)), replace=False))
            plans.append([int(k) for k in extra] + [int(cover[i])])
        else:
            count = int(rng.integers(1, 4))
            plans.append([int(k) for k in rng.choice(np.arange(1, n_classes + 1), size=count,
                                                     replace=False)])
    if n < len(cover):
        log.warning("%d %s images cannot cover all %d cover classes: some task steps will "
                    "have no %s images", n, "training" if train else "validation",
                    len(cover), "training" if train else "validation")
    order = rng.permutation(n)
    return [plans[i] for i in order]


# --- drawing ---------------------------------------------------------------------------------

def _shape_mask(kind, u, v):
    if kind == 0:   # ellipse
        return u * u + v * v <= 1.0
    if kind == 1:   # rectangle
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.75)
    if kind == 2:   # triangle, apex up
        return (v >= -0.9) & (v <= 0.9) & (np.abs(u) <= (v + 0.9) / 1.8)
    if kind == 3:   # diamond
        return np.abs(u) + np.abs(v) <= 1.0
    return ((np.abs(u) <= 0.38) | (np.abs(v) <= 0.38)) & (np.abs(u) <= 1) & (np.abs(v) <= 1)


def _texture(kind, period, x, y):
    """1.0 where the pattern is 'on'; the colour is darkened there."""
    p = period
    if kind == 0:
        return np.zeros_like(x)
    if kind == 1:
        on = (y // p) % 2
    elif kind == 2:
        on = (x // p) % 2
    elif kind == 3:
        on = ((x + y) // p) % 2
    elif kind == 4:
        on = (x // p + y // p) % 2
    else:
        on = ((x % p) < p / 2) & ((y % p) < p / 2)
    return on.astype(np.float32)


def _box(cx, cy, a, b, w, h):
    """Slices of the image rows/columns within (a, b) of the centre (cx, cy)."""
    x0, x1 = max(0, int(cx - a)), min(w, int(cx + a) + 2)
    y0, y1 = max(0, int(cy - b)), min(h, int(cy + b) + 2)
    return slice(y0, y1), slice(x0, x1)


def _grid(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return x.astype(np.float32), y.astype(np.float32)


def _background(rng, h, w, x, y):
    """Grey clutter: smooth noise, grey shapes and a few faint tinted blobs."""
    coarse = rng.uniform(40, 215, size=(6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
    img = np.repeat(smooth[:, :, None], 3, axis=2)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        a, b = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
        box = _box(cx, cy, a, b, w, h)
        region = _shape_mask(int(rng.integers(0, N_SHAPES)), (x[box] - cx) / a,
                             (y[box] - cy) / b)
        grey = rng.uniform(30, 225)
        tint = rng.uniform(-12, 12, size=3)   # low saturation: never a class colour
        img[box][region] = grey + tint
    img += 6 * rng.standard_normal(size=(h, w, 1), dtype=np.float32)
    return img


def draw_sample(dataset, classes, size, rng, short_side=(0.75, 1.0)):
    """(RGB uint8 image, uint8 label mask) showing ``classes`` in drawing order; the shorter
    side is a random fraction (in ``short_side``) of the longer one, ``size``."""
    long_side, short_side = size, int(round(size * rng.uniform(*short_side)))
    w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    x, y = _grid(h, w)
    img = _background(rng, h, w, x, y)
    labels = np.zeros((h, w), dtype=np.uint8)
    scale = size / 128.0
    for k in classes:
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        a = rng.uniform(0.15, 0.3) * min(w, h)
        b = a * rng.uniform(0.7, 1.4)
        box = _box(cx, cy, a, b, w, h)
        xb, yb = x[box], y[box]
        region = _shape_mask(class_shape(k), (xb - cx) / a, (yb - cy) / b)
        kind, period = class_texture(k)
        shade = 1.0 - 0.4 * _texture(kind, max(2, int(round(period * scale))), xb[region],
                                     yb[region])
        colour = class_colour(k)[None, :] * shade[:, None]
        img[box][region] = colour + 8 * rng.standard_normal(size=colour.shape,
                                                            dtype=np.float32)
        labels[box][region] = k
    if dataset == "voc":
        # VOC marks object outlines as void (255): pixels whose 4-neighbourhood differs
        diff = np.zeros_like(labels, dtype=bool)
        diff[1:, :] |= labels[1:, :] != labels[:-1, :]
        diff[:-1, :] |= labels[:-1, :] != labels[1:, :]
        diff[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        diff[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        labels[diff] = 255
    return np.clip(img, 0, 255).astype(np.uint8), labels


def _smooth_noise(rng, h, w, cells=5):
    """Values in [0, 1] varying smoothly over the image (a cells x cells grid, bilinear)."""
    coarse = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))


def draw_saliency(mask, rng):
    """uint8 saliency map of a label mask: every non-zero pixel (objects and their void
    outlines) salient, except where a smooth noise field is below 0.2 (missed object parts);
    background salient where it is above 0.8 (false detections). Salient pixels take grey
    values 48..255 from a second smooth field, the others 0."""
    h, w = mask.shape
    field = _smooth_noise(rng, h, w)
    salient = np.where(mask != 0, field >= 0.2, field > 0.8)
    grey = np.round(48 + 207 * _smooth_noise(rng, h, w)).astype(np.uint8)
    return np.where(salient, grey, 0).astype(np.uint8)


# --- writing the trees -----------------------------------------------------------------------

def _prepare(dataset_root):
    """Start from an empty dataset folder; never touch one this generator did not write."""
    if os.path.exists(dataset_root):
        if not os.path.exists(os.path.join(dataset_root, MARKER)):
            raise DatasetError(f"{dataset_root} exists and was not written by this generator; "
                               "choose another --data_root (real data is never overwritten)")
        shutil.rmtree(dataset_root)
    os.makedirs(dataset_root)


def write_voc_tree(data_root, train, val):
    """Write VOC-layout samples: ``train`` and ``val`` are iterables of (id, RGB uint8
    array, uint8 mask array[, uint8 saliency map]); masks are saved as palette PNGs,
    saliency maps as grey PNGs, lists in split order."""
    voc = os.path.join(data_root, FOLDER["voc"])
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    palette = voc_palette()
    for list_name, samples in (("train_aug.txt", train), ("val.txt", val)):
        lines = []
        for name, img, mask, *saliency in samples:
            if saliency:
                os.makedirs(os.path.join(voc, SALIENCY_DIR), exist_ok=True)
                Image.fromarray(saliency[0]).save(
                    os.path.join(voc, SALIENCY_DIR, name + ".png"))
            Image.fromarray(img).save(os.path.join(voc, "JPEGImages", name + ".jpg"),
                                      quality=90)
            m = Image.fromarray(mask).convert("P")
            m.putpalette(palette)
            m.save(os.path.join(voc, "SegmentationClassAug", name + ".png"))
            lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png\n")
        atomic_write_text(os.path.join(voc, "splits", list_name), "".join(lines))
    return voc


def write_ade_tree(data_root, train, val):
    """Write ADE-layout samples (``train``/``val``: iterables of (name, image, mask))."""
    ade = os.path.join(data_root, FOLDER["ade"])
    for split, samples in (("training", train), ("validation", val)):
        image_dir = os.path.join(ade, "images", split)
        mask_dir = os.path.join(ade, "annotations", split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        for name, img, mask in samples:
            Image.fromarray(img).save(os.path.join(image_dir, name + ".jpg"), quality=90)
            Image.fromarray(mask).save(os.path.join(mask_dir, name + ".png"))
    return ade


def _samples(dataset, plans, prefix, split_code, size, seed, digits):
    """(name, image, mask) per plan; for VOC also the saliency map, from its own stream so
    that the images and masks do not depend on it."""
    for i, classes in enumerate(plans):
        rng = np.random.default_rng([seed, split_code, i])
        img, mask = draw_sample(dataset, classes, size, rng)
        name = f"{prefix}_{i + (dataset == 'ade'):0{digits}d}"
        if dataset == "voc":
            yield name, img, mask, draw_saliency(mask, np.random.default_rng(
                [seed, split_code, i, 1]))
        else:
            yield name, img, mask


def record(dataset, n_train, n_val, size, seed):
    """What the marker of a tree made with these arguments holds (compare to detect stale
    data)."""
    return {"dataset": dataset, "n_train": n_train, "n_val": n_val, "size": size,
            "seed": seed, "version": VERSION}


def generate(dataset, data_root, n_train, n_val, size=128, seed=0):
    """Write a synthetic ``dataset`` ('voc' or 'ade') tree under ``data_root``; return the
    dataset folder. An earlier synthetic tree there is replaced."""
    if dataset not in FOLDER:
        raise ValueError(f"unknown dataset '{dataset}'; valid: voc, ade")
    if n_train < 1 or n_val < 1 or size < 16:
        raise ValueError("need n_train >= 1, n_val >= 1 and size >= 16")
    dataset_root = os.path.join(data_root, FOLDER[dataset])
    _prepare(dataset_root)
    plan_rng = np.random.default_rng([seed, 7])
    train_plans = plan_split(dataset, n_train, True, plan_rng)
    val_plans = plan_split(dataset, n_val, False, plan_rng)
    if dataset == "voc":
        write_voc_tree(data_root, _samples("voc", train_plans, "2007", 0, size, seed, 6),
                       _samples("voc", val_plans, "2008", 1, size, seed, 6))
    else:
        write_ade_tree(data_root, _samples("ade", train_plans, "ADE_train", 0, size, seed, 8),
                       _samples("ade", val_plans, "ADE_val", 1, size, seed, 8))
    atomic_write_text(os.path.join(dataset_root, MARKER), json.dumps(
        record(dataset, n_train, n_val, size, seed)))
    return dataset_root


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic VOC or ADE20K tree.")
    p.add_argument("--dataset", choices=sorted(FOLDER), required=True)
    p.add_argument("--data_root", required=True, help="folder that will hold the dataset")
    p.add_argument("--n_train", type=int, default=200)
    p.add_argument("--n_val", type=int, default=50)
    p.add_argument("--size", type=int, default=128, help="longer image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    try:
        folder = generate(args.dataset, args.data_root, args.n_train, args.n_val, args.size,
                          args.seed)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.time() - start
    total = args.n_train + args.n_val
    print(f"wrote {args.n_train} training and {args.n_val} validation images to {folder} "
          f"in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
