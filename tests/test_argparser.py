"""Command line: original names and defaults, presets, aliases, derived options, validation."""
import subprocess
import sys
from pathlib import Path

import pytest

import argparser
from argparser import OptionError, parse_options

ROOT = Path(__file__).resolve().parent.parent

# option -> default of the original command line (docs/behaviour.md §2.1)
ORIGINAL_DEFAULTS = {
    "local_rank": 0, "random_seed": 42, "num_workers": 1, "data_root": "data", "dataset": "voc",
    "method": None, "epochs": 30, "fix_bn": False, "batch_size": 4, "crop_size": 512,
    "momentum": 0.9, "weight_decay": 1e-4, "lr_policy": "poly", "lr_decay_step": 5000,
    "lr_decay_factor": 0.1, "lr_power": 0.9, "bce": False, "val_on_trainset": False,
    "cross_val": False, "crop_val": True, "logdir": "./logs", "name": "Experiment",
    "sample_num": 0, "debug": False, "visualize": True, "print_interval": 10,
    "val_interval": 1, "ckpt_interval": 1, "backbone": "resnet101", "output_stride": 16,
    "no_pretrained": False, "norm_act": "iabn_sync", "fusion_mode": "mean", "pooling": 32,
    "test": False, "ckpt": None, "freeze": False, "loss_de": 0.0, "loss_kd": 0.0,
    "regularizer": None, "reg_importance": 1.0, "reg_alpha": 0.9, "reg_no_normalize": False,
    "reg_iterations": 10, "icarl": False, "icarl_importance": 1.0, "icarl_disjoint": False,
    "icarl_bkg": False, "init_balanced": False, "unkd": False, "alpha": 1.0, "unce": False,
    "task": "19-1", "step": 0, "no_mask": False, "overlap": False, "step_ckpt": None,
    "opt_level": "O0", "lr": 0.007,
}


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_every_original_option_and_default():
    opts = parse_options([])
    for key, value in ORIGINAL_DEFAULTS.items():
        assert getattr(opts, key) == value, key
    # derived options (§2.4)
    assert opts.num_classes == 21 and opts.task_name == "19-1-voc"
    assert opts.no_overlap and opts.no_cross_val and opts.steps == [0]
    assert parse_options(["--dataset", "ade", "--task", "100-50"]).num_classes == 150


def test_help_lists_every_original_option():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for key in ORIGINAL_DEFAULTS:
        flag = "--fusion-mode" if key == "fusion_mode" else f"--{key}"
        assert flag in out.stdout, flag
    for group in ("data", "method", "optimisation", "network", "logging"):
        assert f"{group}:" in out.stdout


@pytest.mark.parametrize("method,expected", [
    ("FT", {"loss_kd": 0.0, "unce": False, "regularizer": None, "icarl": False}),
    ("LWF", {"loss_kd": 100, "unkd": False, "loss_de": 0.0}),
    ("LWF-MC", {"icarl": True, "icarl_importance": 10, "loss_kd": 0.0}),
    ("ILT", {"loss_kd": 100, "loss_de": 100}),
    ("EWC", {"regularizer": "ewc", "reg_importance": 500}),
    ("RW", {"regularizer": "rw", "reg_importance": 100}),
    ("PI", {"regularizer": "pi", "reg_importance": 500}),
    ("MiB", {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True, "alpha": 1.0}),
])
def test_method_presets(method, expected):
    opts = parse_options(["--method", method])
    for key, value in expected.items():
        assert getattr(opts, key) == value, (method, key)


def _ported_path(argv):
    """What code ported from the original does: parse, then finish the namespace."""
    opts = argparser.get_argparser().parse_args(argv)
    return argparser.modify_command_options(opts)


@pytest.mark.parametrize("method", argparser.METHODS)
@pytest.mark.parametrize("extra", [
    [], ["--step", "1", "--lr", "0.001", "--loss_kd", "3"],
    ["--task", "15-5s", "--step", "all", "--lr", "0.01,0.001", "--explicit_overrides_preset",
     "--reg_importance", "7", "--visualize", "--sample_num", "2"],
])
def test_the_original_argparser_api_gives_what_parse_options_gives(method, extra):
    argv = ["--method", method, *extra]
    ported = _ported_path(argv)
    assert vars(ported) == vars(parse_options(argv))
    assert isinstance(ported.lr, float)


def test_the_original_argparser_api_applies_the_mib_preset():
    opts = _ported_path(["--method", "MIB", "--lr", "0.01"])
    assert (opts.unce, opts.unkd, opts.init_balanced, opts.loss_kd) == (True, True, True, 10)
    assert opts.lr == 0.01 and opts.task_name == "19-1-voc" and opts.num_classes == 21
    # finishing twice changes nothing
    assert vars(argparser.modify_command_options(opts)) == vars(opts)


@pytest.mark.parametrize("spelling", ["MIB", "mib", "MiB", "Mib"])
def test_method_names_are_case_insensitive(spelling):
    assert parse_options(["--method", spelling]).method == "MiB"
    assert parse_options(["--method", "lwf-mc"]).method == "LWF-MC"


def test_preset_overrides_explicit_option_like_the_original_and_says_so():
    opts = parse_options(["--method", "MiB", "--loss_kd", "100"])
    assert opts.loss_kd == 10
    assert any("overriding the --loss_kd 100.0" in w for w in opts.warnings)
    # giving the preset's own value is not an override worth reporting
    assert not parse_options(["--method", "MiB", "--loss_kd", "10"]).warnings


def test_explicit_options_win_when_asked():
    opts = parse_options(["--method", "MiB", "--loss_kd", "100", "--explicit_overrides_preset"])
    assert opts.loss_kd == 100 and opts.unce and opts.unkd and opts.init_balanced
    assert any("kept over the MiB preset" in w for w in opts.warnings)


def test_readme_spellings_are_accepted():
    opts = parse_options(["--overlapped", "--no-pretrained", "--local-rank", "3"])
    assert opts.overlap and opts.no_pretrained and opts.local_rank == 3
    assert parse_options(["--local_rank=2"]).local_rank == 2


def test_local_rank_from_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse_options([]).local_rank == 1


def test_inverted_flags_keep_original_semantics():
    opts = parse_options(["--crop_val", "--visualize", "--sample_num", "3"])
    assert opts.crop_val is False and opts.visualize is False
    assert opts.sample_num == 0  # no TensorBoard -> no samples (§2.4)
    assert parse_options(["--full_image_eval"]).crop_val is False


def test_prefix_abbreviations_are_accepted_like_argparse_in_the_original():
    assert parse_options(["--reg_imp", "3"]).reg_importance == 3


def test_aliases_of_tasks_are_canonicalised():
    opts = parse_options(["--task", "15-1", "--step", "3"])
    assert opts.task == "15-5s" and opts.task_name == "15-5s-voc"
    assert any("15-5s" in w for w in opts.warnings)
    assert parse_options(["--dataset", "ade", "--task", "50-50"]).task == "50"


def test_step_lists_and_all():
    assert parse_options(["--task", "15-5s", "--step", "0,1,2"]).steps == [0, 1, 2]
    opts = parse_options(["--task", "10-5-5", "--step", "all"])
    assert opts.steps == [0, 1, 2] and opts.step == 0
    assert parse_options(["--task", "15-5s", "--step", "2,3"]).step == 2


def test_learning_rate_per_step():
    opts = parse_options(["--task", "15-5s", "--step", "all", "--lr", "0.01,0.001"])
    assert opts.lr == 0.01
    assert [argparser.lr_for_step(opts, s) for s in range(6)] == [0.01] + [0.001] * 5
    assert parse_options(["--lr", "0.02"]).lr == 0.02


def test_overlap_in_names_is_opt_in():
    assert parse_options(["--task", "15-5", "--overlap"]).task_name == "15-5-voc"
    assert parse_options(["--task", "15-5", "--overlap",
                          "--overlap_in_names"]).task_name == "15-5-ov-voc"


def test_ignored_original_options_warn():
    opts = parse_options(["--fusion-mode", "max", "--num_classes", "7"])
    assert opts.num_classes == 21
    assert sum("is ignored" in w for w in opts.warnings) == 2


@pytest.mark.parametrize("argv,message", [
    (["--task", "15-5", "--step", "2"],
     "step 2 does not exist in task '15-5' of 'voc'; valid steps: 0..1"),
    (["--task", "100-50"], "unknown task '100-50' for dataset 'voc'"),
    (["--task", "15-5s", "--step", "0,2"], "must be consecutive"),
    (["--task", "15-5s", "--step", "2,1"], "increasing"),
    (["--test", "--task", "15-5", "--step", "0,1"], "--test takes one step"),
    (["--ckpt", "x.pth", "--task", "15-5", "--step", "all"], "--ckpt belongs to one step"),
    (["--method", "EWC", "--fix_bn"], "--fix_bn cannot be combined with EWC"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_contradictions_raise_one_clear_line(argv, message):
    with pytest.raises(OptionError) as err:
        parse_options(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv,message", [
    (["--method", "MIBB"], "unknown method 'MIBB' (did you mean MiB?)"),
    (["--loss_kdd", "3"], "did you mean --loss_kd?"),
    (["--step", "x"], "invalid step 'x'"),
    (["--dataset", "coco"], "invalid choice: 'coco'"),
])
def test_parse_errors_are_one_line_with_exit_code_1(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "usage:" not in err


def test_warnings_for_options_without_effect():
    assert any("--unkd has no effect" in w for w in parse_options(["--unkd"]).warnings)
    assert any("--icarl_disjoint" in w for w in parse_options(["--icarl_disjoint"]).warnings)
    assert any("plain fine-tuning" in w
               for w in parse_options(["--task", "15-5", "--step", "1"]).warnings)
    # the registry says whether a part is active: PLOP's options alone train more than FT
    assert not any("plain fine-tuning" in w for w in parse_options(
        ["--task", "15-5", "--step", "1", "--pod", "local", "--pseudo", "entropy"]).warnings)
    assert any("plain fine-tuning" in w for w in parse_options(
        ["--task", "15-5", "--step", "1", "--loss_kd", "0"]).warnings)


def test_step_ckpt_belongs_to_the_first_step_of_a_list():
    import run
    opts = parse_options(["--task", "15-5s", "--step", "1,2,3", "--step_ckpt", "s0.pth"])
    assert opts.step_ckpt == "s0.pth" and opts.steps == [1, 2, 3]
    assert run.options_for_step(opts, 1).step_ckpt == "s0.pth"
    assert run.options_for_step(opts, 2).step_ckpt is None      # its own previous step
