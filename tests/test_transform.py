"""Joint transforms (docs/behaviour.md §5): crop-box arithmetic, its fallback, resampling modes,
validation resize + centre crop, tensors and normalisation."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import transform as T


def coord_image(w, h):
    """RGB image whose pixel (x, y) encodes x in red and y in green."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def coord_mask(w, h):
    return Image.fromarray(((np.arange(h)[:, None] * 7 + np.arange(w)[None, :]) % 256)
                           .astype(np.uint8))


class Scripted:
    """Stands in for the ``random`` module with fixed draws, and records the calls."""

    def __init__(self, uniforms, randints=()):
        self.uniforms, self.randints, self.calls = list(uniforms), list(randints), []

    def uniform(self, a, b):
        self.calls.append(("uniform", a, b))
        return self.uniforms.pop(0)

    def randint(self, a, b):
        self.calls.append(("randint", a, b))
        return self.randints.pop(0)


def test_crop_box_first_fitting_attempt(monkeypatch):
    # W=100, H=80; scale 0.5, aspect exp(0)=1: side round(sqrt(4000)) = 63
    r = Scripted([0.5, 0.0], [5, 30])
    monkeypatch.setattr(T, "random", r)
    assert T.RandomResizedCrop.get_params(coord_image(100, 80), (0.5, 2.0),
                                          (3 / 4, 4 / 3)) == (5, 30, 63, 63)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert r.calls == [("uniform", 0.5, 2.0), ("uniform", lo, hi), ("randint", 0, 80 - 63),
                       ("randint", 0, 100 - 63)]


def test_crop_box_skips_attempts_that_do_not_fit(monkeypatch):
    # attempt 1: scale 1.5 never fits; attempt 2: area 0.6*6000=3600, aspect e^0.2
    aspect = math.exp(0.2)
    w, h = round(math.sqrt(3600 * aspect)), round(math.sqrt(3600 / aspect))
    r = Scripted([1.5, 0.0, 0.6, 0.2], [0, 0])
    monkeypatch.setattr(T, "random", r)
    assert T.RandomResizedCrop.get_params(coord_image(100, 60), (0.5, 2.0),
                                          (3 / 4, 4 / 3)) == (0, 0, h, w)
    assert (w, h) == (66, 54)


@pytest.mark.parametrize("size,box", [
    ((100, 50), (0, 16, 50, 67)),     # W/H = 2 > 4/3: h = H, w = round(50 * 4/3) = 67
    ((30, 100), (30, 0, 40, 30)),     # W/H = 0.3 < 3/4: w = W, h = round(30 / 0.75) = 40
    ((90, 80), (0, 0, 80, 90)),       # ratio inside the range: the whole image
])
def test_crop_box_fallback_after_ten_failures(monkeypatch, size, box):
    r = Scripted([2.0, 0.0] * 10)     # area twice the image: never fits
    monkeypatch.setattr(T, "random", r)
    assert T.RandomResizedCrop.get_params(coord_image(*size), (0.5, 2.0),
                                          (3 / 4, 4 / 3)) == box
    assert len(r.calls) == 20         # 10 attempts, 2 draws each, no placement draw


def test_random_resized_crop_is_crop_then_bilinear_and_nearest(monkeypatch):
    img, mask = coord_image(60, 40), coord_mask(60, 40)
    monkeypatch.setattr(T.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: (3, 7, 30, 40)))
    out_img, out_mask = T.RandomResizedCrop(17, (0.5, 2.0))(img, mask)
    box = (7, 3, 47, 33)
    assert out_img.size == out_mask.size == (17, 17)
    assert np.array_equal(np.asarray(out_img),
                          np.asarray(img.crop(box).resize((17, 17), Image.BILINEAR)))
    assert np.array_equal(np.asarray(out_mask),
                          np.asarray(mask.crop(box).resize((17, 17), Image.NEAREST)))
    # nearest invents no label values; bilinear would
    assert set(np.unique(np.asarray(out_mask))) <= set(np.unique(np.asarray(mask)))


def test_random_resized_crop_uses_python_random():
    img, mask = coord_image(50, 40), coord_mask(50, 40)
    crop = T.RandomResizedCrop(16, (0.5, 2.0))
    random.seed(3)
    first = [np.asarray(x) for x in crop(img, mask)]
    random.seed(3)
    again = [np.asarray(x) for x in crop(img, mask)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_crop_windows_cover_half_to_all_of_the_image():
    random.seed(0)
    for _ in range(300):
        i, j, h, w = T.RandomResizedCrop.get_params(coord_image(64, 48), (0.5, 2.0),
                                                    (3 / 4, 4 / 3))
        assert 0 <= i <= 48 - h and 0 <= j <= 64 - w
        assert 0.45 <= (h * w) / (64 * 48) <= 1.0


def test_flip_image_and_mask_together(monkeypatch):
    img, mask = coord_image(5, 3), coord_mask(5, 3)
    monkeypatch.setattr(T.random, "random", lambda: 0.49)
    a, b = T.RandomHorizontalFlip()(img, mask)
    assert np.array_equal(np.asarray(a), np.asarray(img)[:, ::-1])
    assert np.array_equal(np.asarray(b), np.asarray(mask)[:, ::-1])
    monkeypatch.setattr(T.random, "random", lambda: 0.5)
    a, b = T.RandomHorizontalFlip()(img, mask)
    assert a is img and b is mask


@pytest.mark.parametrize("w,h,size,out", [
    (500, 375, 512, (682, 512)),      # int(512 * 500 / 375) = int(682.67)
    (375, 500, 512, (512, 682)),
    (333, 500, 100, (100, 150)),      # int(150.15)
    (512, 700, 512, (512, 700)),      # shorter side already right: unchanged
])
def test_resize_shorter_side_truncates(w, h, size, out):
    img, mask = T.Resize(size)(coord_image(w, h), coord_mask(w, h))
    assert img.size == mask.size == out
    if out == (w, h):
        assert np.array_equal(np.asarray(img), np.asarray(coord_image(w, h)))
    else:
        expect = coord_mask(w, h).resize(out, Image.NEAREST)
        assert np.array_equal(np.asarray(mask), np.asarray(expect))


@pytest.mark.parametrize("w,h,crop,top,left", [
    (10, 7, 4, 2, 3),                 # round(1.5) = 2, round(3.0) = 3
    (9, 6, 5, 0, 2),                  # round(0.5) = 0 (round half to even), round(2.0) = 2
    (12, 12, 5, 4, 4),                # round(3.5) = 4
])
def test_center_crop_rounding(w, h, crop, top, left):
    img, mask = T.CenterCrop(crop)(coord_image(w, h), coord_mask(w, h))
    arr = np.asarray(img)
    assert arr.shape[:2] == (crop, crop)
    assert arr[0, 0, 0] == left and arr[0, 0, 1] == top
    assert np.array_equal(np.asarray(mask),
                          np.asarray(coord_mask(w, h))[top:top + crop, left:left + crop])


def test_to_tensor_and_normalize():
    img = Image.fromarray(np.full((2, 3, 3), 255, dtype=np.uint8))
    mask = Image.fromarray(np.array([[0, 255, 7], [1, 2, 3]], dtype=np.uint8))
    x, y = T.ToTensor()(img, mask)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 3) and float(x.max()) == 1.0
    assert y.dtype == torch.uint8 and y.tolist() == [[0, 255, 7], [1, 2, 3]]
    xn, yn = T.Normalize()(x, y)
    expect = [(1 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    assert torch.allclose(xn[:, 0, 0], torch.tensor(expect))
    assert yn is y


def test_builders():
    img, mask = coord_image(80, 60), coord_mask(80, 60)
    random.seed(0)
    x, y = T.train_transform(32)(img, mask)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.uint8
    x, y = T.val_transform(32)(img, mask)
    assert x.shape == (3, 32, 32)
    # validation: resize to 42x32 then the central 32x32 (left = round(5.0))
    expect = np.asarray(coord_mask(80, 60).resize((42, 32), Image.NEAREST))[:, 5:37]
    assert np.array_equal(y.numpy(), expect)
    x, y = T.val_transform(32, crop_val=False)(img, mask)
    assert x.shape == (3, 60, 80) and np.array_equal(y.numpy(), np.asarray(mask))
    kinds = [type(t).__name__ for t in T.train_transform(32).transforms]
    assert kinds == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert T.train_transform(32).transforms[0].scale == (0.5, 2.0)
