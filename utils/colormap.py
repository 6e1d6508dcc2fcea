"""Colour maps for sample images: the PASCAL VOC palette and a fixed palette for ADE20K."""
import numpy as np

from dataset.transform import IMAGENET_MEAN, IMAGENET_STD


def voc_cmap(n=256):
    """The standard PASCAL palette: label bits interleaved over the R, G and B channels."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def ade_cmap(n=256):
    """150 well-separated colours (index 0 and unused entries black). The original ships
    the ADE20K benchmark palette; this one is generated, for display only."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    rng = np.random.RandomState(150)
    colours = rng.randint(40, 256, size=(150, 3))
    cmap[1:151] = colours
    return cmap


def colormap(dataset):
    return ade_cmap() if dataset == "ade" else voc_cmap()   # folder datasets: the VOC palette


def denormalize(image_chw):
    """Normalised float CHW image -> uint8 CHW in 0..255."""
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    img = image_chw * std[:, None, None] + mean[:, None, None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def sample_panel(image, target, prediction, cmap):
    """image | ground truth | prediction side by side, uint8 CHW (for TensorBoard)."""
    img = denormalize(image)
    tgt = cmap[target.astype(np.int64) % 256].transpose(2, 0, 1)
    pred = cmap[prediction.astype(np.int64) % 256].transpose(2, 0, 1)
    return np.concatenate([img, tgt, pred], axis=2)
