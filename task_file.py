"""Task splits from a file (``--task_file``): JSON or TOML, the built-in tables' format.

    {"voc": {"my-4-4": {"0": [0, 1, 2, 3, 4], "1": [5, 6, 7, 8], ...}}}

    [voc.my-4-4]            # TOML: the same table
    0 = [0, 1, 2, 3, 4]
    1 = [5, 6, 7, 8]

Top-level keys are datasets, then task names, then steps (0, 1, ...) with the ORIGINAL label
ids each step introduces. Keys starting with ``_`` are notes and skipped. Every task goes
through ``tasks.check_task`` (the built-in tables' checker), so a mistake stops the run with
one line naming the file, the task and the rule.
"""
import json
import os

import tasks

try:
    import tomllib
except ModuleNotFoundError:      # Python 3.10: JSON files only
    tomllib = None


def read_task_file(path):
    """The file's top-level table (dataset -> task -> step -> labels), parsed by extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".toml"):
        raise tasks.TaskTableError(f"--task_file {path}: use a .json or .toml file")
    if ext == ".toml" and tomllib is None:
        raise tasks.TaskTableError(f"--task_file {path}: reading TOML needs Python 3.11 or "
                                   "newer; use a .json file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise tasks.TaskTableError(f"--task_file {path}: cannot read it ({e.strerror})") from None
    try:
        doc = json.loads(raw) if ext == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise tasks.TaskTableError(f"--task_file {path}: not valid {ext[1:].upper()} "
                                   f"({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise tasks.TaskTableError(f"--task_file {path}: the top level must be a table of "
                                   "datasets, e.g. {\"voc\": {\"my-task\": {...}}}")
    return doc


def load_task_file(path):
    """Check every task of the file and add it to ``tasks``; returns [(dataset, name)]."""
    added = []
    for dataset, table in read_task_file(path).items():
        if dataset.startswith("_"):
            continue
        if dataset not in tasks.TASKS:
            raise tasks.TaskTableError(f"--task_file {path}: unknown dataset '{dataset}'; "
                                       f"valid datasets: {', '.join(tasks.TASKS)}")
        if not isinstance(table, dict) or not table:
            raise tasks.TaskTableError(f"--task_file {path}: '{dataset}' must hold a table of "
                                       "tasks, e.g. {\"my-task\": {\"0\": [0, 1], \"1\": [2]}}")
        for name, steps in table.items():
            if name.startswith("_"):
                continue
            tasks.add_task(dataset, name, steps, where=path)
            added.append((dataset, name))
    if not added:
        raise tasks.TaskTableError(f"--task_file {path}: defines no task")
    return added
