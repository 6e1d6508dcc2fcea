"""Incremental task splits of Pascal VOC 2012 and ADE20K.

A task maps each step to the ORIGINAL dataset label ids it introduces. Label 0
(VOC background, ADE "void / other objects") belongs to step 0 of every task and
is the model's channel 0. The model's channel k stands for label ``order[k]``
with ``order = [0] + labels of steps 0..t (without 0), in step order``.

Public helpers keep the original names and signatures:
``get_task_labels(dataset, name, step)``, ``get_per_task_classes(dataset, name, step)``
and ``get_task_list()``.

Every table (the built-in ones below and the ones a user adds with ``--task_file``) goes
through ``check_task``: steps 0, 1, ... in order, label 0 in step 0 only, every label of
the dataset in exactly one step, no label the dataset does not have.
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

# --- splits that later work made standard (docs/tasks.md says where each comes from) ------
VOC_TASKS["10-1"] = _one_per_step(10, 20, 1)     # 11 steps
VOC_TASKS["5-3"] = _one_per_step(5, 20, 3)       # 0..5, 6-8, 9-11, 12-14, 15-17, 18-20
ADE_TASKS["100-5"] = _one_per_step(100, 150, 5)  # 11 steps
# the hard VOC splits (SSUL's task table: 5-5, 5-1, 2-2, 2-1; DKD's: 10-10)
VOC_TASKS["5-5"] = _one_per_step(5, 20, 5)       # 0..5, 6-10, 11-15, 16-20
VOC_TASKS["5-1"] = _one_per_step(5, 20, 1)       # 16 steps
VOC_TASKS["2-2"] = _one_per_step(2, 20, 2)       # 0..2, then nine pairs 3-4 .. 19-20
VOC_TASKS["2-1"] = _one_per_step(2, 20, 1)       # 19 steps
VOC_TASKS["10-10"] = _one_per_step(10, 20, 10)   # 0..10, 11-20
# the same "N-M" convention, used in papers without a table in either code base
VOC_TASKS["4-2"] = _one_per_step(4, 20, 2)       # 0..4, then eight pairs 5-6 .. 19-20
VOC_TASKS["4-4"] = _one_per_step(4, 20, 4)       # 0..4, 5-8, 9-12, 13-16, 17-20
# SSUL's first shuffled 15-1 order (its 15-1_b): 15 classes in this order, then one a step
VOC_TASKS["15-1_b"] = {
    0: [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11],
    1: [17], 2: [3], 3: [6], 4: [18], 5: [10],
}

# Names used in papers for the same splits: alias -> name in this module.
ALIASES = {
    "voc": {"15-1": "15-5s", "10-5": "10-5-5"},
    "ade": {"50-50": "50"},
}

CLASS_NAMES = {"voc": VOC_CLASS_NAMES, "ade": ADE_CLASS_NAMES}


class TaskError(UserError, ValueError):
    """A dataset, task or step that does not exist; the message lists the valid ones."""


class TaskTableError(TaskError):
    """A task table that breaks a rule of ``check_task``; the message names the task and the
    rule."""


def _label_text(labels):
    return ", ".join(str(label) for label in labels)


def check_task(dataset, name, steps, num_labels, where="tasks.py"):
    """The task table ``steps`` (step -> labels; step keys may be strings "0", "1", ...)
    checked and returned as ``{int step: [int labels]}``; ``num_labels`` is the number of
    labels of the dataset (labels are 0..num_labels-1). Raises ``TaskTableError`` with one
    line for the first rule broken."""
    head = f"task '{name}' of {dataset} ({where})"
    if not isinstance(steps, dict) or not steps:
        raise TaskTableError(f"{head}: expected a table of steps, e.g. \"0\": [0, 1, 2], "
                             f"\"1\": [3]; got {type(steps).__name__}")
    table = {}
    for key, labels in steps.items():
        try:
            step = int(key)
        except (TypeError, ValueError):
            raise TaskTableError(f"{head}: step '{key}' is not a number; steps are 0, 1, 2, "
                                 "...") from None
        if not isinstance(labels, list) or not labels:
            raise TaskTableError(f"{head}: step {step} must be a non-empty list of labels")
        bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, int)]
        if bad:
            raise TaskTableError(f"{head}: step {step} has {bad[0]!r}, which is not an integer "
                                 "label")
        table[step] = list(labels)
    if sorted(table) != list(range(len(table))):
        raise TaskTableError(f"{head}: steps must be 0..{len(table) - 1} without gaps; got "
                             f"{_label_text(sorted(table))}")
    table = {step: table[step] for step in range(len(table))}
    unknown = [(s, label) for s, labels in table.items() for label in labels
               if not 0 <= label < num_labels]
    if unknown:
        s, label = unknown[0]
        raise TaskTableError(f"{head}: label {label} in step {s} is not a label of {dataset} "
                             f"(0..{num_labels - 1})")
    if 0 not in table[0]:
        raise TaskTableError(f"{head}: label 0 (background) must be in step 0")
    later = [s for s in range(1, len(table)) if 0 in table[s]]
    if later:
        raise TaskTableError(f"{head}: label 0 (background) is in step {later[0]}; it belongs "
                             "to step 0 only")
    if table[0] == [0]:
        raise TaskTableError(f"{head}: step 0 has only the background; give it at least one "
                             "class")
    where_seen = {}
    for s, labels in table.items():
        for label in labels:
            if label in where_seen:
                first = where_seen[label]
                at = f"twice in step {s}" if first == s else f"in steps {first} and {s}"
                raise TaskTableError(f"{head}: label {label} is {at}; every label belongs to "
                                     "exactly one step")
            where_seen[label] = s
    missing = [label for label in range(num_labels) if label not in where_seen]
    if missing:
        raise TaskTableError(f"{head}: label{'s' if len(missing) > 1 else ''} "
                             f"{_label_text(missing)} in no step; every label of {dataset} "
                             f"(0..{num_labels - 1}) belongs to exactly one step")
    return table


NUM_LABELS = {"voc": len(VOC_CLASS_NAMES), "ade": len(ADE_CLASS_NAMES)}
TASKS = {dataset: {name: check_task(dataset, name, steps, NUM_LABELS[dataset])
                   for name, steps in table.items()}
         for dataset, table in (("voc", VOC_TASKS), ("ade", ADE_TASKS))}
BUILT_IN = {dataset: set(table) for dataset, table in TASKS.items()}


def add_dataset(dataset, class_names):
    """Make a dataset whose labels are 0..len(class_names)-1 known, with its task
    ``offline`` (every label in step 0, joint training); other tasks come from a task
    file. Called again with other names (another data root) it starts afresh."""
    if CLASS_NAMES.get(dataset) != list(class_names):
        TASKS[dataset] = {}
    TASKS.setdefault(dataset, {})
    ALIASES.setdefault(dataset, {})
    CLASS_NAMES[dataset] = list(class_names)
    NUM_LABELS[dataset] = len(class_names)
    TASKS[dataset]["offline"] = check_task(dataset, "offline", {0: span(0, len(class_names) - 1)},
                                           len(class_names))
    BUILT_IN[dataset] = {"offline"}


def add_task(dataset, name, steps, where):
    """Check a user's task table and make it usable under ``name``; a name of a built-in
    task or alias is refused (a file cannot change the splits papers report)."""
    _check_dataset(dataset)
    if name in BUILT_IN.get(dataset, ()) or name in ALIASES[dataset]:
        raise TaskTableError(f"task '{name}' of {dataset} ({where}) has the name of a built-in "
                             "task; give it another name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise TaskTableError(f"task name {name!r} ({where}) must be a non-empty name without "
                             "'/' that does not start with '.'")
    TASKS[dataset][name] = check_task(dataset, name, steps, NUM_LABELS[dataset], where)


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
