"""Joint (image, mask) transforms with the original's semantics.

Spatial transforms act on PIL images through torchvision's PIL functional ops: bilinear for
the image, nearest for the mask. Randomness comes from Python's ``random``, as in the
original (the loader seeds it per sample, see ``dataset.seeding``).
"""
import math
import random

import numpy as np
import torch
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

BILINEAR = InterpolationMode.BILINEAR
NEAREST = InterpolationMode.NEAREST


class Compose:
    """Apply transforms in order to the (image, mask) pair."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img, lbl):
        for t in self.transforms:
            img, lbl = t(img, lbl)
        return img, lbl

    def __repr__(self):
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


class RandomResizedCrop:
    """Crop a random window then resize it to ``size`` x ``size`` (aspect not kept).

    Window: up to 10 tries of area U(scale) * W*H and aspect exp(U(log ratio)); the first
    that fits is placed uniformly. A scale above 1 never fits, so windows cover 50-100 % of
    the image. After 10 failures: a central crop clamped to the ratio range.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = scale
        self.ratio = ratio

    @staticmethod
    def get_params(img, scale, ratio):
        """(top, left, height, width) of the window, drawn with Python's ``random``."""
        width, height = img.size
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = random.uniform(*scale) * area
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if w <= width and h <= height:
                i = random.randint(0, height - h)
                j = random.randint(0, width - w)
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, lbl):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return (F.resized_crop(img, i, j, h, w, list(self.size), BILINEAR),
                F.resized_crop(lbl, i, j, h, w, list(self.size), NEAREST))

    def __repr__(self):
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Flip image and mask together with probability ``p`` (``random.random() < p``)."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, lbl):
        if random.random() < self.p:
            return F.hflip(img), F.hflip(lbl)
        return img, lbl

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize so that the shorter side is ``size`` (the longer one ``int(size*long/short)``,
    truncated); a pair whose shorter side already is ``size`` is returned unchanged."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img, lbl):
        return F.resize(img, self.size, BILINEAR), F.resize(lbl, self.size, NEAREST)

    def __repr__(self):
        return f"Resize({self.size})"


class CenterCrop:
    """Central ``size`` x ``size`` window: top ``int(round((H-size)/2))``, left likewise."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, img, lbl):
        return F.center_crop(img, list(self.size)), F.center_crop(lbl, list(self.size))

    def __repr__(self):
        return f"CenterCrop({self.size})"


class ToTensor:
    """Image -> float CHW tensor in [0, 1]; mask -> uint8 HW tensor of the raw values."""

    def __call__(self, img, lbl):
        return F.to_tensor(img), torch.from_numpy(np.array(lbl, dtype=np.uint8))

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    """Normalise the image tensor channel-wise; the mask passes through."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, img, lbl):
        return F.normalize(img, self.mean, self.std), lbl

    def __repr__(self):
        return f"Normalize(mean={self.mean}, std={self.std})"


def train_transform(crop_size):
    """The training pipeline: random resized crop (scale 0.5-2), flip, tensor, ImageNet norm."""
    return Compose([
        RandomResizedCrop(crop_size, (0.5, 2.0)),
        RandomHorizontalFlip(),
        ToTensor(),
        Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(crop_size, crop_val=True):
    """Validation/test: resize (short side) + center crop to ``crop_size`` when ``crop_val``
    (the default), else the full image (only tensor + normalisation)."""
    steps = [Resize(crop_size), CenterCrop(crop_size)] if crop_val else []
    return Compose(steps + [ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
