"""Input-pipeline benchmark on synthetic 512x512 VOC data (CPU).

    python bench/bench_data.py [--n 200] [--size 512] [--workers 2]

Prints: label remapping time per mask (lookup table vs the original's per-pixel Python
function, and the ratio), mask-scan throughput for image selection with 1 and N worker
processes vs opening every image+mask pair one by one as the original does, and the full
training pipeline (read, random resized crop 512, flip, tensors, normalisation, remap) in
images/s for one worker, and the training loader with N workers.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import tasks  # noqa: E402
from common import timed  # noqa: E402
from dataset import VOCSegmentationIncremental  # noqa: E402
from dataset import utils as dutils  # noqa: E402
from dataset.io import open_image, open_mask  # noqa: E402
from dataset.remap import apply_lut  # noqa: E402
from dataset.synthetic import draw_sample, plan_split, write_voc_tree  # noqa: E402
from dataset.transform import train_transform  # noqa: E402
from dataset.voc import VOCSegmentation  # noqa: E402


def make_tree(root, n, size):
    plans = plan_split("voc", n, True, np.random.default_rng(0))

    def samples(prefix, plans):
        for i, classes in enumerate(plans):
            img, mask = draw_sample("voc", classes, size, np.random.default_rng(i),
                                    short_side=(1.0, 1.0))
            yield f"{prefix}_{i:06d}", img, mask
    write_voc_tree(root, samples("2007", plans), samples("2008", plans[:2]))


def bench_remap(dataset):
    """The original maps each pixel with a Python function through Tensor.apply_."""
    mask = torch.from_numpy(np.array(open_mask(dataset.base.images[dataset.indices[0]][1]),
                                     dtype=np.uint8))
    labels, order, m = dataset.labels, dataset.inverted_order, dataset.masking_value

    def per_pixel():
        mask.clone().apply_(lambda x: order[x] if x in labels else m)

    def table():
        apply_lut(mask, dataset.lut)

    slow = timed(per_pixel)
    fast = timed(lambda: [table() for _ in range(100)], repeat=3) / 100
    # the two must agree
    expect = mask.clone().apply_(lambda x: order[x] if x in labels else m)
    assert torch.equal(apply_lut(mask, dataset.lut), expect)
    return slow, fast


def bench_filter(root, workers, repeat_list):
    base = VOCSegmentation(root, "train")
    # a longer split (the list repeated) so that starting worker processes does not dominate
    base.images = list(base.images) * repeat_list
    labels, old, _ = tasks.get_task_labels("voc", "15-5", 1)
    n = len(base)

    def original_way():
        # the original iterates the dataset: image and mask decoded, np.unique on the mask
        for img_path, mask_path in base.images:
            open_image(img_path)
            np.unique(np.array(open_mask(mask_path)))

    def scan(k):
        dutils._memo.clear()
        dutils.filter_images(base, labels, old, overlap=False, num_workers=k, progress=False)

    results = {"image+mask, one by one": n / timed(original_way)}
    for k in sorted({1, workers}):
        results[f"masks only, {k} worker{'s' if k > 1 else ''}"] = n / timed(lambda: scan(k))
    return results


def training_dataset(root, crop=512):
    """Step 0 of VOC 15-5 with the training transform (random resized crop ``crop``)."""
    labels, old, _ = tasks.get_task_labels("voc", "15-5", 0)
    return VOCSegmentationIncremental(root, transform=train_transform(crop), labels=labels,
                                      labels_old=old, overlap=True, progress=False)


def bench_pipeline(root, n, crop=512):
    """Images/s of the training pipeline in this process: what one loader worker delivers."""
    d = training_dataset(root, crop)
    count = min(n, len(d))
    seconds = timed(lambda: [d[(i, i)] for i in range(count)])
    return count / seconds, d


def bench_loader(dataset, workers, batch_size, pin_memory=False):
    """Images/s of the training loader (``dataset.loader.build_loader``) with ``workers``
    processes, timed from the first batch on so that starting the workers is not counted.
    Returns (images/s, images timed)."""
    from dataset.loader import build_loader
    loader = build_loader(dataset, batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, seed=0, pin_memory=pin_memory)
    if len(loader) < 2:
        raise ValueError(f"the loader benchmark needs at least {2 * batch_size} images, "
                         f"got {len(dataset)}; raise the image count")
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(images.shape[0] for images, _ in batches)
    seconds = time.perf_counter() - start
    del batches, loader  # stops the persistent workers
    return count / seconds, count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images in the synthetic split")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--crop", type=int, default=512, help="training crop size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat_list", type=int, default=5,
                   help="the selection scan reads the split list this many times over")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        make_tree(root, args.n, args.size)
        print(f"synthetic VOC tree: {args.n} images of {args.size}x{args.size} "
              f"({time.perf_counter() - t0:.1f} s to write)")
        ips, dataset = bench_pipeline(root, args.n, args.crop)
        slow, fast = bench_remap(dataset)
        print(f"label remap per mask: per-pixel Python {slow * 1e3:.1f} ms, lookup table "
              f"{fast * 1e3:.3f} ms, ratio {slow / fast:.0f}x")
        flt = bench_filter(root, args.workers, args.repeat_list)
        base = flt["image+mask, one by one"]
        for name, rate in flt.items():
            print(f"image selection scan ({args.n * args.repeat_list} masks), {name}: "
                  f"{rate:.0f} masks/s ({rate / base:.1f}x)")
        print(f"train pipeline (read, crop {args.crop}, flip, tensor, normalise, remap): "
              f"{ips:.1f} images/s per worker")
        loader_ips, _ = bench_loader(dataset, args.workers, 2)
        print(f"train loader, {args.workers} workers, batch 2: {loader_ips:.1f} images/s "
              f"({loader_ips / ips:.1f}x one worker)")


if __name__ == "__main__":
    main()
