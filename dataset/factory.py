"""The datasets of one step, built from the options as the original's ``get_dataset``.

train: training split, the step's labels, disjoint or overlapped selection, masking unless
--no_mask, training transform, list ``train-<step>.npy``.
val: the val split with the overlapped rule on the step's labels (``val-<step>.npy``), or
with --cross_val a random 20 % of the training subset (see ``loader.cross_val_split``).
test: the val split (training split with --val_on_trainset) with every seen label as
"current", always masked, list ``test_on_val-<step>.npy`` / ``test_on_train-<step>.npy``.
Lists live in ``<index_dir>/<dataset>/<task>[-ov]/``.
"""
import os

import tasks

from . import DATASETS
from .loader import cross_val_split
from .transform import train_transform, val_transform


def index_folder(opts):
    """``<index_dir>/<dataset>/<task>`` with ``-ov`` for overlapped runs (original names)."""
    folder = os.path.join(opts.index_dir, opts.dataset,
                          tasks.task_folder_name(opts.dataset, opts.task, opts.class_order))
    return folder + "-ov" if opts.overlap else folder


def get_dataset(opts, step=None, rank=0, extra_maps=()):
    """(train, val, test, number of seen classes) for ``step`` (default ``opts.step``).

    Only rank 0 writes index lists and shows progress bars. With --cross_val this draws
    from the global torch RNG, as the original. ``extra_maps``: the per-pixel maps read with
    every training image (its items are then mappings, see ``IncrementalSegmentation``).
    """
    step = opts.step if step is None else step
    labels, labels_old, _ = tasks.get_task_labels(opts.dataset, opts.task, step,
                                                  opts.class_order)
    labels_cum = labels_old + labels
    folder = index_folder(opts)
    dataset = DATASETS[opts.dataset]
    common = dict(root=opts.data_root, num_workers=opts.num_workers,
                  progress=rank == 0 and not opts.no_progress,
                  save_index=rank == 0, protocol=opts.protocol)
    eval_transform = val_transform(opts.crop_size, opts.crop_val)

    train_dst = dataset(train=True, transform=train_transform(opts.crop_size),
                        labels=list(labels), labels_old=list(labels_old),
                        idxs_path=os.path.join(folder, f"train-{step}.npy"),
                        masking=not opts.no_mask, overlap=opts.overlap,
                        void_as_ignore=opts.train_void_as_ignore, **common)
    train_dst.extra_maps = tuple(extra_maps)
    if opts.cross_val:
        train_dst, val_dst = cross_val_split(train_dst)
    else:
        val_dst = dataset(train=False, transform=eval_transform, labels=list(labels),
                          labels_old=list(labels_old),
                          idxs_path=os.path.join(folder, f"val-{step}.npy"),
                          masking=not opts.no_mask, overlap=True, **common)
    image_set = "train" if opts.val_on_trainset else "val"
    test_dst = dataset(train=opts.val_on_trainset, transform=eval_transform,
                       labels=list(labels_cum),
                       idxs_path=os.path.join(folder, f"test_on_{image_set}-{step}.npy"),
                       **common)
    return train_dst, val_dst, test_dst, len(labels_cum)
