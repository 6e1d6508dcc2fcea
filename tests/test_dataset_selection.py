"""Image selection for a step (docs/behaviour.md §4.3), pinned on hand-made masks.

Labels of the VOC tree below: old = {1, 2}, current = {3, 4}, future = {5}, 37 is not a VOC
label. Which mask each rule keeps is worked out by hand from the rule's wording.
"""
import logging

import numpy as np
import pytest

from dataset import AdeSegmentationIncremental, VOCSegmentationIncremental
from dataset.synthetic import write_ade_tree, write_voc_tree
from dataset.utils import filter_images, select_indices

# value sets of the training masks, in list order (index i = line i)
VOC_TRAIN = [
    [0],            # 0: background only
    [0, 1],         # 1: old only
    [0, 3, 255],    # 2: current + void
    [0, 1, 4],      # 3: old + current
    [0, 3, 5],      # 4: current + future
    [5],            # 5: future only
    [4, 37],        # 6: current + a value outside the VOC labels
    [2, 255],       # 7: old + void
]
OLD, CUR = [1, 2], [3, 4]


def mask_with(values, shape=(6, 8)):
    """A mask holding exactly ``values`` (repeated in row-major order)."""
    return np.resize(np.array(values, dtype=np.uint8), shape[0] * shape[1]).reshape(shape)


def samples(value_sets, prefix):
    rng = np.random.default_rng(0)
    for i, values in enumerate(value_sets):
        mask = mask_with(values)
        img = rng.integers(0, 255, size=mask.shape + (3,), dtype=np.uint8)
        yield f"{prefix}_{i:04d}", img, mask


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc_rules")
    write_voc_tree(str(root), samples(VOC_TRAIN, "tr"), samples(VOC_TRAIN[::-1], "va"))
    return str(root)


def voc(root, **kw):
    kw.setdefault("progress", False)
    return VOCSegmentationIncremental(root, **kw)


def test_disjoint_keeps_current_without_future(voc_root):
    assert voc(voc_root, labels=CUR, labels_old=OLD, overlap=False).indices == [2, 3]


def test_overlapped_keeps_any_image_with_a_current_label(voc_root):
    assert voc(voc_root, labels=CUR, labels_old=OLD, overlap=True).indices == [2, 3, 4, 6]


def test_step_zero_rules(voc_root):
    # label 0 in the list is ignored by the rule (it is stripped)
    assert voc(voc_root, labels=[0] + OLD, overlap=False).indices == [1, 7]
    assert voc(voc_root, labels=[0] + OLD, overlap=True).indices == [1, 3, 7]


def test_val_split_uses_its_own_list(voc_root):
    # the val list holds the same masks in reverse order: index i = line i of val.txt
    d = voc(voc_root, train=False, labels=CUR, labels_old=OLD, overlap=True)
    assert d.indices == sorted(7 - i for i in [2, 3, 4, 6])
    assert d.base.split_file.endswith("splits/val.txt")


def test_test_set_rule_uses_every_seen_label(voc_root):
    d = voc(voc_root, train=False, labels=OLD + CUR)
    assert d.indices == sorted(7 - i for i in [1, 2, 3, 4, 6, 7])


def test_filter_images_same_with_worker_processes(voc_root):
    from dataset import utils
    from dataset.voc import VOCSegmentation
    base = VOCSegmentation(voc_root, "train")
    utils._memo.clear()
    one = filter_images(base, CUR, OLD, overlap=False, num_workers=0, progress=False)
    utils._memo.clear()
    two = filter_images(base, CUR, OLD, overlap=False, num_workers=2, progress=False)
    assert one == two == [2, 3]


def test_select_indices_on_presence_rows():
    presence = np.zeros((3, 257), dtype=bool)
    presence[0, [0, 9]] = True
    presence[1, [9, 256]] = True          # a value above 255 counts as unknown
    presence[2, [7]] = True
    assert select_indices(presence, [9], [7], overlap=False) == [0]
    assert select_indices(presence, [9], [7], overlap=True) == [0, 1]
    assert select_indices(presence, [0], [], overlap=True) == []


def test_unknown_values_reported_once(voc_root, caplog):
    from dataset import utils
    from dataset.voc import VOCSegmentation
    base = VOCSegmentation(voc_root, "train")
    utils._reported.clear()
    with caplog.at_level(logging.WARNING, logger="dataset.utils"):
        filter_images(base, CUR, OLD, progress=False)
        filter_images(base, [5], OLD + CUR, progress=False)
    warnings = [r for r in caplog.records if "outside the dataset's labels" in r.getMessage()]
    assert len(warnings) == 1
    assert "1 of 8 masks" in warnings[0].getMessage()
    assert "value 37" in warnings[0].getMessage() and "tr_0006.png" in warnings[0].getMessage()


# --- ADE: 0 is void, a mask of void only is never kept ------------------------------------

ADE_TRAIN = [
    [0],                # 0: void only
    [0, 101],           # 1: current
    [0, 5, 101],        # 2: old + current
    [0, 120, 101],      # 3: current + future
    [0, 5],             # 4: old only
]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade_rules")
    write_ade_tree(str(root), samples(ADE_TRAIN, "ADE_train"), samples(ADE_TRAIN, "ADE_val"))
    return str(root)


def test_ade_selection(ade_root):
    old = list(range(1, 101))
    cur = list(range(101, 111))
    ade = dict(progress=False, labels=cur, labels_old=old)
    assert AdeSegmentationIncremental(ade_root, overlap=False, **ade).indices == [1, 2]
    assert AdeSegmentationIncremental(ade_root, overlap=True, **ade).indices == [1, 2, 3]
    step0 = AdeSegmentationIncremental(ade_root, labels=list(range(0, 101)), overlap=False,
                                       progress=False)
    assert step0.indices == [4]


def test_ade_index_is_sorted_listing(ade_root, tmp_path):
    from dataset.ade import AdeSegmentation
    base = AdeSegmentation(ade_root, train=True)
    names = [p.split("/")[-1] for p, _ in base.images]
    assert names == sorted(names) and names[0] == "ADE_train_0000.jpg"
    assert base.images[0][1].endswith("annotations/training/ADE_train_0000.png")
