"""The sweep file (TOML; ``docs/sweeps.md`` documents it with a full example).

Reading it checks everything that can be checked without training: the keys of every table,
the method names, the tasks, the seeds and class orders, and that every option is a
``run.py`` option the sweep does not set itself. Each mistake is one ``SweepError`` line
naming the file and the place in it. Relative paths are relative to the folder of the sweep
file, so that ``plan``, ``run``, ``status`` and ``table`` find the same runs from any working
directory.
"""
import difflib
import functools
import os
from dataclasses import dataclass, field

import task_file
import tasks
from utils.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:      # Python 3.10: the same parser as the tomli package
    tomllib = None

TOP_KEYS = ("name", "out", "data_root", "methods", "seeds", "class_orders", "tasks", "options",
            "datasets", "slurm", "task_file")
TASK_KEYS = ("dataset", "task", "overlap", "class_orders", "options")
METHOD_KEYS = ("name", "method", "options")
SLURM_KEYS = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time", "setup",
              "additional")

# run.py options the sweep sets itself, and where the sweep file says them instead
RESERVED = {
    "name": "run names are <method>-<task>[-ov]-s<seed>[-o<order>]",
    "task": "list the tasks in [[tasks]]",
    "dataset": "give dataset = ... in [[tasks]]",
    "overlap": "give overlap = true in [[tasks]]",
    "method": "list the methods in methods = [...]",
    "random_seed": "list the seeds in seeds = [...]",
    "class_order": "list the orders in class_orders = [...]",
    "data_root": "give data_root = ... at the top of the file",
    "task_file": "give task_file = ... at the top of the file",
    "step": "a sweep runs every step of each task",
    "step_ckpt": "the sweep passes the shared step-0 checkpoint itself",
    "ckpt": "runs resume by themselves",
    "resume": "runs resume by themselves",
    "test": "the test phase runs after each step",
    "logdir": "the sweep keeps its runs under out",
    "checkpoint_dir": "the sweep keeps its runs under out",
    "index_dir": "the sweep keeps its runs under out",
    "no_progress": "the sweep shows one progress bar for the whole grid",
    "local_rank": "launchers set it",
}


class SweepError(UserError, ValueError):
    """A sweep file that cannot be read, or a value in it that cannot work."""


@dataclass
class MethodEntry:
    """A row of the table: ``label`` names its runs, ``method`` is the ``--method`` preset,
    ``options`` the run.py options of this entry alone (e.g. the paper's MiB on 15-1 with
    ``loss_kd = 100``)."""
    label: str
    method: str
    options: dict = field(default_factory=dict)


@dataclass
class TaskEntry:
    """A setting (a column group of the table): dataset, task as written in the file (run
    names use it), disjoint or overlapped, its class orders and its own options."""
    dataset: str
    task: str
    overlap: bool
    class_orders: tuple
    options: dict = field(default_factory=dict)

    @property
    def label(self):
        """The setting's part of run names: ``15-1-ov``."""
        return self.task + ("-ov" if self.overlap else "")


@dataclass
class Sweep:
    path: str
    name: str
    out: str             # absolute: logs/, checkpoints/, index/, console/, submitit/, tables/
    data_root: str       # absolute
    methods: list
    tasks: list          # TaskEntry, one per (task, overlap)
    seeds: tuple
    options: dict        # every run
    datasets: dict       # dataset -> options of its runs
    slurm: dict
    task_file: str = None    # absolute: the splits every run reads (--task_file)

    def options_of(self, task, method=None):
        """The options of a run, later ones winning: the file's, its dataset's, its task's,
        its method entry's."""
        merged = dict(self.options)
        merged.update(self.datasets.get(task.dataset, {}))
        merged.update(task.options)
        if method is not None:
            merged.update(method.options)
        return merged


# --- reading ----------------------------------------------------------------------------------

def load_sweep(path):
    """The checked ``Sweep`` of the file at ``path``."""
    where = shown(path)
    doc = read_toml(path, where)
    check_keys(doc, TOP_KEYS, where, "the top level")
    base = os.path.dirname(os.path.abspath(path))
    name = str(doc.get("name") or os.path.splitext(os.path.basename(path))[0])
    if "methods" not in doc or "tasks" not in doc:
        missing = "methods" if "methods" not in doc else "tasks"
        raise SweepError(f"{where}: '{missing}' is missing; a sweep needs methods = [...] and "
                         "at least one [[tasks]] table")
    class_orders = int_list(doc.get("class_orders", [0]), where, "class_orders", minimum=0)
    data_root = resolve(base, str(doc.get("data_root", "data")))
    task_file = load_task_file(doc, base, data_root, where)
    sweep = Sweep(
        path=os.path.abspath(path), name=name,
        out=resolve(base, str(doc.get("out", os.path.join("runs", name)))),
        data_root=data_root,
        methods=parse_methods(doc["methods"], where),
        tasks=parse_tasks(doc["tasks"], class_orders, where),
        seeds=int_list(doc.get("seeds", [42]), where, "seeds", minimum=0),
        options=parse_options(doc.get("options", {}), where, "[options]"),
        datasets=parse_datasets(doc.get("datasets", {}), where),
        slurm=parse_slurm(doc.get("slurm", {}), where), task_file=task_file)
    return sweep


def load_task_file(doc, base, data_root, where):
    """``task_file = "splits.toml"`` (relative to the sweep file): its tasks are checked and
    known from here on (and every run gets ``--task_file``); a ``folder`` dataset's classes
    are read from ``data_root`` first. Returns the absolute path, or None."""
    datasets = {str(t.get("dataset", "voc")) for t in doc.get("tasks") or []
                if isinstance(t, dict)}
    try:
        if "folder" in datasets:
            from dataset.folder import read_class_names
            tasks.add_dataset("folder", read_class_names(data_root))
        if "task_file" not in doc:
            return None
        path = resolve(base, str(doc["task_file"]))
        task_file.load_task_file(path)
    except UserError as e:
        raise SweepError(f"{where}: {e}") from None
    return path


def shown(path):
    """A path as messages show it: relative to the working directory when below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def read_toml(path, where):
    if tomllib is None:
        raise SweepError("reading a sweep file needs Python 3.11 or newer (tomllib); on 3.10 "
                         "install the tomli package")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SweepError(f"sweep file {where} does not exist") from None
    except OSError as e:
        raise SweepError(f"cannot read the sweep file {where}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{where} is not valid TOML: {e}") from None


def resolve(base, path):
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def suggestion(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_keys(table, allowed, where, what):
    if not isinstance(table, dict):
        raise SweepError(f"{where}: {what} must be a table")
    for key in table:
        if key not in allowed:
            raise SweepError(f"{where}: unknown key '{key}' in {what}"
                             f"{suggestion(key, allowed)}; known: {', '.join(allowed)}")


def int_list(value, where, what, minimum):
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                             for v in values):
        raise SweepError(f"{where}: {what} must be a non-empty list of integers >= {minimum}, "
                         f"got {value!r}")
    if len(set(values)) != len(values):
        raise SweepError(f"{where}: {what} lists a value twice: {value!r}")
    return tuple(values)


def parse_methods(value, where):
    """``methods = ["FT", "MiB", {name = "MiB-kd100", method = "MiB", options = {...}}]``."""
    import methods as registry
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where}: methods must be a non-empty list of method names or "
                         "{name, method, options} tables")
    entries = []
    for i, item in enumerate(value):
        at = f"methods[{i}]"
        if isinstance(item, str):
            item = {"method": item}
        check_keys(item, METHOD_KEYS, where, at)
        if "method" not in item:
            raise SweepError(f"{where}: {at} needs method = \"<one of "
                             f"{', '.join(registry.method_names())}>\"")
        found = registry.find_method(item["method"])
        if found is None:
            raise SweepError(f"{where}: {at}: unknown method '{item['method']}'"
                             f"{suggestion(item['method'], registry.method_names())}; known: "
                             f"{', '.join(registry.method_names())}")
        label = str(item.get("name", found.name))
        if not label or any(c in label for c in "/\\ ") or label.startswith("step0-"):
            raise SweepError(f"{where}: {at}: name '{label}' cannot name runs (no spaces or "
                             "slashes, and step0- is the sweep's own prefix)")
        entries.append(MethodEntry(label, found.name,
                                   parse_options(item.get("options", {}), where,
                                                 f"{at}.options")))
    labels = [e.label for e in entries]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise SweepError(f"{where}: method entry {twice[0]} is listed twice; give the variants "
                         "names (name = \"MiB-kd100\")")
    return entries


def parse_tasks(value, class_orders, where):
    """``[[tasks]]`` tables; ``overlap = [false, true]`` gives both settings."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where}: tasks must be one or more [[tasks]] tables")
    entries = []
    for i, item in enumerate(value):
        at = f"tasks[{i}]"
        check_keys(item, TASK_KEYS, where, at)
        dataset = str(item.get("dataset", "voc"))
        if dataset not in tasks.TASKS:
            raise SweepError(f"{where}: {at}: unknown dataset '{dataset}'; known: "
                             f"{', '.join(tasks.TASKS)}")
        if "task" not in item:
            raise SweepError(f"{where}: {at} needs task = \"...\" (e.g. \"15-5\")")
        task = str(item["task"])
        try:
            tasks.canonical_task(dataset, task)
        except tasks.TaskError as e:
            raise SweepError(f"{where}: {at}: {e}") from None
        orders = int_list(item.get("class_orders", list(class_orders)), where,
                          f"{at}.class_orders", minimum=0)
        for order in orders:
            try:
                tasks.class_permutation(dataset, order)
            except tasks.TaskError as e:
                raise SweepError(f"{where}: {at}: {e}") from None
        overlaps = item.get("overlap", False)
        overlaps = overlaps if isinstance(overlaps, list) else [overlaps]
        if not overlaps or not all(isinstance(o, bool) for o in overlaps):
            raise SweepError(f"{where}: {at}: overlap must be true, false or [false, true]")
        options = parse_options(item.get("options", {}), where, f"{at}.options")
        entries += [TaskEntry(dataset, task, o, orders, options) for o in dict.fromkeys(overlaps)]
    settings = [(e.dataset, tasks.canonical_task(e.dataset, e.task), e.overlap) for e in entries]
    twice = next((s for s in settings if settings.count(s) > 1), None)
    if twice:
        raise SweepError(f"{where}: the setting {twice[0]} {twice[1]} "
                         f"{'overlapped' if twice[2] else 'disjoint'} is listed twice in tasks")
    return entries


def parse_datasets(value, where):
    """``[datasets.voc]`` / ``[datasets.ade]``: options of the runs on that dataset."""
    if not isinstance(value, dict):
        raise SweepError(f"{where}: datasets must be a table of [datasets.<name>] tables")
    for name in value:
        if name not in tasks.TASKS:
            raise SweepError(f"{where}: [datasets.{name}]: unknown dataset"
                             f"{suggestion(name, tasks.TASKS)}; known: {', '.join(tasks.TASKS)}")
    return {name: parse_options(opts, where, f"[datasets.{name}]")
            for name, opts in value.items()}


def parse_slurm(value, where):
    check_keys(value, SLURM_KEYS, where, "[slurm]")
    for key in ("gpus_per_job", "cpus_per_job", "time"):
        if key in value and (not isinstance(value[key], int) or value[key] < 0):
            raise SweepError(f"{where}: [slurm] {key} must be a whole number >= 0")
    if "setup" in value and not (isinstance(value["setup"], list) and
                                 all(isinstance(line, str) for line in value["setup"])):
        raise SweepError(f"{where}: [slurm] setup must be a list of shell lines")
    if "additional" in value and not isinstance(value["additional"], dict):
        raise SweepError(f"{where}: [slurm] additional must be a table of sbatch options")
    return dict(value)


# --- run.py options ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def option_actions():
    """{dest: argparse action} of every run.py option."""
    import argparser
    return {a.dest: a for a in argparser.get_argparser()._actions if a.option_strings}


def is_flag(action):
    return action.nargs == 0


def parse_options(table, where, what):
    """Check a table of run.py options (keys without the dashes) and return it as a dict.
    ``epochs`` may be a list (one value per task step, the last repeating), as ``lr`` is."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: {what} must be a table of run.py options")
    actions = option_actions()
    for key, value in table.items():
        if key in RESERVED:
            raise SweepError(f"{where}: {what}: '{key}' is set by the sweep ({RESERVED[key]})")
        if key not in actions:
            raise SweepError(f"{where}: {what}: '{key}' is not a run.py option"
                             f"{suggestion(key, actions)}")
        if is_flag(actions[key]) and not isinstance(value, bool):
            raise SweepError(f"{where}: {what}: {key} is a flag; give true or false")
        if key == "epochs":
            check_epochs(value, where, what)
    return dict(table)


def check_epochs(value, where, what):
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                             for v in values):
        raise SweepError(f"{where}: {what}: epochs must be a whole number >= 1 or a list of "
                         f"them (one per step), got {value!r}")


def option_args(options):
    """run.py arguments of an options dict (``epochs`` excluded: the sweep gives it per
    command): a flag set to true is passed, to false left out; a list becomes a
    comma-separated value, a table JSON."""
    import json
    actions = option_actions()
    args = []
    for key, value in options.items():
        if key == "epochs":
            continue
        spellings = actions[key].option_strings
        flag = f"--{key}" if f"--{key}" in spellings else spellings[0]
        if is_flag(actions[key]):
            args += [flag] if value else []
        elif isinstance(value, list):
            args += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def epochs_per_step(options, n_steps):
    """The epochs of each task step: ``epochs`` is one number or one per step (the last
    repeating); run.py's default (30) without it."""
    value = options.get("epochs", 30)
    values = value if isinstance(value, list) else [value]
    return [values[min(s, len(values) - 1)] for s in range(n_steps)]
