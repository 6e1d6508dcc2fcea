"""Label remapping and masking (docs/behaviour.md §4.4), value by value.

The mask below holds every kind of value for a step with old labels [7, 2] and current
labels [3, 1]: order = [0, 7, 2, 3, 1], so idx(7)=1, idx(2)=2, idx(3)=3, idx(1)=4; 9 is a
future class, 37 unknown to VOC (a future class for ADE), 255 VOC void. The expected rows
are read off the spec's table.
"""
import numpy as np
import pytest
import torch

import tasks
from dataset import AdeSegmentationIncremental, VOCSegmentationIncremental
from dataset.remap import apply_lut, build_lut
from dataset.synthetic import write_ade_tree, write_voc_tree
from dataset.transform import Compose, ToTensor, train_transform

VALUES = [0, 1, 2, 3, 7, 9, 255, 37]
OLD, CUR = [7, 2], [3, 1]

EXPECTED = {
    # (dataset, masking, train): remapped VALUES
    ("voc", True, True):    [0, 4, 0, 3, 0, 0, 0, 0],
    ("voc", True, False):   [0, 4, 255, 3, 255, 255, 255, 255],
    ("voc", False, True):   [0, 4, 2, 3, 1, 0, 0, 0],
    ("voc", False, False):  [0, 4, 2, 3, 1, 255, 255, 255],
    ("ade", True, True):    [0, 4, 0, 3, 0, 0, 0, 0],
    ("ade", True, False):   [255, 4, 255, 3, 255, 255, 255, 255],
    ("ade", False, True):   [0, 4, 2, 3, 1, 0, 0, 0],
    ("ade", False, False):  [255, 4, 2, 3, 1, 255, 255, 255],
}


def _samples(prefix):
    mask = np.array([VALUES, VALUES[::-1]], dtype=np.uint8)
    img = np.full(mask.shape + (3,), 128, dtype=np.uint8)
    yield f"{prefix}_0001", img, mask


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    voc = tmp_path_factory.mktemp("voc_remap")
    ade = tmp_path_factory.mktemp("ade_remap")
    write_voc_tree(str(voc), _samples("a"), _samples("b"))
    write_ade_tree(str(ade), _samples("ADE_train"), _samples("ADE_val"))
    return {"voc": str(voc), "ade": str(ade)}


CLASSES = {"voc": VOCSegmentationIncremental, "ade": AdeSegmentationIncremental}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_remap_table(roots, key):
    name, masking, train = key
    d = CLASSES[name](roots[name], train=train, transform=Compose([ToTensor()]), labels=CUR,
                      labels_old=OLD, masking=masking, progress=False)
    assert d.masking_value == (0 if train else 255)
    img, target = d[0]
    assert target.dtype == torch.uint8
    assert target[0].tolist() == EXPECTED[key]
    assert target[1].tolist() == EXPECTED[key][::-1]


@pytest.mark.parametrize("name,void,train_row", [
    ("voc", 255, [0, 4, 0, 3, 0, 0, 255, 0]),     # VOC void borders stay ignored
    ("ade", 0, [255, 4, 0, 3, 0, 0, 0, 0]),       # ADE void stays ignored
])
def test_void_as_ignore(roots, name, void, train_row):
    d = CLASSES[name](roots[name], train=True, transform=Compose([ToTensor()]), labels=CUR,
                      labels_old=OLD, void_as_ignore=True, progress=False)
    assert d[0][1][0].tolist() == train_row
    assert d.lut[void] == 255


def test_without_transform_target_stays_a_pil_image(roots):
    d = VOCSegmentationIncremental(roots["voc"], train=False, labels=CUR, labels_old=OLD,
                                   progress=False)
    img, target = d[0]
    assert img.mode == "RGB" and target.mode == "L"
    assert np.asarray(target)[0].tolist() == EXPECTED[("voc", True, False)]


def test_unmasked_table_follows_task_channel_order():
    # permuted orders (19-1b, ADE b) put old labels first: channel k stands for order[k]
    for dataset, name in (("voc", "19-1b"), ("ade", "100-10b"), ("ade", "50c")):
        for step in range(tasks.num_steps(dataset, name)):
            labels, old, _ = tasks.get_task_labels(dataset, name, step)
            lut = build_lut(labels, old, masking=False, masking_value=255,
                            zero_is_background=True)
            order = tasks.get_order(dataset, name, step)
            assert [int(lut[v]) for v in order] == list(range(len(order)))


def test_apply_lut_keeps_container_type():
    lut = np.arange(256, dtype=np.uint8)[::-1].copy()
    arr = np.array([[0, 1], [254, 255]], dtype=np.uint8)
    assert apply_lut(arr, lut).tolist() == [[255, 254], [1, 0]]
    assert apply_lut(torch.from_numpy(arr), lut).tolist() == [[255, 254], [1, 0]]


def test_remap_happens_after_the_random_transform(synthetic_voc):
    labels, old, _ = tasks.get_task_labels("voc", "15-5", 1)
    d = VOCSegmentationIncremental(str(synthetic_voc), transform=train_transform(24),
                                   labels=labels, labels_old=old, progress=False)
    # the same images with an identity table: the raw values after the same crop/flip
    raw = VOCSegmentationIncremental(str(synthetic_voc), transform=train_transform(24),
                                     labels=labels, labels_old=old, progress=False)
    raw.lut = np.arange(256, dtype=np.uint8)
    for item in range(3):
        img, target = d[(item, 1234 + item)]
        raw_img, raw_target = raw[(item, 1234 + item)]
        assert torch.equal(img, raw_img)
        assert torch.equal(target, torch.from_numpy(d.lut[raw_target.numpy()]))
        assert set(target.unique().tolist()) <= {0, 16, 17, 18, 19, 20}


# PLOP's protocol (--protocol plop, P18): masked and future classes take 0 in every split,
# label 0 stays 0 (ADE void is scored), VOC void 255 stays ignored (docs/behaviour.md §15.7)
PLOP_EXPECTED = {
    # (dataset, split): remapped VALUES
    ("voc", "train"): [0, 4, 0, 3, 0, 0, 255, 0],
    ("voc", "val"): [0, 4, 0, 3, 0, 0, 255, 0],
    ("voc", "test"): [0, 4, 2, 3, 1, 0, 255, 0],
    ("ade", "train"): [0, 4, 0, 3, 0, 0, 0, 0],
    ("ade", "val"): [0, 4, 0, 3, 0, 0, 0, 0],
    ("ade", "test"): [0, 4, 2, 3, 1, 0, 0, 0],
}


@pytest.mark.parametrize("key", sorted(PLOP_EXPECTED))
def test_plop_protocol_remap_table(roots, key):
    name, split = key
    # the test set takes every seen label as current (dataset.factory.get_dataset)
    labels, old = (OLD + CUR, []) if split == "test" else (CUR, OLD)
    d = CLASSES[name](roots[name], train=split == "train", transform=Compose([ToTensor()]),
                      labels=labels, labels_old=old, progress=False, protocol="plop")
    assert d.masking_value == 0
    assert d[0][1][0].tolist() == PLOP_EXPECTED[key]


def test_plop_protocol_without_masking_keeps_ade_old_classes(roots):
    d = CLASSES["ade"](roots["ade"], train=True, transform=Compose([ToTensor()]), labels=CUR,
                       labels_old=OLD, masking=False, progress=False, protocol="plop")
    assert d[0][1][0].tolist() == [0, 4, 2, 3, 1, 0, 0, 0]
