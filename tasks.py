"""Incremental task splits of Pascal VOC 2012 and ADE20K.

A task maps each step to the ORIGINAL dataset label ids it introduces. Label 0
(VOC background, ADE "void / other objects") belongs to step 0 of every task and
is the model's channel 0. The model's channel k stands for label ``order[k]``
with ``order = [0] + labels of steps 0..t (without 0), in step order``.

Public helpers keep the original names and signatures:
``get_task_labels(dataset, name, step)``, ``get_per_task_classes(dataset, name, step)``
and ``get_task_list()``.
"""
from utils.errors import UserError


def span(first, last):
    """Labels first..last inclusive."""
    return list(range(first, last + 1))


def _one_per_step(base_last, last, width):
    """Step 0 = 0..base_last, then consecutive chunks of ``width`` labels up to ``last``."""
    steps = {0: span(0, base_last)}
    for k, first in enumerate(range(base_last + 1, last + 1, width), start=1):
        steps[k] = span(first, min(first + width - 1, last))
    return steps


# --- splits of the original code -------------------------------------------------------

VOC_TASKS = {
    "offline": {
        0: span(0, 20),
    },
    "19-1": {
        0: span(0, 19),
        1: span(20, 20),
    },
    "19-1b": {
        0: [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
        1: span(5, 5),
    },
    "15-5": {
        0: span(0, 15),
        1: span(16, 20),
    },
    "15-5s": {
        0: span(0, 15),
        1: span(16, 16),
        2: span(17, 17),
        3: span(18, 18),
        4: span(19, 19),
        5: span(20, 20),
    },
    "10-5-5": {
        0: span(0, 10),
        1: span(11, 15),
        2: span(16, 20),
    },
}

ADE_TASKS = {
    "offline": {
        0: span(0, 150),
    },
    "100-50": {
        0: span(0, 100),
        1: span(101, 150),
    },
    "100-50b": {
        0: [
            0, 1, 3, 5, 6, 8, 9, 10, 12, 13, 14, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31,
            32, 33, 34, 36, 38, 39, 40, 42, 43, 44, 45, 46, 47, 48, 49, 53, 54, 55, 56, 57, 58,
            60, 61, 62, 63, 69, 70, 71, 74, 75, 76, 77, 80, 81, 82, 84, 86, 87, 90, 91, 93, 95,
            96, 99, 100, 101, 103, 104, 105, 106, 107, 109, 113, 116, 117, 119, 120, 121, 123,
            125, 126, 128, 129, 130, 131, 132, 133, 134, 135, 136, 140, 142, 143, 144, 147, 148,
            149, 150,
        ],
        1: [
            2, 4, 7, 11, 15, 16, 17, 20, 30, 35, 37, 41, 50, 51, 52, 59, 64, 65, 66, 67, 68, 72,
            73, 78, 79, 83, 85, 88, 89, 92, 94, 97, 98, 102, 108, 110, 111, 112, 114, 115, 118,
            122, 124, 127, 137, 138, 139, 141, 145, 146,
        ],
    },
    "100-50c": {
        0: [
            0, 1, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 23, 24, 25, 26, 27, 28, 29,
            30, 31, 32, 33, 34, 35, 36, 37, 40, 41, 43, 44, 45, 46, 48, 50, 52, 54, 56, 57, 61,
            63, 65, 66, 67, 68, 69, 70, 71, 74, 76, 77, 78, 79, 81, 82, 83, 84, 85, 86, 87, 90,
            94, 95, 96, 97, 98, 99, 102, 105, 106, 109, 110, 111, 112, 114, 115, 118, 119, 120,
            121, 123, 124, 126, 128, 129, 132, 133, 134, 135, 136, 138, 139, 142, 143, 144, 146,
            147, 149,
        ],
        1: [
            2, 3, 4, 7, 15, 18, 21, 22, 38, 39, 42, 47, 49, 51, 53, 55, 58, 59, 60, 62, 64, 72,
            73, 75, 80, 88, 89, 91, 92, 93, 100, 101, 103, 104, 107, 108, 113, 116, 117, 122,
            125, 127, 130, 131, 137, 140, 141, 145, 148, 150,
        ],
    },
    "100-10": {
        0: span(0, 100),
        1: span(101, 110),
        2: span(111, 120),
        3: span(121, 130),
        4: span(131, 140),
        5: span(141, 150),
    },
    "100-10b": {
        0: [
            0, 1, 3, 5, 6, 8, 9, 10, 12, 13, 14, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31,
            32, 33, 34, 36, 38, 39, 40, 42, 43, 44, 45, 46, 47, 48, 49, 53, 54, 55, 56, 57, 58,
            60, 61, 62, 63, 69, 70, 71, 74, 75, 76, 77, 80, 81, 82, 84, 86, 87, 90, 91, 93, 95,
            96, 99, 100, 101, 103, 104, 105, 106, 107, 109, 113, 116, 117, 119, 120, 121, 123,
            125, 126, 128, 129, 130, 131, 132, 133, 134, 135, 136, 140, 142, 143, 144, 147, 148,
            149, 150,
        ],
        1: [11, 16, 50, 64, 66, 73, 89, 92, 145, 146],
        2: [30, 37, 51, 52, 72, 85, 98, 114, 115, 138],
        3: [2, 35, 65, 97, 110, 111, 112, 118, 124, 141],
        4: [4, 7, 15, 41, 67, 78, 79, 88, 108, 139],
        5: [17, 20, 59, 68, 83, 94, 102, 122, 127, 137],
    },
    "100-10c": {
        0: [
            0, 1, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 23, 24, 25, 26, 27, 28, 29,
            30, 31, 32, 33, 34, 35, 36, 37, 40, 41, 43, 44, 45, 46, 48, 50, 52, 54, 56, 57, 61,
            63, 65, 66, 67, 68, 69, 70, 71, 74, 76, 77, 78, 79, 81, 82, 83, 84, 85, 86, 87, 90,
            94, 95, 96, 97, 98, 99, 102, 105, 106, 109, 110, 111, 112, 114, 115, 118, 119, 120,
            121, 123, 124, 126, 128, 129, 132, 133, 134, 135, 136, 138, 139, 142, 143, 144, 146,
            147, 149,
        ],
        1: [3, 4, 7, 18, 39, 64, 73, 101, 113, 137],
        2: [47, 51, 55, 60, 62, 80, 116, 127, 140, 148],
        3: [22, 42, 49, 58, 59, 89, 91, 92, 108, 125],
        4: [2, 38, 53, 100, 104, 117, 130, 131, 141, 145],
        5: [15, 21, 72, 75, 88, 93, 103, 107, 122, 150],
    },
    "50": {
        0: span(0, 50),
        1: span(51, 100),
        2: span(101, 150),
    },
    "50b": {
        0: [
            0, 1, 9, 14, 18, 22, 24, 25, 27, 28, 29, 32, 38, 42, 45, 46, 47, 48, 49, 54, 56, 58,
            61, 62, 63, 69, 74, 75, 76, 77, 81, 82, 84, 90, 93, 96, 100, 103, 104, 109, 117,
            119, 121, 123, 128, 129, 130, 134, 135, 136, 144,
        ],
        1: [
            3, 5, 6, 8, 10, 12, 13, 19, 21, 23, 26, 31, 33, 34, 36, 39, 40, 43, 44, 53, 55, 57,
            60, 70, 71, 80, 86, 87, 91, 95, 99, 101, 105, 106, 107, 113, 116, 120, 125, 126,
            131, 132, 133, 140, 142, 143, 147, 148, 149, 150,
        ],
        2: [
            2, 4, 7, 11, 15, 16, 17, 20, 30, 35, 37, 41, 50, 51, 52, 59, 64, 65, 66, 67, 68, 72,
            73, 78, 79, 83, 85, 88, 89, 92, 94, 97, 98, 102, 108, 110, 111, 112, 114, 115, 118,
            122, 124, 127, 137, 138, 139, 141, 145, 146,
        ],
    },
    "50c": {
        0: [
            0, 5, 10, 11, 12, 13, 16, 17, 19, 20, 23, 27, 28, 30, 31, 32, 33, 37, 43, 46, 52,
            56, 57, 65, 66, 69, 70, 74, 76, 77, 79, 82, 83, 86, 87, 105, 109, 110, 111, 119,
            128, 129, 132, 133, 134, 138, 142, 143, 144, 146, 147,
        ],
        1: [
            1, 6, 8, 9, 14, 24, 25, 26, 29, 34, 35, 36, 40, 41, 44, 45, 48, 50, 54, 61, 63, 67,
            68, 71, 78, 81, 84, 85, 90, 94, 95, 96, 97, 98, 99, 102, 106, 112, 114, 115, 118,
            120, 121, 123, 124, 126, 135, 136, 139, 149,
        ],
        2: [
            2, 3, 4, 7, 15, 18, 21, 22, 38, 39, 42, 47, 49, 51, 53, 55, 58, 59, 60, 62, 64, 72,
            73, 75, 80, 88, 89, 91, 92, 93, 100, 101, 103, 104, 107, 108, 113, 116, 117, 122,
            125, 127, 130, 131, 137, 140, 141, 145, 148, 150,
        ],
    },
}

ADE_CLASS_NAMES = [
    "void", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door", "table",
    "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa", "shelf",
    "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag"
]
VOC_CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor"
]

# --- splits that later work made standard ------------------------------------------------
VOC_TASKS["10-1"] = _one_per_step(10, 20, 1)     # 11 steps
VOC_TASKS["5-3"] = _one_per_step(5, 20, 3)       # 0..5, 6-8, 9-11, 12-14, 15-17, 18-20
ADE_TASKS["100-5"] = _one_per_step(100, 150, 5)  # 11 steps

TASKS = {"voc": VOC_TASKS, "ade": ADE_TASKS}

# Names used in papers for the same splits: alias -> name in this module.
ALIASES = {
    "voc": {"15-1": "15-5s"},
    "ade": {"50-50": "50"},
}

CLASS_NAMES = {"voc": VOC_CLASS_NAMES, "ade": ADE_CLASS_NAMES}


class TaskError(UserError, ValueError):
    """A dataset, task or step that does not exist; the message lists the valid ones."""


def _check_dataset(dataset):
    if dataset not in TASKS:
        raise TaskError(f"unknown dataset '{dataset}'; valid datasets: {', '.join(TASKS)}")


def canonical_task(dataset, name):
    """Resolve a paper alias (``15-1``, ``50-50``) to this module's task name."""
    _check_dataset(dataset)
    name = ALIASES[dataset].get(name, name)
    if name not in TASKS[dataset]:
        valid = list(TASKS[dataset]) + list(ALIASES[dataset])
        other = [d for d in TASKS if d != dataset and name in TASKS[d]]
        hint = f" ('{name}' is a task of --dataset {other[0]})" if other else ""
        raise TaskError(f"unknown task '{name}' for dataset '{dataset}'{hint}; "
                        f"valid tasks: {', '.join(valid)}")
    return name


def class_permutation(dataset, order):
    """Label ``l`` -> the label it stands for under class order ``order``: 0 is the task's
    own order; k > 0 a permutation of the VOC classes 1..20 drawn with
    ``numpy.random.RandomState(k)`` (background stays 0). ADE has its ``b``/``c`` tasks."""
    if order == 0:
        return None
    if dataset != "voc":
        raise TaskError(f"--class_order {order}: class orders are for VOC; ADE has its own "
                        "orders as tasks (e.g. 100-50b, 100-50c)")
    if not isinstance(order, int) or order < 0:
        raise TaskError(f"--class_order must be 0 (the task's order) or a positive seed, "
                        f"got {order!r}")
    import numpy as np
    drawn = np.random.RandomState(order).permutation(np.arange(1, 21))
    return {0: 0, **{label: int(drawn[label - 1]) for label in range(1, 21)}}


def get_task_dict(dataset, name, step=None, order=0):
    """Steps -> labels of a task; with ``step`` only the steps 0..step (checked); under
    class order ``order`` (``class_permutation``) the labels of every step are permuted."""
    name = canonical_task(dataset, name)
    task = TASKS[dataset][name]
    permutation = class_permutation(dataset, order)
    if permutation is not None:
        task = {s: [permutation[label] for label in labels] for s, labels in task.items()}
    if step is None:
        return dict(task)
    if not isinstance(step, int) or step not in task:
        raise TaskError(f"step {step} does not exist in task '{name}' of '{dataset}'; "
                        f"valid steps: 0..{len(task) - 1}")
    return {s: task[s] for s in range(step + 1)}


def num_steps(dataset, name):
    return len(TASKS[dataset][canonical_task(dataset, name)])


def task_folder_name(dataset, name, order=0):
    """The task's name in index-list folders: ``<task>``, ``<task>-o<order>`` for a class
    order."""
    name = canonical_task(dataset, name)
    return name if order == 0 else f"{name}-o{order}"


def get_task_labels(dataset, name, step, order=0):
    """Labels introduced at ``step``, labels of all earlier steps, and the index folder.

    The folder is ``data/<dataset>/<task>`` relative to the working directory, as in the
    original (callers append ``-ov`` for the overlapped setting).
    """
    task = get_task_dict(dataset, name, step, order)
    labels = list(task[step])
    labels_old = [label for s in range(step) for label in task[s]]
    return labels, labels_old, f"data/{dataset}/{task_folder_name(dataset, name, order)}"


def get_per_task_classes(dataset, name, step):
    """Size of each per-step classifier up to ``step`` (label 0 counted in step 0; the same
    under every class order)."""
    task = get_task_dict(dataset, name, step)
    return [len(task[s]) for s in range(step + 1)]


def get_order(dataset, name, step, order=0):
    """Original label of every model channel at ``step``: ``[0] + seen labels without 0``."""
    task = get_task_dict(dataset, name, step, order)
    return [0] + [label for s in range(step + 1) for label in task[s] if label != 0]


def get_task_list():
    """Every task name accepted on the command line (both datasets, aliases included)."""
    names = []
    for dataset in TASKS:
        for name in list(TASKS[dataset]) + list(ALIASES[dataset]):
            if name not in names:
                names.append(name)
    return names
