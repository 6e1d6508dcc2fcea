"""The original's method options are declared by their families, and nothing moves for a user:
the command line offers them with the same names, defaults, help and order, the fingerprint
of a step and the step-0 digests that name sweep runs keep their values, and the core
(engine/, train.py, dataset/, utils/) names no method option.

The pinned values in tests/data/merge_base_options.json were produced by this project's own
code at commit 9377818, before the declarations moved (see its "source" entry)."""
import argparse
import json
import re
from pathlib import Path

import argparser
import methods
from engine.plan import run_fingerprint
from tools.sweeps import plan
from utils.checkpoint import FINGERPRINT_KEYS, fingerprint_changes

ROOT = Path(__file__).resolve().parent.parent
PINNED = json.loads((ROOT / "tests" / "data" / "merge_base_options.json").read_text())
CORE = [ROOT / "train.py"] + [p for d in ("engine", "dataset", "utils")
                              for p in sorted((ROOT / d).rglob("*.py"))]


def _describe(action):
    return {"option_strings": action.option_strings, "dest": action.dest,
            "default": action.default, "help": action.help, "choices": action.choices,
            "type": getattr(action.type, "__name__", None), "action": type(action).__name__}


def _method_option_names():
    """Every option a method family declares: ``OPTIONS`` and its own ``add_arguments``."""
    parser = argparse.ArgumentParser(add_help=False)
    methods.add_arguments(parser)
    return set(methods.options()) | {a.dest for a in parser._actions}


def test_the_original_method_options_are_offered_as_before():
    names = [o["dest"] for o in PINNED["original_method_options"]]
    actions = {a.dest: a for a in argparser.get_argparser()._actions}
    assert [_describe(actions[n]) for n in names] == PINNED["original_method_options"]
    dests = [a.dest for a in argparser.get_argparser()._actions]
    # in the original's order, right after --explicit_overrides_preset in the method group
    start = dests.index("explicit_overrides_preset") + 1
    assert dests[start:start + len(names)] == names


def test_each_original_option_is_declared_by_one_family_and_not_by_the_core():
    owners = {}
    for family in methods.families():
        for name in getattr(family, "OPTIONS", {}):
            owners.setdefault(name, []).append(family.__name__)
    assert set(argparser.ORIGINAL_METHOD_OPTIONS) <= set(owners)
    assert all(len(v) == 1 for v in owners.values())
    assert not set(owners) & set(FINGERPRINT_KEYS)
    assert not set(owners) & set(argparser.OPTION_RANGES)
    assert set(owners) <= set(methods.fingerprint_keys())


def test_the_fingerprint_of_a_step_keeps_its_value():
    pinned = PINNED["fingerprint"]
    now = run_fingerprint(argparser.parse_options(pinned["argv"]), pinned["world_size"])
    # every recorded key keeps its value; a family registered later (RCIL) adds keys, which
    # records written before it do not have and which are therefore not compared
    assert {k: now[k] for k in pinned["value"]} == pinned["value"]
    assert fingerprint_changes(pinned["value"], now) == []


def test_the_step0_digests_that_name_sweep_runs_keep_their_values():
    for case in PINNED["step0_digests"]:
        key = plan.step0_key(argparser.parse_options(case["argv"]))
        assert plan.key_digest(key) == case["digest"], case["argv"]


def test_the_core_names_no_method_option():
    names = _method_option_names()
    assert {"loss_kd", "reg_alpha", "pod", "pseudo"} <= names
    words = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    # read from the options (as an attribute or by getattr) or named as a command-line flag
    # (a state entry or a parameter of the same word, such as EWC's "alpha", is not one)
    pattern = re.compile(rf"(opts\.|--|getattr\([^)]*[\"'])({words})\b")
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for path in CORE for i, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert found == []
