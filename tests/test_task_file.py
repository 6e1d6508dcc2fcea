"""Task splits from a file (--task_file) and the checker every table goes through.

The hard VOC splits are checked against the task tables of SSUL's code (5-1, 2-1, 2-2, 5-5
and the shuffled order 15-1_b, whose class order SSUL's label vectors confirm) and DKD's
code (10-10, 10-5)."""
import json

import pytest

import task_file
import tasks
from argparser import OptionError, parse_options

FOUR_FOUR = {"0": [0, 1, 2, 3, 4], "1": [5, 6, 7, 8], "2": [9, 10, 11, 12],
             "3": [13, 14, 15, 16], "4": [17, 18, 19, 20]}


@pytest.fixture
def clean_tasks():
    """Tasks a test adds are removed again (the module's tables are process-wide)."""
    before = {dataset: dict(table) for dataset, table in tasks.TASKS.items()}
    yield
    for dataset in list(tasks.TASKS):
        tasks.TASKS[dataset].clear()
        tasks.TASKS[dataset].update(before.get(dataset, {}))


def write(tmp_path, doc, name="splits.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else doc)
    return str(path)


def test_json_file_defines_a_usable_task(tmp_path, clean_tasks):
    path = write(tmp_path, {"_note": "mine", "voc": {"mine-4-4": FOUR_FOUR}})
    assert task_file.load_task_file(path) == [("voc", "mine-4-4")]
    assert tasks.get_per_task_classes("voc", "mine-4-4", 4) == [5, 4, 4, 4, 4]
    labels, old, folder = tasks.get_task_labels("voc", "mine-4-4", 2)
    assert labels == [9, 10, 11, 12] and old == list(range(9)) and folder == "data/voc/mine-4-4"


def test_toml_file_and_the_command_line(tmp_path, clean_tasks):
    path = write(tmp_path, "[ade.half]\n0 = [0, %s]\n1 = [%s]\n" % (
        ", ".join(map(str, range(1, 76))), ", ".join(map(str, range(76, 151)))), "s.toml")
    opts = parse_options(["--dataset", "ade", "--task_file", path, "--task", "half",
                          "--step", "all"])
    assert opts.task == "half" and opts.steps == [0, 1]
    assert tasks.get_order("ade", "half", 1) == list(range(151))


def test_unknown_task_without_the_file_is_an_option_error(clean_tasks):
    with pytest.raises(OptionError, match="unknown task 'mine-4-4'"):
        parse_options(["--task", "mine-4-4"])


# one test per mistake: (file content, the line it must give)
MISTAKES = {
    "duplicate": ({"voc": {"t": {**FOUR_FOUR, "4": [17, 18, 19, 20, 8]}}},
                  "label 8 is in steps 1 and 4; every label belongs to exactly one step"),
    "twice_in_step": ({"voc": {"t": {**FOUR_FOUR, "1": [5, 6, 7, 8, 8]}}},
                      "label 8 is twice in step 1"),
    "missing": ({"voc": {"t": {**FOUR_FOUR, "4": [17, 18]}}},
                "labels 19, 20 in no step; every label of voc (0..20) belongs to exactly"),
    "unknown_label": ({"voc": {"t": {**FOUR_FOUR, "4": [17, 18, 19, 20, 21]}}},
                      "label 21 in step 4 is not a label of voc (0..20)"),
    "negative_label": ({"voc": {"t": {**FOUR_FOUR, "1": [5, 6, 7, 8, -1]}}},
                       "label -1 in step 1 is not a label of voc"),
    "background_missing": ({"voc": {"t": {**FOUR_FOUR, "0": [1, 2, 3, 4],
                                          "4": [0, 17, 18, 19, 20]}}},
                           "label 0 (background) must be in step 0"),
    "background_later": ({"voc": {"t": {**FOUR_FOUR, "1": [0, 5, 6, 7, 8]}}},
                         "label 0 (background) is in step 1; it belongs to step 0 only"),
    "background_only": ({"voc": {"t": {"0": [0], "1": list(range(1, 21))}}},
                        "step 0 has only the background"),
    "step_gap": ({"voc": {"t": {"0": list(range(16)), "2": list(range(16, 21))}}},
                 "steps must be 0..1 without gaps; got 0, 2"),
    "step_name": ({"voc": {"t": {"0": list(range(16)), "one": list(range(16, 21))}}},
                  "step 'one' is not a number"),
    "empty_step": ({"voc": {"t": {**FOUR_FOUR, "5": []}}},
                   "step 5 must be a non-empty list of labels"),
    "not_integer": ({"voc": {"t": {**FOUR_FOUR, "4": [17, 18, 19, "20"]}}},
                    "step 4 has '20', which is not an integer label"),
    "not_a_table": ({"voc": {"t": [[0, 1], [2]]}}, "expected a table of steps"),
    "built_in_name": ({"voc": {"15-5": FOUR_FOUR}}, "has the name of a built-in task"),
    "alias_name": ({"voc": {"15-1": FOUR_FOUR}}, "has the name of a built-in task"),
    "unknown_dataset": ({"cityscapes": {"t": FOUR_FOUR}}, "unknown dataset 'cityscapes'"),
    "no_task": ({"_note": "nothing"}, "defines no task"),
    "top_level_list": ([FOUR_FOUR], "the top level must be a table of datasets"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_gives_its_line(tmp_path, clean_tasks, mistake):
    doc, line = MISTAKES[mistake]
    path = write(tmp_path, doc)
    with pytest.raises(OptionError) as info:
        parse_options(["--task_file", path, "--task", "t"])
    message = str(info.value)
    assert line in message and "\n" not in message
    assert isinstance(info.value, OptionError)
    assert all(name in tasks.TASKS["voc"] for name in ("15-5", "19-1"))


@pytest.mark.parametrize("content,name,line", [
    ("{\"voc\": ", "bad.json", "not valid JSON"),
    ("[voc.t\n0 = [0]", "bad.toml", "not valid TOML"),
    ("voc: {}", "splits.yaml", "use a .json or .toml file"),
])
def test_unreadable_files(tmp_path, clean_tasks, content, name, line):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(tasks.TaskTableError, match=line):
        task_file.load_task_file(str(path))
    with pytest.raises(tasks.TaskTableError, match="cannot read it"):
        task_file.load_task_file(str(tmp_path / "absent.json"))


def test_built_in_tables_go_through_the_checker():
    # the table of a built-in task is the checker's output (int steps, in order)
    for dataset in ("voc", "ade"):
        for name, steps in tasks.TASKS[dataset].items():
            assert steps == tasks.check_task(dataset, name, steps, tasks.NUM_LABELS[dataset])
    with pytest.raises(tasks.TaskTableError, match="label 5 is in steps 0 and 1"):
        tasks.check_task("voc", "x", {0: list(range(21)), 1: [5]}, 21)


@pytest.mark.parametrize("name,sizes", [
    ("5-1", [6] + [1] * 15), ("2-1", [3] + [1] * 18), ("2-2", [3] + [2] * 9),
    ("5-5", [6, 5, 5, 5]), ("4-2", [5] + [2] * 8), ("4-4", [5, 4, 4, 4, 4]),
    ("10-10", [11, 10]), ("10-5", [11, 5, 5]),
])
def test_hard_voc_splits(name, sizes):
    n = len(sizes) - 1
    assert tasks.get_per_task_classes("voc", name, n) == sizes
    assert tasks.get_order("voc", name, n) == list(range(21))


def test_ssul_shuffled_order_15_1_b():
    # SSUL's label vectors: position of each label 0..20 in the 15-1_b order
    position = [0, 12, 14, 17, 11, 9, 18, 4, 6, 2, 20, 15, 1, 13, 7, 5, 8, 16, 19, 10, 3]
    order = tasks.get_order("voc", "15-1_b", 5)
    assert [order.index(label) for label in range(21)] == position
    assert tasks.get_per_task_classes("voc", "15-1_b", 5) == [16, 1, 1, 1, 1, 1]
