"""Task splits: contents against known facts of the original, aliases, new splits, errors."""
import pytest

import tasks


def test_voc_15_5_labels_old_labels_and_folder():
    labels, old, folder = tasks.get_task_labels("voc", "15-5", 1)
    assert labels == [16, 17, 18, 19, 20]
    assert old == list(range(16))
    assert folder == "data/voc/15-5"


@pytest.mark.parametrize("dataset,task,step,counts", [
    ("voc", "15-5", 1, [16, 5]),
    ("voc", "15-5s", 3, [16, 1, 1, 1]),
    ("voc", "19-1", 1, [20, 1]),
    ("voc", "10-5-5", 2, [11, 5, 5]),
    ("voc", "offline", 0, [21]),
    ("ade", "100-50", 1, [101, 50]),
    ("ade", "100-10", 5, [101, 10, 10, 10, 10, 10]),
    ("ade", "50", 2, [51, 50, 50]),
    ("ade", "offline", 0, [151]),
])
def test_classes_per_step(dataset, task, step, counts):
    assert tasks.get_per_task_classes(dataset, task, step) == counts


def test_every_task_covers_each_label_once():
    for dataset, n in (("voc", 21), ("ade", 151)):
        for name, steps in tasks.TASKS[dataset].items():
            seen = [label for s in sorted(steps) for label in steps[s]]
            assert sorted(seen) == list(range(n)), (dataset, name)
            assert steps[0][0] == 0 and 0 not in seen[1:], (dataset, name)


def test_permuted_orders_put_old_classes_first():
    # 19-1b adds "bottle" (5) last: channel 20 is label 5, channels 5..19 are labels 6..20.
    order = tasks.get_order("voc", "19-1b", 1)
    assert order[:5] == [0, 1, 2, 3, 4] and order[5:20] == list(range(6, 21)) and order[20] == 5
    # consecutive splits are the identity map
    assert tasks.get_order("ade", "100-10", 3) == list(range(131))
    b = tasks.get_order("ade", "100-50b", 1)
    assert sorted(b) == list(range(151)) and b[:101] == tasks.TASKS["ade"]["100-50b"][0]


def test_ade_b_order_first_labels():
    assert tasks.TASKS["ade"]["100-50b"][0][:8] == [0, 1, 3, 5, 6, 8, 9, 10]
    assert tasks.TASKS["ade"]["50c"][0][:6] == [0, 5, 10, 11, 12, 13]


def test_aliases_resolve_to_original_names():
    assert tasks.canonical_task("voc", "15-1") == "15-5s"
    assert tasks.canonical_task("ade", "50-50") == "50"
    assert tasks.get_task_labels("voc", "15-1", 2)[2] == "data/voc/15-5s"
    assert tasks.get_per_task_classes("ade", "50-50", 1) == [51, 50]


def test_new_splits():
    voc10 = tasks.TASKS["voc"]["10-1"]
    assert len(voc10) == 11 and voc10[0] == list(range(11))
    assert [voc10[s] for s in range(1, 11)] == [[c] for c in range(11, 21)]
    voc53 = tasks.TASKS["voc"]["5-3"]
    assert voc53 == {0: list(range(6)), 1: [6, 7, 8], 2: [9, 10, 11], 3: [12, 13, 14],
                     4: [15, 16, 17], 5: [18, 19, 20]}
    ade5 = tasks.TASKS["ade"]["100-5"]
    assert len(ade5) == 11 and ade5[10] == [146, 147, 148, 149, 150]
    assert tasks.get_per_task_classes("ade", "100-5", 10) == [101] + [5] * 10


def test_task_list_holds_original_names_and_aliases():
    names = tasks.get_task_list()
    for n in ("offline", "19-1", "19-1b", "15-5", "15-5s", "10-5-5", "100-50", "100-50b",
              "100-50c", "100-10", "100-10b", "100-10c", "50", "50b", "50c", "15-1", "50-50",
              "10-1", "5-3", "100-5"):
        assert n in names
    assert len(names) == len(set(names))


def test_class_names():
    assert tasks.CLASS_NAMES["voc"][15] == "person" and len(tasks.CLASS_NAMES["voc"]) == 21
    assert tasks.CLASS_NAMES["ade"][0] == "void" and tasks.CLASS_NAMES["ade"][8] == "bed "
    assert len(tasks.CLASS_NAMES["ade"]) == 151


@pytest.mark.parametrize("call,expected", [
    (lambda: tasks.get_task_labels("coco", "15-5", 0), "valid datasets: voc, ade"),
    (lambda: tasks.get_task_labels("voc", "100-50", 0), "is a task of --dataset ade"),
    (lambda: tasks.get_task_labels("voc", "15-5", 2), "valid steps: 0..1"),
    (lambda: tasks.get_per_task_classes("ade", "nope", 0), "valid tasks: offline, 100-50"),
])
def test_errors_list_valid_choices(call, expected):
    with pytest.raises(tasks.TaskError, match=expected):
        call()


def test_class_orders_permute_the_voc_classes_and_keep_background_first():
    assert tasks.class_permutation("voc", 0) is None
    perm = tasks.class_permutation("voc", 3)
    assert perm[0] == 0 and sorted(perm[label] for label in range(1, 21)) == list(range(1, 21))
    assert perm == tasks.class_permutation("voc", 3)            # seeded: always the same
    assert perm != tasks.class_permutation("voc", 4)
    labels, old, folder = tasks.get_task_labels("voc", "15-5", 1, order=3)
    assert labels == [perm[label] for label in range(16, 21)]
    assert sorted(old) == sorted(perm[label] for label in range(0, 16))
    assert folder == "data/voc/15-5-o3"
    assert tasks.get_per_task_classes("voc", "15-5s", 5) == [16, 1, 1, 1, 1, 1]
    assert tasks.get_order("voc", "15-5", 1, order=3)[0] == 0


def test_class_orders_are_for_voc_only():
    with pytest.raises(tasks.TaskError, match="ADE has its own orders"):
        tasks.get_task_dict("ade", "100-50", order=1)
    from argparser import OptionError, parse_options
    with pytest.raises(OptionError, match="class orders are for VOC"):
        parse_options(["--dataset", "ade", "--task", "100-50", "--class_order", "2"])
    assert parse_options(["--task", "15-5", "--class_order", "2"]).class_order == 2
