"""Index lists under the original file names, with records that say what they came from."""
import json
import logging
import os
import shutil

import numpy as np
import pytest

import dataset.base
from dataset import IndexListError, VOCSegmentationIncremental
from dataset.synthetic import generate

CUR, OLD = [16, 17, 18, 19, 20], list(range(1, 16))


@pytest.fixture
def voc_copy(tmp_path):
    """A private VOC tree (tests here change it)."""
    generate("voc", str(tmp_path / "data"), n_train=24, n_val=4, size=24, seed=3)
    return tmp_path / "data"


def build(root, idxs_path, **kw):
    kw.setdefault("overlap", True)
    return VOCSegmentationIncremental(str(root), labels=CUR, labels_old=OLD,
                                      idxs_path=str(idxs_path), progress=False, **kw)


class ScanCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = dataset.base.filter_images

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(dataset.base, "filter_images", counting)


def tree_listing(root):
    return sorted((p, os.path.getsize(os.path.join(p, f))) for p, _, fs in os.walk(root)
                  for f in fs)


def test_list_and_record_written_then_reused(voc_copy, tmp_path, monkeypatch):
    scans = ScanCounter(monkeypatch)
    path = tmp_path / "idx" / "voc" / "15-5-ov" / "train-1.npy"
    before = tree_listing(voc_copy)
    first = build(voc_copy, path)
    assert scans.calls == 1 and first.indices
    stored = np.load(path)
    assert stored.dtype == np.int64 and stored.tolist() == first.indices
    record = json.loads((tmp_path / "idx/voc/15-5-ov/train-1.npy.json").read_text())
    assert record["source"]["data_root"] == os.path.abspath(voc_copy)
    assert record["source"]["entries"] == 24
    assert record["source"]["split_file"].endswith("PascalVOC12/splits/train_aug.txt")
    second = build(voc_copy, path)
    assert scans.calls == 1 and second.indices == first.indices
    # no temporary files left, nothing written inside the data root
    assert sorted(os.listdir(path.parent)) == ["train-1.npy", "train-1.npy.json"]
    assert tree_listing(voc_copy) == before


def test_other_data_root_recomputes(voc_copy, tmp_path, monkeypatch, caplog):
    path = tmp_path / "idx" / "train-1.npy"
    build(voc_copy, path)
    moved = tmp_path / "elsewhere"
    shutil.copytree(voc_copy, moved)
    scans = ScanCounter(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dataset.index_cache"):
        build(moved, path)
    assert scans.calls == 1
    assert any("stale" in r.getMessage() and "data_root" in r.getMessage()
               for r in caplog.records)
    record = json.loads(open(str(path) + ".json").read())
    assert record["source"]["data_root"] == os.path.abspath(moved)


def test_changed_split_file_recomputes(voc_copy, tmp_path, monkeypatch):
    path = tmp_path / "train-1.npy"
    first = build(voc_copy, path)
    split = voc_copy / "PascalVOC12/splits/train_aug.txt"
    lines = split.read_text().splitlines(keepends=True)
    split.write_text("".join(lines[::-1]))          # same files, other order
    scans = ScanCounter(monkeypatch)
    second = build(voc_copy, path)
    assert scans.calls == 1
    assert sorted(second.indices) == sorted(len(lines) - 1 - i for i in first.indices)
    assert np.load(path).tolist() == second.indices


def test_other_rule_recomputes(voc_copy, tmp_path, monkeypatch):
    path = tmp_path / "train-1.npy"
    build(voc_copy, path, overlap=True)
    scans = ScanCounter(monkeypatch)
    build(voc_copy, path, overlap=False)
    assert scans.calls == 1


def test_changed_mask_is_rescanned(voc_copy, tmp_path):
    first = build(voc_copy, tmp_path / "a.npy")
    victim = first.base.images[first.indices[0]][1]
    from PIL import Image
    mask = Image.open(victim)
    blank = Image.new("P", mask.size, 0)
    blank.putpalette(mask.getpalette())
    blank.save(victim)
    os.utime(victim, ns=(1, 1))                      # certainly another mtime
    second = build(voc_copy, tmp_path / "b.npy")
    assert second.indices == first.indices[1:]


def test_original_list_used_as_given_and_never_overwritten(voc_copy, tmp_path,
                                                           monkeypatch, caplog):
    path = tmp_path / "data" / "voc" / "15-5" / "train-1.npy"
    path.parent.mkdir(parents=True)
    given = [7, 3, 11, 3]                             # unsorted, even a repeat: kept as is
    np.save(path, np.array(given, dtype=np.int64))
    stamp = path.stat().st_mtime_ns
    scans = ScanCounter(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dataset.index_cache"):
        d = build(voc_copy, path)
    assert d.indices == given and scans.calls == 0
    assert any("as given" in r.getMessage() for r in caplog.records)
    assert path.stat().st_mtime_ns == stamp
    assert not os.path.exists(str(path) + ".json")


def test_list_replaced_after_writing_is_used_as_given(voc_copy, tmp_path, monkeypatch):
    path = tmp_path / "train-1.npy"
    build(voc_copy, path)
    np.save(path, np.array([5, 1], dtype=np.int64))  # user copies an original list over ours
    other = tmp_path / "other"
    shutil.copytree(voc_copy, other)                 # ...and the record would be stale
    scans = ScanCounter(monkeypatch)
    assert build(other, path).indices == [5, 1]
    assert scans.calls == 0 and np.load(path).tolist() == [5, 1]


def test_other_ranks_write_nothing(voc_copy, tmp_path):
    path = tmp_path / "rank1" / "train-1.npy"
    d = build(voc_copy, path, save_index=False)
    assert d.indices and not path.parent.exists()


def test_without_path_nothing_is_cached(voc_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = VOCSegmentationIncremental(str(voc_copy), labels=CUR, labels_old=OLD, progress=False)
    assert d.indices and os.listdir(tmp_path) == ["data"]


def test_list_of_other_data_is_refused(voc_copy, tmp_path):
    path = tmp_path / "train-1.npy"
    np.save(path, np.array([0, 24], dtype=np.int64))  # the split has 24 entries: 0..23
    with pytest.raises(IndexListError, match=r"index 24 .* 24 entries"):
        build(voc_copy, path)


def test_unreadable_list_is_named(voc_copy, tmp_path):
    path = tmp_path / "train-1.npy"
    path.write_bytes(b"not a numpy file")
    with pytest.raises(IndexListError, match="train-1.npy"):
        build(voc_copy, path)
