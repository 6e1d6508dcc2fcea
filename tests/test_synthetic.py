"""The synthetic data generator: layouts, determinism, coverage of every task step,
and classes that can be told apart."""
import colorsys
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tasks
from dataset import DatasetError
from dataset.ade import AdeSegmentation
from dataset.synthetic import SALIENCY_DIR, VERSION, class_colour, generate, main
from dataset.utils import scan_masks, select_indices
from dataset.voc import VOCSegmentation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_tree(folder):
    return {os.path.relpath(os.path.join(p, f), folder): open(os.path.join(p, f), "rb").read()
            for p, _, files in os.walk(folder) for f in files}


def test_voc_layout(synthetic_voc):
    voc = synthetic_voc / "PascalVOC12"
    lines = (voc / "splits/train_aug.txt").read_text().splitlines(keepends=True)
    assert len(lines) == 64 and len((voc / "splits/val.txt").read_text().splitlines()) == 24
    assert lines[0] == "/JPEGImages/2007_000000.jpg /SegmentationClassAug/2007_000000.png\n"
    mask = Image.open(voc / "SegmentationClassAug/2007_000000.png")
    assert mask.mode == "P" and mask.getpalette()[3:6] == [128, 0, 0]
    values = set(np.unique(np.asarray(mask)).tolist())
    assert 255 in values and values <= set(range(21)) | {255}
    img = Image.open(voc / "JPEGImages/2007_000000.jpg")
    assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) == 48
    assert img.size == mask.size


def test_voc_void_marks_object_outlines(synthetic_voc):
    mask = np.asarray(Image.open(synthetic_voc / "PascalVOC12/SegmentationClassAug/"
                                 "2007_000001.png")).astype(int)
    void = mask == 255
    assert void.any()
    # void is a thin band: a labelled pixel is never more than 2 pixels away
    for y, x in zip(*np.nonzero(void)):
        window = mask[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
        assert (window != 255).any()
    # and every class pixel is separated from other labels by void
    inner = mask[1:-1, 1:-1]
    for dy, dx in ((0, 1), (1, 0)):
        other = mask[1 + dy:mask.shape[0] - 1 + dy, 1 + dx:mask.shape[1] - 1 + dx]
        assert not np.any((inner != other) & (inner != 255) & (other != 255))


def test_ade_layout(synthetic_ade):
    ade = synthetic_ade / "ADEChallengeData2016"
    names = sorted(os.listdir(ade / "images/training"))
    assert len(names) == 64 and names[0] == "ADE_train_00000001.jpg"
    assert len(os.listdir(ade / "annotations/validation")) == 24
    mask = Image.open(ade / "annotations/training/ADE_train_00000001.png")
    assert mask.mode == "L"
    presence = scan_masks([m for _, m in AdeSegmentation(str(synthetic_ade)).images],
                          progress=False)
    assert not presence[:, 151:].any()          # labels 0..150 only, no 255
    assert presence[:, 0].all()                 # void background everywhere


@pytest.mark.parametrize("dataset", ["voc", "ade"])
def test_every_task_step_has_images(dataset, synthetic_voc, synthetic_ade):
    root = str(synthetic_voc if dataset == "voc" else synthetic_ade)
    reader = VOCSegmentation if dataset == "voc" else AdeSegmentation
    train = scan_masks([m for _, m in reader(root, "train" if dataset == "voc" else True)
                        .images], progress=False)
    val = scan_masks([m for _, m in reader(root, "val" if dataset == "voc" else False)
                      .images], progress=False)
    for name in tasks.TASKS[dataset]:
        for step in range(tasks.num_steps(dataset, name)):
            labels, old, _ = tasks.get_task_labels(dataset, name, step)
            for overlap in (False, True):
                assert select_indices(train, labels, old, overlap), (name, step, overlap)
            assert select_indices(val, labels, old, overlap=True), (name, step, "val")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = read_tree(generate("voc", str(tmp_path / "a"), 6, 2, size=32, seed=5))
    b = read_tree(generate("voc", str(tmp_path / "b"), 6, 2, size=32, seed=5))
    c = read_tree(generate("voc", str(tmp_path / "c"), 6, 2, size=32, seed=6))
    a.pop("SYNTHETIC.json"), b.pop("SYNTHETIC.json"), c.pop("SYNTHETIC.json")
    assert a == b
    assert set(a) == set(c) and a != c


def test_regenerating_replaces_an_earlier_synthetic_tree(tmp_path):
    generate("ade", str(tmp_path), 5, 2, size=24, seed=0)
    generate("ade", str(tmp_path), 3, 2, size=24, seed=0)
    assert len(os.listdir(tmp_path / "ADEChallengeData2016/images/training")) == 3


def test_real_data_is_never_overwritten(tmp_path):
    (tmp_path / "PascalVOC12").mkdir()
    (tmp_path / "PascalVOC12" / "precious.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not written by this generator"):
        generate("voc", str(tmp_path), 4, 2, size=24, seed=0)
    assert (tmp_path / "PascalVOC12" / "precious.jpg").exists()


def test_objects_carry_their_class_colour(synthetic_voc):
    """Learnable by colour alone: the mean hue of an object's pixels is nearest to its
    own class's hue for nearly every object."""
    hues = {k: colorsys.rgb_to_hsv(*(class_colour(k) / 255))[0] for k in range(1, 21)}
    voc = synthetic_voc / "PascalVOC12"
    right = total = 0
    for name in sorted(os.listdir(voc / "JPEGImages"))[:40]:
        img = np.asarray(Image.open(voc / "JPEGImages" / name).convert("RGB")) / 255.0
        mask = np.asarray(Image.open(voc / "SegmentationClassAug" / (name[:-3] + "png")))
        for k in set(np.unique(mask).tolist()) - {0, 255}:
            region = mask == k
            if region.sum() < 20:
                continue
            r, g, b = img[region].mean(axis=0)
            hue = colorsys.rgb_to_hsv(r, g, b)[0]
            dist = {c: min(abs(hue - h), 1 - abs(hue - h)) for c, h in hues.items()}
            right += min(dist, key=dist.get) == k
            total += 1
    assert total >= 30 and right / total >= 0.8


def test_command_line(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "dataset.synthetic", "--dataset", "voc",
                          "--data_root", str(tmp_path), "--n_train", "5", "--n_val", "3",
                          "--size", "32", "--seed", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote 5 training and 3 validation images" in out.stdout
    assert len(VOCSegmentation(str(tmp_path), "val").images) == 3

    # a refused target: exit status 1 and one line on stderr
    (tmp_path / "real" / "ADEChallengeData2016").mkdir(parents=True)
    assert main(["--dataset", "ade", "--data_root", str(tmp_path / "real")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def pixels_digest(folder):
    """SHA-256 over the relative paths and decoded pixels of a tree (other files: bytes),
    leaving out the marker and the saliency maps."""
    digest = hashlib.sha256()
    for path, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(path, f), folder)
            if rel == "SYNTHETIC.json" or rel.startswith(SALIENCY_DIR):
                continue
            digest.update(rel.encode())
            if f.endswith((".jpg", ".png")):
                digest.update(np.asarray(Image.open(os.path.join(path, f))).tobytes())
            else:
                digest.update(open(os.path.join(path, f), "rb").read())
    return digest.hexdigest()


# Digests of generate(dataset, root, 6, 2, size=24, seed=3) made by the generator as it was
# before it wrote saliency maps (commit 51d0ae0): the maps must not change any other output.
DIGESTS_BEFORE_SALIENCY = {
    "voc": "32ef6c13d6cf3733f2001c099fa52a0a59588e5184ee6671dae92456cc7cc622",
    "ade": "0a79e501d2b2ce3c4130b115e1b2598d6fa3e9a5b21c68244ef6b4d1a5f9263a",
}


@pytest.mark.parametrize("dataset", ["voc", "ade"])
def test_saliency_maps_leave_images_masks_and_lists_as_they_were(dataset, tmp_path):
    folder = generate(dataset, str(tmp_path), 6, 2, size=24, seed=3)
    assert pixels_digest(folder) == DIGESTS_BEFORE_SALIENCY[dataset]
    assert os.path.isdir(os.path.join(folder, SALIENCY_DIR)) == (dataset == "voc")


def test_voc_saliency_maps_mark_the_objects_with_noise(synthetic_voc):
    voc = synthetic_voc / "PascalVOC12"
    names = [line.split()[0][len("/JPEGImages/"):-4]
             for split in ("train_aug.txt", "val.txt")
             for line in (voc / "splits" / split).read_text().splitlines()]
    assert len(names) == 88 and len(os.listdir(voc / SALIENCY_DIR)) == 88
    hits = {"object": [0, 0], "background": [0, 0]}
    values = set()
    for name in names:
        sal = Image.open(voc / SALIENCY_DIR / f"{name}.png")
        mask = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{name}.png"))
        assert sal.mode == "L" and sal.size == mask.shape[::-1]
        sal = np.asarray(sal)
        values |= set(np.unique(sal).tolist())
        for part, region in (("object", mask != 0), ("background", mask == 0)):
            hits[part][0] += int((sal[region] > 0).sum())
            hits[part][1] += int(region.sum())
    missed = 1 - hits["object"][0] / hits["object"][1]
    false = hits["background"][0] / hits["background"][1]
    # mostly right, with both kinds of errors; salient pixels take many grey levels >= 48
    assert 0.01 < missed < 0.15 and 0.01 < false < 0.2, (missed, false)
    assert min(values - {0}) >= 48 and len(values) > 100


def test_saliency_maps_follow_the_seed(tmp_path):
    maps = {}
    for seed in (5, 5, 6):
        folder = generate("voc", str(tmp_path / str(seed)), 4, 2, size=24, seed=seed)
        maps.setdefault(seed, []).append(read_tree(os.path.join(folder, SALIENCY_DIR)))
    assert maps[5][0] == maps[5][1] and len(maps[5][0]) == 6
    assert maps[6][0].keys() == maps[5][0].keys() and maps[6][0] != maps[5][0]


def test_a_tree_of_an_older_generator_is_made_again(tmp_path):
    """A marker without the generator's version (trees made before the saliency maps) does
    not pass for current data: the benchmark's data step writes the tree again."""
    from tools import experiment as ex
    cfg = ex.Config(out=str(tmp_path), n_train=4, n_val=2, size=24)
    assert ex.ensure_data(cfg) and not ex.ensure_data(cfg)
    folder = tmp_path / "data" / "PascalVOC12"
    marker = json.loads((folder / "SYNTHETIC.json").read_text())
    assert marker.pop("version") == VERSION
    (folder / "SYNTHETIC.json").write_text(json.dumps(marker))
    shutil.rmtree(folder / SALIENCY_DIR)
    assert ex.ensure_data(cfg)
    assert len(os.listdir(folder / SALIENCY_DIR)) == 6
