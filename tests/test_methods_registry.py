"""The method registry: every method is declared once, names match in any case, the parts a
step gets follow the options, and the step-0 signature tells which methods train step 0
the same way."""
import pytest
import torch

import methods
from argparser import build_options, parse_options

CPU = torch.device("cpu")


def test_every_method_is_declared_once_with_its_preset():
    names = methods.method_names()
    assert names == ["FT", "LWF", "MiB", "ILT", "LWF-MC", "EWC", "RW", "PI", "PLOP",
                     "RCIL"]
    assert methods.find_method("mib").name == "MiB" and methods.find_method("x") is None
    assert methods.presets()["ILT"] == {"loss_kd": 100, "loss_de": 100}


@pytest.mark.parametrize("argv, step, parts", [
    (["--method", "MiB"], 0, ["CrossEntropy"]),
    # the main loss of the highest priority is the only one kept
    (["--method", "MiB"], 1, ["UnbiasedCE", "UnbiasedDistillation", "BackgroundInit"]),
    (["--method", "ILT"], 1, ["CrossEntropy", "OutputDistillation", "FeatureDistillation"]),
    (["--method", "LWF-MC"], 0, ["BinaryCrossEntropy"]),
    (["--icarl", "--icarl_disjoint"], 1, ["DisjointIcarl"]),
    (["--method", "EWC"], 0, ["CrossEntropy", "WeightRegularizer"]),
])
def test_the_parts_of_a_step_follow_the_options(argv, step, parts):
    opts = build_options(["--task", "15-5", "--step", str(step), *argv])
    classes = [16] if step == 0 else [16, 5]
    method = methods.assemble(methods.StepInfo(opts, classes, CPU))
    assert method.names() == parts
    assert type(method.main).__name__ == parts[0]


def test_step0_signatures_group_the_methods_that_share_step0():
    groups = {}
    for name in methods.method_names():
        signature = methods.step0_signature(parse_options(["--method", name]))
        groups.setdefault(signature, []).append(name)
    assert sorted(groups.values()) == sorted([["FT", "LWF", "MiB", "ILT", "PLOP"], ["LWF-MC"],
                                              ["EWC"], ["RW"], ["PI"], ["RCIL"]])
    # an option a step-0 part reads changes the signature
    assert methods.step0_signature(parse_options(["--method", "EWC"])) != \
        methods.step0_signature(parse_options(["--method", "EWC", "--reg_alpha", "0.5"]))


def test_every_family_keeps_the_trainer_state_keys():
    assert methods.state_keys() == ("regularizer",)
    opts = build_options(["--method", "FT"])
    assert methods.assemble(methods.StepInfo(opts, [16], CPU)).state_dict() == \
        {"regularizer": None}
