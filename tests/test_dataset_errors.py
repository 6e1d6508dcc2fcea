"""Bad input: one clear message naming the file and what to do."""
import os

import pytest
import torch

from dataset import (
    AdeSegmentationIncremental,
    CorruptFileError,
    DatasetError,
    DatasetLayoutError,
    VOCSegmentationIncremental,
    one_line,
)
from dataset.loader import build_loader
from dataset.synthetic import generate
from dataset.transform import train_transform


@pytest.fixture
def voc_root(tmp_path):
    generate("voc", str(tmp_path / "d"), n_train=20, n_val=3, size=24, seed=1)
    return tmp_path / "d"


@pytest.fixture
def ade_root(tmp_path):
    generate("ade", str(tmp_path / "d"), n_train=12, n_val=12, size=24, seed=1)
    return tmp_path / "d"


def voc(root, **kw):
    return VOCSegmentationIncremental(str(root), labels=list(range(1, 21)), progress=False,
                                      **kw)


def test_missing_voc_root_names_path_and_script(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        voc(tmp_path)
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "PascalVOC12") in msg
    assert "data/download_voc.sh" in msg and "\n" not in msg


def test_missing_ade_root_names_path_and_script(tmp_path):
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016.*download_ade.sh"):
        AdeSegmentationIncremental(str(tmp_path), labels=[1], progress=False)


def test_missing_split_file(voc_root):
    os.remove(voc_root / "PascalVOC12/splits/val.txt")
    with pytest.raises(DatasetLayoutError, match=r"splits/val.txt.*download_voc.sh"):
        voc(voc_root, train=False)


def test_missing_augmented_masks_folder(voc_root):
    os.rename(voc_root / "PascalVOC12/SegmentationClassAug", voc_root / "PascalVOC12/other")
    with pytest.raises(DatasetLayoutError, match="SegmentationClassAug"):
        voc(voc_root)


def test_split_line_naming_a_missing_file_fails_at_construction(voc_root):
    missing = voc_root / "PascalVOC12/JPEGImages/2007_000005.jpg"
    os.remove(missing)
    with pytest.raises(DatasetLayoutError) as e:
        voc(voc_root)
    assert str(missing) in str(e.value) and "line 6" in str(e.value)


def test_last_line_without_newline_gets_a_hint(voc_root):
    split = voc_root / "PascalVOC12/splits/train_aug.txt"
    split.write_text(split.read_text().rstrip("\n"))
    with pytest.raises(DatasetLayoutError) as e:
        voc(voc_root)
    # the original drops the last character of every line: '.pn' instead of '.png'
    assert "2007_000019.pn (line 20" in str(e.value) and "newline" in str(e.value)


def test_malformed_split_line(voc_root):
    split = voc_root / "PascalVOC12/splits/train_aug.txt"
    split.write_text(split.read_text() + "just-one-field\n")
    with pytest.raises(DatasetLayoutError, match="line 21"):
        voc(voc_root)


def test_ade_image_without_mask(ade_root):
    os.remove(ade_root / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png")
    with pytest.raises(DatasetLayoutError, match="ADE_val_00000002.png"):
        AdeSegmentationIncremental(str(ade_root), train=False, labels=[1], progress=False)


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


def test_corrupt_image_raises_from_getitem(voc_root):
    d = voc(voc_root, overlap=True)
    bad = d.base.images[d.indices[1]][0]
    _corrupt(type(voc_root)(bad))
    d[0]
    with pytest.raises(CorruptFileError, match=os.path.basename(bad)):
        d[1]


def test_corrupt_mask_found_by_the_scan_names_the_file(voc_root):
    bad = voc_root / "PascalVOC12/SegmentationClassAug/2007_000003.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(CorruptFileError, match="2007_000003.png"):
        voc(voc_root)


def test_corrupt_file_in_a_loader_worker_keeps_type_and_message(voc_root):
    d = voc(voc_root, transform=train_transform(16))
    bad = d.base.images[d.indices[0]][0]
    _corrupt(type(voc_root)(bad))
    torch.manual_seed(0)
    loader = build_loader(d, batch_size=len(d), shuffle=False, drop_last=False,
                          num_workers=1, seed=0)
    with pytest.raises(DatasetError) as e:
        next(iter(loader))
    assert isinstance(e.value, CorruptFileError)
    msg = str(e.value)
    assert msg.startswith("cannot read image") and os.path.basename(bad) in msg
    assert "\n" not in msg and one_line(e.value) == msg
    assert "Original Traceback" in e.value.worker_traceback
