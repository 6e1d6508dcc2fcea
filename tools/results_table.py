"""The paper's old / new / all mIoU table (and plots) from the result files of many runs.

    python tools/results_table.py LOGDIR [LOGDIR ...] [--step N] [--group-by name|method]
        [--old-with-bg | --old-without-bg] [--hiou] [--markdown PATH] [--csv PATH]
        [--latex PATH] [--plots DIR] [--run PATH] [--cost]

Every ``results/step-<N>.json`` below the given folders is read (files can be named directly
too). One *run* is one ``results`` folder (one ``--name`` of one task). Runs are grouped:

* columns: one *setting* per (dataset, task, disjoint/overlapped), with old / new / all mIoU
  at the last step of the task (``--step N`` picks another step) and ``avg``, the mean of
  the all-class mIoU over steps 0..N of a run (only for runs that have every one of those
  steps);
* rows: ``--group-by name`` (default) uses the run name with a trailing seed suffix removed
  (``MiB-s1``, ``MiB_seed1``, ``MiB-1`` with ``--random_seed 1`` all give ``MiB``); runs with
  the same name under different log folders are seeds of one row too. ``--group-by method``
  uses the ``--method`` preset (the name when no preset was given).

Runs of one row and setting are its seeds (and class orders, ``--class_order``): the cell
shows their mean ± the sample standard deviation (n - 1 in the denominator) when there are
several, the value alone when there is one. Two runs of one row and setting with the same
seed and class order are an error (they would count twice). ``--hiou`` adds the harmonic
mean of old and new (``hIoU``, computed per run, then averaged). Figures are percentages with
one decimal in Markdown and LaTeX (``booktabs``, the best mean of each column in bold); the
CSV has the same layout with the unrounded mean, the std and the number of runs in separate
columns.

``--cost`` adds the cost table (``tools/cost_table.py``): parameters, training time, images
per second and peak memory of every step and of the whole sequence.

``tools/sweep.py table`` builds its tables with these functions (its rows are the sweep's
method entries: ``group_by`` may be a function of a run).
"""
import argparse
import csv
import io
import os
import re
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

if __package__ in (None, ""):          # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tasks  # noqa: E402
from metrics.summaries import summarize_iou  # noqa: E402
from utils.checkpoint import atomic_write_bytes, atomic_write_text  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.results import class_iou_figure, load_results, new_figure  # noqa: E402

METRICS = ("old", "new", "all", "avg")
WITH_HIOU = METRICS + ("hiou",)
METRIC_LABELS = {"old": "old", "new": "new", "all": "all", "avg": "avg", "hiou": "hIoU"}
# the MiB paper's row order; other rows follow alphabetically
PAPER_ORDER = ("FT", "PI", "EWC", "RW", "LWF", "LWF-MC", "ILT", "MIB")
DATASET_ORDER = ("voc", "ade")
STEP_FILE = re.compile(r"step-(\d+)\.json")
MISSING = "–"


class TableError(UserError, ValueError):
    """Nothing to tabulate, or runs that cannot be told apart."""


# -- collecting runs ---------------------------------------------------------------------------

@dataclass
class Run:
    folder: str
    docs: dict = field(default_factory=dict)   # step -> result document

    @property
    def last(self):
        return self.docs[max(self.docs)]


@dataclass(frozen=True)
class Setting:
    dataset: str
    task: str
    overlap: bool

    @property
    def label(self):
        return f"{self.dataset.upper()} {self.task} {'overlapped' if self.overlap else 'disjoint'}"

    @property
    def slug(self):
        return f"{self.dataset}_{self.task}_{'overlapped' if self.overlap else 'disjoint'}"

    def sort_key(self):
        dataset_rank = DATASET_ORDER.index(self.dataset) if self.dataset in DATASET_ORDER \
            else len(DATASET_ORDER)
        names = list(tasks.TASKS.get(self.dataset, {}))
        task_rank = names.index(self.task) if self.task in names else len(names)
        return (dataset_rank, self.dataset, task_rank, self.task, self.overlap)

    def last_step(self):
        try:
            return tasks.num_steps(self.dataset, self.task) - 1
        except tasks.TaskError:
            return None


def find_result_files(paths):
    """``step-<N>.json`` files: those named, and those in ``results`` folders below the
    folders named. Duplicates (the same file reached twice) are dropped."""
    found = OrderedDict()
    for path in paths:
        if os.path.isfile(path):
            found.setdefault(os.path.realpath(path), path)
        elif os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                if os.path.basename(folder) != "results":
                    continue
                for f in sorted(files):
                    if STEP_FILE.fullmatch(f):
                        full = os.path.join(folder, f)
                        found.setdefault(os.path.realpath(full), full)
        else:
            raise TableError(f"{path} does not exist; give the --logdir folder(s) of your runs "
                             "or step-<N>.json files")
    if not found:
        raise TableError(f"no results/step-<N>.json file under {', '.join(paths)}; runs write "
                         "them at the end of each test phase (train a step, or rerun it with "
                         "--test)")
    return list(found.values())


def load_runs(paths):
    """Runs (one per results folder), in a stable order."""
    runs = OrderedDict()
    for path in find_result_files(paths):
        doc = load_results(path)
        folder = os.path.realpath(os.path.dirname(path))
        run = runs.setdefault(folder, Run(folder))
        run.docs[int(doc["step"])] = doc
    for run in runs.values():
        settings = {setting_of(doc) for doc in run.docs.values()}
        if len(settings) > 1:
            raise TableError(f"results folder {run.folder} mixes "
                             f"{' and '.join(sorted(s.label for s in settings))}; each --name "
                             "must belong to one task (move the stray step-<N>.json files)")
    return list(runs.values())


def setting_of(doc):
    task = str(doc["task"])
    try:
        task = tasks.canonical_task(doc["dataset"], task)   # 15-1 and 15-5s are one task
    except tasks.TaskError:
        pass
    opts = doc.get("opts") or {}
    return Setting(str(doc["dataset"]), task, bool(opts.get("overlap", False)))


def strip_seed_suffix(name, seed):
    """``MiB-s1`` / ``MiB_seed1`` / ``MiB-1`` -> ``MiB`` when the run's seed is 1; other
    names unchanged (the number must be the recorded seed, so ``LwF-100`` stays as it is)."""
    if seed is None:
        return name
    match = re.fullmatch(rf"(.+?)[-_.](?:seed|s)?[-_=]?0*{int(seed)}", name, flags=re.IGNORECASE)
    return match.group(1) if match else name


def row_of(run, group_by):
    """The row of a run: ``group_by(run)`` when it is a function, else by name or method."""
    if callable(group_by):
        return group_by(run)
    doc = run.last    # a sequence is called after its latest step
    base = strip_seed_suffix(str(doc["name"]), doc.get("seed"))
    if group_by == "method" and doc.get("method"):
        return str(doc["method"])
    return base


def row_sort_key(row):
    upper = row.upper()
    return (PAPER_ORDER.index(upper), "") if upper in PAPER_ORDER else (len(PAPER_ORDER), upper)


def replica_of(run):
    """(seed, class order): what tells the runs of one cell apart."""
    return run.last.get("seed"), int(run.last.get("class_order") or 0)


def group_runs(runs, group_by, row_key=row_sort_key):
    """{setting: {row: [runs]}} with settings and rows in table order; refuses two runs of
    one cell with the same seed and class order."""
    groups = {}
    for run in runs:
        setting, row = setting_of(run.last), row_of(run, group_by)
        cell = groups.setdefault(setting, {}).setdefault(row, [])
        seed, order = replica_of(run)
        clash = next((other for other in cell if replica_of(other) == (seed, order)), None)
        if clash is not None:
            other_way = ("--group-by name" if group_by == "method" else
                         "different --random_seed values")
            with_order = f" and class order {order}" if order else ""
            raise TableError(f"runs {clash.folder} and {run.folder} are both row '{row}' of "
                             f"{setting.label} with seed {seed}{with_order}; give only one of "
                             f"them, or use {other_way}")
        cell.append(run)
    return OrderedDict(
        (s, OrderedDict((r, groups[s][r]) for r in sorted(groups[s], key=row_key)))
        for s in sorted(groups, key=Setting.sort_key))


# -- figures -----------------------------------------------------------------------------------

@dataclass
class Stat:
    mean: float = None
    std: float = None
    n: int = 0

    @classmethod
    def of(cls, values):
        values = [v for v in values if v is not None]
        if not values:
            return cls()
        std = statistics.stdev(values) if len(values) > 1 else None   # sample std (n - 1)
        return cls(statistics.fmean(values), std, len(values))


def old_key(with_bg):
    return "miou_old" if with_bg else "miou_old_no_bg"


def harmonic_mean(old, new):
    """hIoU: the harmonic mean of old and new (None without old classes, 0 when both are 0)."""
    if old is None or new is None:
        return None
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


def run_figures(run, step, with_bg):
    """{metric: fraction or None} of one run at ``step``; None when the run lacks the step.
    ``avg`` needs every step 0..step."""
    doc = run.docs.get(step)
    if doc is None:
        return None
    alls = [run.docs[s]["miou_all"] if s in run.docs else None for s in range(step + 1)]
    old, new = doc[old_key(with_bg)], doc["miou_new"]
    return {"old": old, "new": new, "all": doc["miou_all"],
            "avg": None if any(v is None for v in alls) else statistics.fmean(alls),
            "hiou": harmonic_mean(old, new)}


@dataclass
class Table:
    settings: list          # [(Setting, step)]
    rows: list              # row names
    cells: dict             # (row, Setting) -> {metric: Stat}
    notes: list
    run_counts: dict        # (row, Setting) -> runs (seeds) at the step
    metrics: tuple = METRICS
    joint: bool = False     # Joint rows (joint training, the offline task) are in it


JOINT_TASK = "offline"
JOINT_ROW = "Joint"


def joint_row_name(row, n_rows):
    """The upper-bound row of a joint (``offline``) row: ``Joint``, or ``Joint (row)`` when
    several rows trained jointly."""
    return JOINT_ROW if n_rows == 1 else f"{JOINT_ROW} ({row})"


def joint_figures(run, labels_per_step, with_bg):
    """{metric: fraction or None} of a joint (``offline``) run measured as a step of
    another task: its per-class IoU split into the task's old and new classes at the step
    whose ``labels_per_step`` are given (what papers print as the upper bound)."""
    doc = run.docs.get(0)
    if doc is None:
        return None
    by_label = {int(label): doc["class_iou"].get(str(k))
                for k, label in (doc.get("class_labels") or {}).items()}
    channels = [0] + [label for labels in labels_per_step for label in labels if label != 0]
    summary = summarize_iou([by_label.get(label) for label in channels],
                            [len(labels) for labels in labels_per_step])
    old, new = summary[old_key(with_bg)], summary["miou_new"]
    return {"old": old, "new": new, "all": summary["miou_all"], "avg": None,
            "hiou": harmonic_mean(old, new)}


def split_joint(groups):
    """(the groups without the joint settings, {dataset: {row: [joint runs]}}); joint runs
    stay columns of their own where their dataset has no other setting."""
    joint = {}
    for setting, by_row in groups.items():
        if setting.task == JOINT_TASK and any(
                other.dataset == setting.dataset and other.task != JOINT_TASK
                for other in groups):
            for row, runs_ in by_row.items():
                joint.setdefault(setting.dataset, {}).setdefault(row, []).extend(runs_)
    rest = OrderedDict((s, r) for s, r in groups.items()
                       if not (s.task == JOINT_TASK and s.dataset in joint))
    return rest, joint


def build_table(runs, group_by="name", step=None, with_bg=True, metrics=METRICS,
                row_key=row_sort_key, joint=True):
    """The table of ``runs`` at ``step`` (default: the last step of each task) with the
    columns ``metrics`` per setting; ``row_key`` orders the rows (default: the paper's
    order, then alphabetical). With ``joint``, runs of the ``offline`` task (joint training)
    become the last row(s), ``Joint``, of every setting of their dataset: their per-class
    IoU split into that setting's old and new classes (no avg)."""
    groups = group_runs(runs, group_by, row_key)
    joint_runs = {}
    if joint:
        groups, joint_runs = split_joint(groups)
    settings, cells, notes, rows, run_counts = [], {}, [], [], {}
    for setting, by_row in groups.items():
        target = step if step is not None else setting.last_step()
        if target is None:      # a task this version does not know: its latest step found
            target = max(s for runs_ in by_row.values() for r in runs_ for s in r.docs)
        used = False
        for row, cell_runs in by_row.items():
            figures = []
            for run in cell_runs:
                f = run_figures(run, target, with_bg)
                if f is None:
                    notes.append(f"{run.folder}: no step-{target} result, left out of "
                                 f"{setting.label}")
                    continue
                missing = [s for s in range(target) if s not in run.docs]
                if missing:
                    notes.append(f"{run.folder}: no result for step(s) "
                                 f"{', '.join(map(str, missing))}, left out of the avg of "
                                 f"{setting.label}")
                figures.append(f)
            if not figures:
                continue
            used = True
            cells[(row, setting)] = {m: Stat.of([f[m] for f in figures]) for m in metrics}
            run_counts[(row, setting)] = len(figures)
            if row not in rows:
                rows.append(row)
        if used:
            settings.append((setting, target))
            add_joint_rows(joint_runs.get(setting.dataset, {}), setting, target, by_row,
                           with_bg, metrics, cells, run_counts, rows)
    if not settings:
        if step is None:
            raise TableError("no run has a result for the last step of its task; tabulate "
                             "an earlier step with --step N")
        raise TableError(f"no run has a step-{step} result; pick a step the runs reached "
                         "(--step)")
    joint_names = [r for r in rows if r.startswith(JOINT_ROW) and r not in
                   {row for by_row in groups.values() for row in by_row}]
    rows = sorted((r for r in rows if r not in joint_names), key=row_key) + joint_names
    return Table(settings, rows, cells, notes, run_counts, tuple(metrics), bool(joint_names))


def add_joint_rows(joint_by_row, setting, target, by_row, with_bg, metrics, cells,
                   run_counts, rows):
    """The Joint row(s) of one setting, split by the classes of its step ``target`` (the
    labels of a run of the setting that reached it)."""
    reached = [r for runs_ in by_row.values() for r in runs_ if target in r.docs]
    if not joint_by_row or not reached:
        return
    labels = reached[0].docs[target]["labels_per_step"]
    for row, runs_ in joint_by_row.items():
        figures = [f for f in (joint_figures(r, labels, with_bg) for r in runs_)
                   if f is not None]
        if not figures:
            continue
        name = joint_row_name(row, len(joint_by_row))
        cells[(name, setting)] = {m: Stat.of([f[m] for f in figures]) for m in metrics}
        run_counts[(name, setting)] = len(figures)
        if name not in rows:
            rows.append(name)


def percent(value, digits):
    return f"{100 * value:.{digits}f}"


def cell_text(stat):
    if stat is None or stat.mean is None:
        return MISSING
    text = percent(stat.mean, 1)
    return text if stat.std is None else f"{text} ± {percent(stat.std, 1)}"


def caption(table, with_bg, group_by, replicas="seeds", count_label="seeds"):
    """What the table shows, the background convention included; ``group_by`` says what
    the rows are, ``replicas`` what its runs per cell are (e.g. "seeds and class orders")."""
    steps = sorted({s for _, s in table.settings})
    where = (f"after step {steps[0]}" if len(steps) == 1 else
             "after step " + ", ".join(f"{s} ({st.label})" for st, s in table.settings))
    old = "with" if with_bg else "without"
    hiou = ("; hIoU = harmonic mean of old and new, per run" if "hiou" in table.metrics
            else "")
    return (f"mIoU (%) {where}. old = classes of earlier steps {old} the background class; "
            "new = classes of this step; all = every class seen, background included; avg = "
            f"mean of all over steps 0..N{hiou}. Mean ± sample std (n-1) over {replicas} "
            f"where a row has several (runs per row: column '{count_label}'). Rows by "
            f"{group_by}." + (" Joint = joint training on all classes (the offline task), "
                              "its per-class IoU split into each setting's old and new "
                              "classes: the upper bound." if table.joint else ""))


def seeds_text(table, row):
    counts = sorted({n for (r, _), n in table.run_counts.items() if r == row})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def to_markdown(table, caption_text, count_label="seeds"):
    header = ["method"] + [f"{s.label} · {METRIC_LABELS[m]}" for s, _ in table.settings
                           for m in table.metrics] + [count_label]
    body = [[row] + [cell_text(table.cells.get((row, s), {}).get(m))
                     for s, _ in table.settings for m in table.metrics] +
            [seeds_text(table, row)] for row in table.rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):   # names left-aligned, figures right-aligned (as the rule says)
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([f"Table: {caption_text}", "", line(header), rule] +
                     [line(r) for r in body]) + "\n"


def to_csv(table):
    """Same layout as the Markdown table; unrounded percentages, one mean / std / n column
    per figure (std empty with a single run)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["method"]
    for s, step in table.settings:
        for m in table.metrics:
            col = f"{s.label} step {step} {METRIC_LABELS[m]}"
            header += [col, f"{col} std", f"{col} n"]
    writer.writerow(header)
    for row in table.rows:
        line = [row]
        for s, _ in table.settings:
            for m in table.metrics:
                stat = table.cells.get((row, s), {}).get(m) or Stat()
                line += ["" if stat.mean is None else round(100 * stat.mean, 6),
                         "" if stat.std is None else round(100 * stat.std, 6), stat.n]
        writer.writerow(line)
    return buf.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--"}


def latex_escape(text):
    return "".join(LATEX_SPECIAL.get(c, c) for c in str(text))


def best_means(table):
    """{(Setting, metric): the highest mean of the column, rounded as printed}."""
    best = {}
    for s, _ in table.settings:
        for m in table.metrics:
            means = [round(100 * st.mean, 1) for row in table.rows
                     for st in [table.cells.get((row, s), {}).get(m)]
                     if st is not None and st.mean is not None]
            if means:
                best[(s, m)] = max(means)
    return best


def latex_cell(stat, best):
    if stat is None or stat.mean is None:
        return "--"
    mean = percent(stat.mean, 1)
    if round(100 * stat.mean, 1) == best:
        mean = rf"\textbf{{{mean}}}"
    return mean if stat.std is None else rf"{mean} $\pm$ {percent(stat.std, 1)}"


def to_latex(table, caption_text, count_label="seeds"):
    """The table as a LaTeX ``table`` with ``booktabs`` rules: one column group per setting,
    the best mean of each column in bold (needs ``\\usepackage{booktabs}``)."""
    k = len(table.metrics)
    best = best_means(table)
    groups = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(s.label)}}}"
                        for s, _ in table.settings)
    rules = "".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}"
                    for i in range(len(table.settings)))
    names = " & ".join(METRIC_LABELS[m] for _ in table.settings for m in table.metrics)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption_text)}}}",
             rf"\begin{{tabular}}{{l{'r' * (k * len(table.settings))}r}}", r"\toprule",
             rf" & {groups} & \\", rules, rf"Method & {names} & {latex_escape(count_label)} \\",
             r"\midrule"]
    for row in table.rows:
        cells = [latex_cell(table.cells.get((row, s), {}).get(m), best.get((s, m)))
                 for s, _ in table.settings for m in table.metrics]
        lines.append(" & ".join([latex_escape(row), *cells, seeds_text(table, row)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- plots -------------------------------------------------------------------------------------

def save_png(fig, path):
    """Render to memory, then write atomically (temporary file + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_steps(runs, out_dir, group_by="name", with_bg=True, panels=("old", "new", "all"),
               bands=False, prefix="miou_steps", row_key=row_sort_key):
    """One PNG per setting (``<prefix>_<setting>.png``): a panel per metric of ``panels``
    with its mIoU after each step, a line per row (mean over seeds, sample std as error bars
    or, with ``bands``, as a shaded band). Returns the paths written."""
    paths = []
    for setting, by_row in group_runs(runs, group_by, row_key).items():
        last = max(s for rs in by_row.values() for r in rs for s in r.docs)
        steps = list(range(last + 1))
        fig = new_figure((4 * len(panels) + 0.5, 3.8))
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, metric in zip(axes, panels):
            for row, row_runs in by_row.items():
                xs, ys, errs = [], [], []
                for s in steps:
                    stat = Stat.of([(run_figures(r, s, with_bg) or {}).get(metric)
                                    for r in row_runs])
                    if stat.mean is not None:
                        xs.append(s)
                        ys.append(100 * stat.mean)
                        errs.append(100 * (stat.std or 0.0))
                if xs and bands:
                    line, = ax.plot(xs, ys, marker="o", label=row)
                    ax.fill_between(xs, [y - e for y, e in zip(ys, errs)],
                                    [y + e for y, e in zip(ys, errs)], alpha=0.2,
                                    color=line.get_color(), linewidth=0)
                elif xs:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=row)
            title = {"old": f"old ({'with' if with_bg else 'without'} background)",
                     "new": "new (this step's classes)", "all": "all"}[metric]
            ax.set(title=title, xlabel="step", xticks=steps)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mIoU (%)")
        axes[-1].legend(loc="best", fontsize="small")
        fig.suptitle(f"{setting.label}: mIoU after each step")
        fig.tight_layout()
        paths.append(save_png(fig, os.path.join(out_dir, f"{prefix}_{setting.slug}.png")))
    return paths


def resolve_run_file(path, step=None):
    """A step-<N>.json file, or a results / run folder (its step ``step``, else its last)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise TableError(f"--run {path} does not exist; give a results/step-<N>.json file or "
                         "its folder")
    folder = path if os.path.basename(os.path.normpath(path)) == "results" or not \
        os.path.isdir(os.path.join(path, "results")) else os.path.join(path, "results")
    steps = sorted(int(m.group(1)) for m in map(STEP_FILE.fullmatch, os.listdir(folder)) if m)
    if not steps:
        raise TableError(f"--run {path}: no step-<N>.json in {folder}")
    if step is not None and step not in steps:
        raise TableError(f"--run {path}: no step-{step}.json (steps found: "
                         f"{', '.join(map(str, steps))})")
    return os.path.join(folder, f"step-{steps[-1] if step is None else step}.json")


def plot_class_iou(doc, path):
    """Per-class IoU bars of one result file (``utils.results.class_iou_figure``) as a PNG."""
    return save_png(class_iou_figure(doc), path)


# -- command line ------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(
        prog="results_table.py",
        description="Old / new / all mIoU tables (Markdown, CSV, LaTeX) and plots from the "
                    "results/step-<N>.json files of many runs (methods, tasks, seeds).")
    p.add_argument("logdirs", nargs="*", metavar="LOGDIR",
                   help="folders searched recursively for results/step-<N>.json (e.g. the "
                        "--logdir of the runs), or such files")
    p.add_argument("--step", type=int, default=None,
                   help="step to tabulate (default: the last step of each task)")
    p.add_argument("--group-by", choices=["name", "method"], default="name",
                   help="rows: run name without a trailing seed suffix, or --method preset")
    bg = p.add_mutually_exclusive_group()
    bg.add_argument("--old-with-bg", dest="with_bg", action="store_true", default=True,
                    help="old classes include the background (default; key miou_old)")
    bg.add_argument("--old-without-bg", dest="with_bg", action="store_false",
                    help="old classes exclude the background (key miou_old_no_bg)")
    p.add_argument("--hiou", action="store_true",
                   help="add the harmonic mean of old and new (hIoU) to each setting")
    p.add_argument("--markdown", metavar="PATH", help="also write the Markdown table here")
    p.add_argument("--csv", metavar="PATH", help="write the table as CSV here")
    p.add_argument("--latex", metavar="PATH",
                   help="write the table as LaTeX (booktabs) here")
    p.add_argument("--plots", metavar="DIR",
                   help="write PNG plots here: mIoU after each step per setting and, with "
                        "--run, the per-class IoU bars")
    p.add_argument("--run", metavar="PATH",
                   help="one run's step-<N>.json (or its results folder) for per-class IoU "
                        "bars (into --plots DIR, else beside the file)")
    p.add_argument("--cost", action="store_true",
                   help="also print the cost table: parameters, training time, images/s and "
                        "peak memory per step and per sequence (into --markdown too)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if not args.logdirs and not args.run:
        get_parser().error("give at least one LOGDIR (or --run PATH)")
    if args.step is not None and args.step < 0:
        get_parser().error("--step must be 0 or more")
    try:
        if args.logdirs:
            runs = load_runs(args.logdirs)
            table = build_table(runs, args.group_by, args.step, args.with_bg,
                                WITH_HIOU if args.hiou else METRICS)
            text = caption(table, args.with_bg, args.group_by)
            markdown = to_markdown(table, text)
            if args.cost:
                from tools.cost_table import cost_lines
                from tools.cost_table import to_markdown as cost_markdown
                markdown += "\n" + cost_markdown(cost_lines(runs, args.group_by))
            sys.stdout.write(markdown)
            for note in table.notes:
                sys.stderr.write(f"note: {note}\n")
            if args.markdown:
                atomic_write_text(args.markdown, markdown)
            if args.csv:
                atomic_write_text(args.csv, to_csv(table))
            if args.latex:
                atomic_write_text(args.latex, to_latex(table, text))
            if args.plots:
                for path in plot_steps(runs, args.plots, args.group_by, args.with_bg):
                    sys.stderr.write(f"plot: {path}\n")
        if args.run:
            run_file = resolve_run_file(args.run, args.step)
            doc = load_results(run_file)
            out_dir = args.plots or os.path.dirname(run_file)
            path = plot_class_iou(doc, os.path.join(
                out_dir, f"class_iou_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(doc['name']))}"
                         f"_step{doc['step']}.png"))
            sys.stderr.write(f"plot: {path}\n")
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
