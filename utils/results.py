"""Per-step result files: ``<results_dir>/step-<N>.json`` and ``step-<N>.csv``.

The JSON keys are fixed so that scripts (and ``tools/results_table.py``) can rely on them;
every figure is a fraction in 0..1 as the metrics object gives it, and a class absent from
the ground truth has ``null``. Class ids are the model's channel indices (channel k stands for
original label ``class_labels[k]``). The old / new / all summaries come from
``metrics.summaries``, whose background convention is copied into the file.

The CSV has one row per class: class index, original label id, class name, the step that
introduced the class, IoU and accuracy (empty cell for an absent class)."""
import csv
import io
import json
import math
import os
from collections.abc import Mapping

from metrics.summaries import summarize_iou
from utils.checkpoint import atomic_write_text
from utils.figures import new_figure

from .errors import UserError

__all__ = ["RESULTS_FORMAT", "REQUIRED_KEYS", "ResultsError", "CSV_COLUMNS",
           "result_paths", "build_step_results", "write_step_results", "write_results",
           "load_results", "class_iou_figure", "new_figure"]

RESULTS_FORMAT = 1
REQUIRED_KEYS = ("task", "dataset", "step", "name", "method", "seed", "opts", "labels_per_step",
                 "class_iou", "class_acc", "overall_acc", "mean_acc", "mean_iou", "miou_old",
                 "miou_new", "miou_all", "miou_old_no_bg", "miou_per_step",
                 "background_convention")
CSV_COLUMNS = ("class_index", "label_id", "class_name", "step_introduced", "iou", "accuracy")


class ResultsError(UserError, ValueError):
    """A results file that is missing or damaged, or metrics that do not fit the task."""


def result_paths(results_dir, step):
    """(JSON path, CSV path) of one step."""
    base = os.path.join(os.fspath(results_dir), f"step-{int(step)}")
    return base + ".json", base + ".csv"


def _number_or_null(value):
    """A JSON-safe float, or None for an absent class ('X'), None, NaN or infinity."""
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(value):
    """Options and metadata as plain JSON values (NumPy scalars/arrays, tuples, sets, paths
    and other objects become numbers, lists or strings; NaN and infinity become null)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_json_safe(v) for v in value), key=repr)
    if hasattr(value, "tolist"):          # NumPy scalars and arrays, torch tensors
        return _json_safe(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _steps_as_list(labels_per_step, step):
    """Labels of steps 0..step as a list of lists; accepts a list or {step: labels}
    (``tasks.get_task_dict(dataset, task, step)``)."""
    if isinstance(labels_per_step, Mapping):
        by_step = {int(s): labels for s, labels in labels_per_step.items()}
        missing = [s for s in range(step + 1) if s not in by_step]
        if missing:
            raise ResultsError(f"labels_per_step lacks step(s) {missing}; pass the labels of "
                               f"every step 0..{step} (tasks.get_task_dict(dataset, task, step))")
        labels_per_step = [by_step[s] for s in range(step + 1)]
    steps = [[int(label) for label in labels] for labels in labels_per_step]
    if len(steps) != step + 1:
        raise ResultsError(f"labels_per_step has {len(steps)} steps for step {step}; pass the "
                           f"labels of every step 0..{step}")
    if not steps[0] or 0 not in steps[0]:
        raise ResultsError("labels_per_step[0] must contain label 0 (the background channel)")
    return steps


def _per_class(values, n_classes, what):
    """{class index: value} from the metrics' dict (int or digit-string keys)."""
    if not isinstance(values, Mapping):
        raise ResultsError(f"results['{what}'] must be a dict class -> value, "
                           f"got {type(values).__name__}")
    out = {int(c): v for c, v in values.items()}
    if sorted(out) != list(range(n_classes)):
        raise ResultsError(f"results['{what}'] covers classes {sorted(out)[:3]}... "
                           f"({len(out)} classes) but the task has {n_classes} channels up to "
                           "this step; the metrics must be sized to the classes seen so far")
    return out


def build_step_results(*, task, dataset, step, name, method, seed, opts, labels_per_step,
                       results, class_names=None, cost=None):
    """The JSON document of one step (a dict of plain values) and the CSV rows.

    ``results``: the dict of ``StreamSegMetrics.get_results`` ('Class IoU', 'Class Acc',
    'Overall Acc', 'Mean Acc', 'Mean IoU', ...). ``labels_per_step``: original labels of
    every step 0..step. ``class_names``: names indexed by original label (default
    ``tasks.CLASS_NAMES[dataset]``). ``cost``: the step's ``utils.cost.StepCost`` record
    (None when the step was not trained by this run)."""
    step = int(step)
    steps = _steps_as_list(labels_per_step, step)
    classes_per_step = [len(labels) for labels in steps]
    # channel k -> (original label, step that introduced it); channel 0 is label 0
    channels = [(0, 0)] + [(label, s) for s, labels in enumerate(steps)
                           for label in labels if label != 0]
    n_classes = len(channels)
    if class_names is None:
        import tasks
        class_names = tasks.CLASS_NAMES.get(dataset)
    if class_names is None:
        names = [str(label) for label, _ in channels]
    else:
        names = [str(class_names[label]).strip() if label < len(class_names) else str(label)
                 for label, _ in channels]

    iou = _per_class(results["Class IoU"], n_classes, "Class IoU")
    acc = _per_class(results["Class Acc"], n_classes, "Class Acc")
    summary = summarize_iou(iou, classes_per_step)

    if isinstance(opts, Mapping):
        opts_dict = dict(opts)
    elif hasattr(opts, "__dict__"):
        opts_dict = {k: v for k, v in vars(opts).items() if not k.startswith("_")}
    else:
        raise ResultsError(f"opts must be a dict or an options namespace, got "
                           f"{type(opts).__name__}")

    doc = {
        "results_format": RESULTS_FORMAT,
        "task": str(task),
        "dataset": str(dataset),
        "step": step,
        "name": str(name),
        "method": None if method is None else str(method),
        "seed": None if seed is None else int(seed),
        "opts": _json_safe(opts_dict),
        "labels_per_step": steps,
        "class_order": int(opts_dict.get("class_order") or 0),
        "classes_per_step": classes_per_step,
        "class_labels": {str(k): label for k, (label, _) in enumerate(channels)},
        "class_names": {str(k): names[k] for k in range(n_classes)},
        "class_iou": {str(k): _number_or_null(iou[k]) for k in range(n_classes)},
        "class_acc": {str(k): _number_or_null(acc[k]) for k in range(n_classes)},
        "overall_acc": _number_or_null(results.get("Overall Acc")),
        "mean_acc": _number_or_null(results.get("Mean Acc")),
        "freqw_acc": _number_or_null(results.get("FreqW Acc")),
        "mean_iou": _number_or_null(results.get("Mean IoU")),
        "miou_old": _number_or_null(summary["miou_old"]),
        "miou_new": _number_or_null(summary["miou_new"]),
        "miou_all": _number_or_null(summary["miou_all"]),
        "miou_old_no_bg": _number_or_null(summary["miou_old_no_bg"]),
        "miou_per_step": [_number_or_null(v) for v in summary["miou_per_step"]],
        "miou_per_step_no_bg": [_number_or_null(v) for v in summary["miou_per_step_no_bg"]],
        "background_convention": summary["background_convention"],
        "n_images": None if results.get("Total samples") is None
        else int(results["Total samples"]),
        "cost": None if cost is None else _json_safe(dict(cost)),
    }
    rows = [(k, label, names[k], introduced, doc["class_iou"][str(k)],
             doc["class_acc"][str(k)]) for k, (label, introduced) in enumerate(channels)]
    return doc, rows


def _csv_text(rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v)
                         for v in row])
    return buf.getvalue()


def write_step_results(results_dir, *, task, dataset, step, name, method, seed, opts,
                       labels_per_step, results, class_names=None, cost=None):
    """Write ``step-<N>.json`` and ``step-<N>.csv`` under ``results_dir`` (created if needed),
    each atomically (temporary file in the same folder, then rename): a failed write leaves
    the previous files as they were. Returns (json_path, csv_path).

    Keywords as in :func:`build_step_results`; ``opts`` is a dict or the options namespace
    (all options are stored). Raises ``ResultsError`` when the metrics do not fit the task,
    ``utils.checkpoint.CheckpointError`` when the folder cannot be written."""
    doc, rows = build_step_results(task=task, dataset=dataset, step=step, name=name,
                                   method=method, seed=seed, opts=opts,
                                   labels_per_step=labels_per_step, results=results,
                                   class_names=class_names, cost=cost)
    # allow_nan=False: a NaN slipping through would make a file other JSON readers reject
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    json_path, csv_path = result_paths(results_dir, doc["step"])
    # the CSV first: a JSON file on disk means its CSV is complete too
    atomic_write_text(csv_path, _csv_text(rows))
    atomic_write_text(json_path, text)
    return json_path, csv_path


def write_results(logdir, opts, results, cost=None):
    """The result files of a run's step: ``<logdir>/results/step-<N>.json`` and ``.csv``
    from the options of the run and the test figures. Returns (json_path, csv_path).
    Without ``cost`` (a --test run) the cost of the file it replaces is kept."""
    import tasks
    options = {k: v for k, v in vars(opts).items() if not k.startswith("_")}
    results_dir = os.path.join(logdir, "results")
    if cost is None:
        cost = _earlier_cost(result_paths(results_dir, opts.step)[0])
    return write_step_results(
        results_dir, cost=cost, task=opts.task, dataset=opts.dataset, step=opts.step,
        name=opts.name, method=opts.method, seed=opts.random_seed, opts=options,
        labels_per_step=tasks.get_task_dict(opts.dataset, opts.task, opts.step,
                                            opts.class_order),
        results=results)


def _earlier_cost(json_path):
    """The cost record of an existing result file (None when there is none or it is
    unreadable: it is about to be replaced)."""
    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc.get("cost") if isinstance(doc, dict) else None


def load_results(path):
    """Read one ``step-<N>.json``; ``ResultsError`` naming the file when it is missing,
    damaged or lacks the fixed keys."""
    path = os.fspath(path)
    rerun = ("delete it and run that step's test phase again (run.py ... --step N --test "
             "with the same --name) to rewrite it")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"results file {path} is damaged (invalid JSON: {e.msg} at line "
                           f"{e.lineno} column {e.colno}); {rerun}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"results file {path} is damaged (not UTF-8 text); {rerun}") from None
    except OSError as e:
        raise ResultsError(f"cannot read results file {path}: {e.strerror or e}") from None
    if not isinstance(doc, dict):
        raise ResultsError(f"results file {path} is damaged (a JSON {type(doc).__name__}, "
                           f"not an object); {rerun}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ResultsError(f"results file {path} lacks the keys {', '.join(missing)}; it was "
                           f"not written by this project's run.py ({rerun})")
    return doc


def class_iou_figure(doc):
    """Per-class IoU bars of one result document (as written by :func:`write_step_results`),
    coloured by the step that introduced each class; absent classes are marked 'n/a'. For
    ``tools/results_table.py --run`` and for TensorBoard (``add_figure``) at test time."""
    from matplotlib.patches import Patch

    n = len(doc["class_iou"])
    names = doc.get("class_names") or {str(k): str(k) for k in range(n)}
    step_of = [s for s, labels in enumerate(doc["labels_per_step"]) for _ in labels]
    step_of += [step_of[-1] if step_of else 0] * (n - len(step_of))
    values = [doc["class_iou"][str(c)] for c in range(n)]

    fig = new_figure((max(6.0, 0.32 * n + 2), 4.5))
    ax = fig.subplots()
    ax.bar(range(n), [100 * (v or 0.0) for v in values],
           color=[f"C{step_of[c] % 10}" for c in range(n)])
    for c, v in enumerate(values):
        if v is None:
            ax.text(c, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n))
    ax.set_xticklabels([names.get(str(c), str(c)) for c in range(n)], rotation=90,
                       fontsize=7 if n > 40 else 9)
    ax.set(ylabel="IoU (%)", ylim=(0, 100))
    miou = doc.get("miou_all")
    ax.set_title(f"{doc['name']} · {doc['dataset'].upper()} {doc['task']} step {doc['step']}: "
                 f"per-class IoU (mIoU all {'–' if miou is None else f'{100 * miou:.1f}'})")
    ax.legend(handles=[Patch(color=f"C{s % 10}", label=f"step {s}")
                       for s in sorted(set(step_of))], loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig
