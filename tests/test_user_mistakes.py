"""The mistakes a new user still met (issue 28): each one ends with one clear line, exit code
1 (or a warning where the run is still sensible), and leaves the files on disk unchanged."""
import re
import shutil

import pytest
from PIL import Image
from test_bad_input import fails_with, snapshot, voc

import argparser
import run
from dataset.errors import SizeMismatchError


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a file that must stay as it is")
    return tmp_path


# row 4: every numeric option with a range, checked in one place (argparser.check_ranges)
@pytest.mark.parametrize("option,value,message", [
    ("--lr", "-0.01", "--lr must be at least 0, got -0.01"),
    ("--lr", "0.01,-0.001", "--lr must be at least 0, got -0.001"),
    ("--momentum", "-1", "--momentum must be between 0 and 1, got -1"),
    ("--momentum", "1.5", "--momentum must be between 0 and 1, got 1.5"),
    ("--weight_decay", "-1e-4", "--weight_decay must be at least 0, got -0.0001"),
    ("--reg_importance", "-1", "--reg_importance must be at least 0, got -1"),
    ("--loss_kd", "-10", "--loss_kd must be at least 0, got -10"),
    ("--loss_de", "-1", "--loss_de must be at least 0, got -1"),
    ("--alpha", "0", "--alpha must be greater than 0, got 0"),
    ("--icarl_importance", "-2", "--icarl_importance must be at least 0, got -2"),
    ("--reg_alpha", "1.5", "--reg_alpha must be between 0 and 1, got 1.5"),
    ("--lr_decay_step", "0", "--lr_decay_step must be at least 1, got 0"),
    ("--lr_decay_factor", "0", "--lr_decay_factor must be greater than 0, got 0"),
    ("--lr_power", "-0.9", "--lr_power must be at least 0, got -0.9"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--batch_size", "0", "--batch_size must be at least 1, got 0"),
    ("--crop_size", "8", "--crop_size must be at least 16, got 8"),
    ("--num_workers", "-1", "--num_workers must be at least 0, got -1"),
    ("--sample_num", "-1", "--sample_num must be at least 0, got -1"),
    ("--random_seed", "-1", "--random_seed must be between 0 and 4294967295, got -1"),
    ("--pooling", "0", "--pooling must be at least 1, got 0"),
    ("--val_interval", "0", "--val_interval must be at least 1, got 0"),
    ("--ckpt_interval", "0", "--ckpt_interval must be at least 1, got 0"),
    ("--print_interval", "0", "--print_interval must be at least 1, got 0"),
    ("--reg_iterations", "0", "--reg_iterations must be at least 1, got 0"),
    # the method families' own options (methods/plop: OPTION_RANGES)
    ("--pod_factor", "-5", "--pod_factor must be at least 0, got -5"),
    ("--threshold", "1.2", "--threshold must be between 0 and 1, got 1.2"),
    ("--pseudo_nb_bins", "0", "--pseudo_nb_bins must be at least 1, got 0"),
    ("--classif_adaptive_min_factor", "-1",
     "--classif_adaptive_min_factor must be between 0 and 1, got -1"),
])
def test_numeric_option_out_of_range_is_one_line(empty_dir, capsys, option, value, message):
    fails_with(voc("data", "--step", "0", f"{option}={value}"), message, capsys, empty_dir)
    assert sorted(p.name for p in empty_dir.iterdir()) == ["keep.txt"]


def test_spp_scales_are_checked_value_by_value(empty_dir, capsys):
    fails_with(voc("data", "--step", "0", "--spp_scales", "1", "0"),
               "--spp_scales must be at least 1, got 0", capsys, empty_dir)


def test_lr_zero_is_a_warning():
    opts = argparser.parse_options(["--lr", "0"])
    assert "--lr 0: the weights never change; give a positive rate" in opts.warnings


def test_every_numeric_option_has_a_range():
    """A new numeric option without a range would let a negative value reach torch."""
    ranges = {**argparser.OPTION_RANGES, **argparser.methods.option_ranges()}
    unranged = {"local_rank", "num_classes", "output_stride", "step_threshold",
                "pseudo_soft_factor", "class_order"}  # launcher / ignored / checked elsewhere
    for action in argparser.get_argparser()._actions:
        if action.type in (int, float) or action.dest == "lr":
            assert action.dest in ranges or action.dest in unranged, action.dest


# row 11: a --lr list longer than the task
def test_lr_list_longer_than_the_task_warns_that_the_rest_is_not_used():
    opts = argparser.parse_options(["--task", "15-5", "--lr", "0.02,0.01,0.5", "--step", "1"])
    assert opts.lr == 0.01
    assert "--lr gives 3 values but task '15-5' of 'voc' has 2 steps: the last 1 are not " \
        "used" in opts.warnings


def test_lr_list_as_long_as_the_task_is_accepted():
    opts = argparser.parse_options(["--task", "15-5", "--lr", "0.02,0.01", "--step", "1"])
    assert opts.lr == 0.01 and opts.lrs == [0.02, 0.01]


# row 13: the original's own way of building the options, with an integer step
def test_integer_step_set_after_parsing_is_that_step():
    opts = argparser.get_argparser().parse_args(["--task", "15-5", "--lr", "0.02,0.01"])
    opts.step = 1
    argparser.modify_command_options(opts)
    assert opts.step == 1 and opts.steps == [1] and opts.lr == 0.01


@pytest.mark.parametrize("step,message", [(-1, "steps are numbers >= 0"),
                                          (2, "step 2 does not exist in task '15-5'")])
def test_integer_step_out_of_the_task_is_an_option_error(step, message):
    opts = argparser.get_argparser().parse_args(["--task", "15-5"])
    opts.step = step
    with pytest.raises(argparser.OptionError, match=message):
        argparser.modify_command_options(opts)


def test_snapshot_sees_a_changed_file(empty_dir):
    """The helper the tests above rely on would notice a damaged file."""
    before = snapshot(empty_dir)
    (empty_dir / "keep.txt").write_text("changed")
    assert snapshot(empty_dir) != before
    assert run is not None


# row 1: a mask whose size differs from its image
def _shrink_mask(path, size=(50, 40)):
    with Image.open(path) as mask:
        mask.resize(size, Image.NEAREST).save(path)


def test_training_mask_of_another_size_names_both_files(synthetic_voc, tmp_path, monkeypatch,
                                                        capsys):
    shutil.copytree(synthetic_voc, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    voc_root = tmp_path / "data/PascalVOC12"
    for mask in (voc_root / "SegmentationClassAug").iterdir():
        _shrink_mask(mask)
    line = fails_with(voc("data", "--name", "M", "--step", "0"), "but its mask", capsys,
                      tmp_path)
    assert re.search(r"image \S+JPEGImages/\S+\.jpg is \d+x\d+ but its mask "
                     r"\S+SegmentationClassAug/\S+\.png is 50x40; give both the same size",
                     line), line
    assert not (tmp_path / "checkpoints/step/15-5-voc_M_0.pth").exists()


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_every_split_refuses_a_pair_of_two_sizes(synthetic_voc, tmp_path, image_set):
    """Validation and test read their pairs the same way (val is VOC's test split)."""
    from dataset.voc import VOCSegmentation
    shutil.copytree(synthetic_voc, tmp_path / "data")
    split = VOCSegmentation(tmp_path / "data", image_set)
    image, mask = split.images[3]
    width, height = split.load(3)[0].size
    _shrink_mask(mask)
    with pytest.raises(SizeMismatchError) as e:
        split.load(3)
    assert str(e.value) == (f"image {image} is {width}x{height} but its mask {mask} is 50x40; "
                            "give both the same size (or remove the pair from "
                            f"{split.split_name})")
    split.load(4)         # the other pairs still read
