"""--dataset folder: a user's own data in the layout of docs/custom_data.md, made here from the
synthetic VOC tree (classes 1..5 kept, the others turned into background; half the masks grey,
half palette), trained two steps end to end with a task file, and ``--test`` giving the
training run's figures exactly."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import run
import tasks
from argparser import OptionError, parse_options
from dataset.folder import FolderSegmentationIncremental
from dataset.synthetic import voc_palette

NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle"]
TASK = {"folder": {"three-two": {"0": [0, 1, 2, 3], "1": [4, 5]}}}
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4",
        "--epochs", "1", "--lr", "0.01", "--num_workers", "0", "--no_progress"]


def make_folder_dataset(voc_root, out):
    """The folder layout from a VOC-layout tree: labels above 5 become background."""
    voc = os.path.join(voc_root, "PascalVOC12")
    for sub in ("images", "masks", "splits"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    (out / "classes.txt").write_text("\n".join(NAMES) + "\n")
    for voc_split, split in (("train_aug", "train"), ("val", "val")):
        ids = []
        for k, line in enumerate(open(os.path.join(voc, "splits", voc_split + ".txt"))):
            image, mask = (p[1:] for p in line.split())
            image_id = os.path.splitext(os.path.basename(image))[0]
            ids.append(image_id)
            shutil.copy(os.path.join(voc, image), out / "images" / f"{image_id}.jpg")
            values = np.array(Image.open(os.path.join(voc, mask)))
            values[(values > 5) & (values != 255)] = 0
            saved = Image.fromarray(values.astype(np.uint8), mode="L")
            if k % 2:
                saved = saved.convert("P")
                saved.putpalette(voc_palette())
            saved.save(out / "masks" / f"{image_id}.png")
        (out / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out


@pytest.fixture(scope="module")
def folder_data(synthetic_voc, tmp_path_factory):
    root = make_folder_dataset(synthetic_voc, tmp_path_factory.mktemp("folder") / "mine")
    splits = root.parent / "splits.json"
    splits.write_text(json.dumps(TASK))
    return root, splits


def parse(argv):
    return parse_options([str(a) for a in argv])


def run_here(argv):
    try:
        run.main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), f"run.py exited with {e.code}"


def test_selection_rules_and_masking(folder_data):
    root, splits = folder_data
    parse(["--dataset", "folder", "--data_root", root, "--task_file", splits,
                   "--task", "three-two"])
    assert tasks.CLASS_NAMES["folder"] == NAMES
    assert tasks.get_task_dict("folder", "offline") == {0: list(range(6))}
    step1 = dict(root=str(root), labels=[4, 5], labels_old=[0, 1, 2, 3], progress=False,
                 save_index=False)
    disjoint = FolderSegmentationIncremental(train=True, overlap=False, **step1)
    overlap = FolderSegmentationIncremental(train=True, overlap=True, **step1)
    assert set(disjoint.indices) <= set(overlap.indices) and disjoint.indices
    for i in range(len(overlap)):
        _, mask = overlap[i]
        values = set(np.unique(np.asarray(mask)).tolist())
        # old classes masked to background, new classes remapped to channels 4 and 5
        assert values <= {0, 4, 5, 255}
        assert values & {4, 5}
    val = FolderSegmentationIncremental(train=False, overlap=True, **step1)
    assert any(255 in np.asarray(val[i][1]) for i in range(len(val)))


@pytest.mark.slow
def test_two_steps_end_to_end_and_test_exact(folder_data, workdir):
    root, splits = folder_data
    args = ["--dataset", "folder", "--data_root", root, "--task_file", splits,
            "--task", "three-two", *TINY, "--name", "MiB", "--method", "MiB"]
    run_here(args + ["--step", "0,1", "--overlap"])
    result = workdir / "logs/three-two-folder/MiB/results/step-1.json"
    trained = json.loads(result.read_text())
    assert trained["labels_per_step"] == [[0, 1, 2, 3], [4, 5]]
    assert trained["class_names"] == {str(k): name for k, name in enumerate(NAMES)}
    for f in ("train-0.npy", "train-1.npy", "val-1.npy", "test_on_val-1.npy"):
        assert (workdir / "data/folder/three-two-ov" / f).is_file()
    run_here(args + ["--step", "1", "--overlap", "--test"])
    tested = json.loads(result.read_text())
    assert tested["class_iou"] == trained["class_iou"]
    assert tested["mean_iou"] == trained["mean_iou"]


@pytest.mark.parametrize("damage,line", [
    ("classes", "classes.txt does not exist; a folder dataset needs a class-name file"),
    ("rgb", "is a RGB image; save masks as grey (L) or palette (P) PNGs"),
    ("split", "no image 'missing-id'"),
])
def test_layout_mistakes_are_one_line(folder_data, tmp_path, damage, line):
    root, splits = folder_data
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    if damage == "classes":
        (copy / "classes.txt").unlink()
        with pytest.raises(OptionError, match=line):
            parse(["--dataset", "folder", "--data_root", copy, "--task", "offline"])
        return
    if damage == "rgb":
        first = (copy / "splits/train.txt").read_text().split()[0]
        Image.open(copy / "masks" / f"{first}.png").convert("RGB").save(
            copy / "masks" / f"{first}.png")
    else:
        with open(copy / "splits/train.txt", "a") as f:
            f.write("missing-id\n")
    parse(["--dataset", "folder", "--data_root", copy, "--task", "offline"])
    from dataset.errors import DatasetLayoutError
    with pytest.raises(DatasetLayoutError, match=re.escape(line)) as info:
        FolderSegmentationIncremental(root=str(copy), labels=[1, 2, 3, 4, 5], progress=False,
                                      save_index=False)
    assert "\n" not in str(info.value)
