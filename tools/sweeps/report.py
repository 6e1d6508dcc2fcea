"""What ``plan``, ``status`` and ``table`` print: the state of every run of a sweep, and the
paper's table of its cells (built by ``tools/results_table.py``).

The state of a unit comes from three files of its run folder: the manifest (finished steps),
the lock (a live owner: running) and the sweep's record of its last attempt (failed, with the
exit code, the last line of its output and the path of that output; submitted; interrupted).
"""
import os

from tools import results_table as rt
from utils.checkpoint import atomic_write_text
from utils.run_lock import RunLock, describe

from .jobs import read_attempt
from .plan import finished_steps, is_finished
from .spec import SweepError, shown

STATES = ("finished", "running", "submitted", "failed", "interrupted", "blocked", "missing")


def unit_state(unit, plan):
    """(state, detail) of a unit: one of ``STATES`` and what to know about it."""
    owner = RunLock(unit.logdir).busy()
    if owner is not None:
        return "running", describe(owner)
    if is_finished(unit):
        return "finished", ""
    done = len(finished_steps(unit))
    attempt = read_attempt(unit.logdir)
    status = attempt.get("status")
    if status == "failed":
        code = "" if attempt.get("exit_code") is None else f"exit {attempt['exit_code']}: "
        return "failed", f"{code}{attempt.get('message', '')}; log: {attempt.get('console')}"
    if status == "submitted":
        return "submitted", f"{attempt.get('executor')} job {attempt.get('job')}"
    if status in ("running", "interrupted", "requeued") or done:
        return "interrupted", (f"{done}/{len(unit.steps)} steps finished; 'run' continues it "
                               "from its last finished epoch")
    if unit.after and unit_state(plan.unit(unit.after), plan)[0] == "failed":
        return "blocked", f"its step-0 run {unit.after} failed"
    return "missing", ""


def steps_range(unit):
    """``0``, ``1`` or ``1-5``: the steps a unit trains."""
    first, last = unit.steps[0], unit.steps[-1]
    return str(first) if first == last else f"{first}-{last}"


def steps_text(unit):
    return f"{len(finished_steps(unit))}/{len(unit.steps)}"


def grid_text(plan):
    sweep = plan.sweep
    orders = sorted({o for t in sweep.tasks for o in t.class_orders})
    return (f"{len(sweep.methods)} methods x {len(sweep.tasks)} settings x {len(sweep.seeds)} "
            f"seeds x {len(orders)} class order{'s' if len(orders) > 1 else ''} = "
            f"{len(plan.cells)} cells")


def sharing_text(plan):
    shared = sum(1 for c in plan.cells if c.after)
    return (f"step 0: {len(plan.step0)} trainings for {shared} cells "
            f"({plan.step0_saved()} saved by sharing)")


def plan_text(plan, commands=False):
    """The runs of the sweep, what each starts from and what is finished."""
    from tools.experiment import command_text
    sweep = plan.sweep
    lines = [f"sweep {sweep.name} ({shown(sweep.path)}): {grid_text(plan)}",
             f"runs under {shown(sweep.out)}", sharing_text(plan), ""]
    width = max(len(u.name) for u in plan.units)
    for unit in plan.units:
        origin = (f"shared by {len(unit.shared_by)}: {', '.join(unit.shared_by)}"
                  if unit.kind == "step0" else
                  f"from {unit.after}" if unit.after else "its own step 0")
        state = "finished" if is_finished(unit) else f"{steps_text(unit)} steps"
        lines.append(f"  {unit.name:<{width}}  steps {steps_range(unit):<5} "
                     f"{state:<12} {origin}")
        if commands:
            lines += [f"      {command_text(c.args)}" for c in unit.commands]
    todo = [u for u in plan.units if not is_finished(u)]
    lines += ["", f"to run: {len(todo)} of {len(plan.units)} runs "
                  f"({len(plan.step0)} step-0 runs, {len(plan.cells)} cells)"]
    return "\n".join(lines) + "\n"


def status_text(plan):
    """Finished / running / failed / ... per run, with the log path of failures."""
    rows = [(u, *unit_state(u, plan)) for u in plan.units]
    width = max(len(u.name) for u in plan.units)
    lines = [f"sweep {plan.sweep.name}: {grid_text(plan)}; {sharing_text(plan)}", ""]
    lines += [f"  {u.name:<{width}}  {steps_text(u):>5}  {state:<11} {detail}".rstrip()
              for u, state, detail in rows]
    lines.append("")
    for kind, title in (("cell", "cells"), ("step0", "step-0 runs")):
        counts = {s: sum(1 for u, st, _ in rows if u.kind == kind and st == s) for s in STATES}
        lines.append(f"{title}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines) + "\n"


# --- the table --------------------------------------------------------------------------------

def cell_runs(plan):
    """The results of every cell that has some, with {results folder: method entry}."""
    folders = [c.results_dir for c in plan.cells if os.path.isdir(c.results_dir) and
               any(f.endswith(".json") for f in os.listdir(c.results_dir))]
    if not folders:
        raise SweepError(f"no cell of sweep {plan.sweep.name} has results yet; run "
                         f"'python tools/sweep.py run {shown(plan.sweep.path)}' first")
    labels = {os.path.realpath(c.results_dir): c.label for c in plan.cells}
    return rt.load_runs(folders), labels


def replicas_text(plan):
    orders = {o for t in plan.sweep.tasks for o in t.class_orders}
    return "seeds and class orders" if len(orders) > 1 else "seeds"


def build(plan, with_bg=True):
    """(table, caption, runs, row function, row order) of the sweep's cells at the last step
    of each task, rows in the order of the sweep file's methods."""
    runs, labels = cell_runs(plan)
    order = [m.label for m in plan.sweep.methods]

    def row(run):
        return labels[run.folder]

    def row_key(label):
        return order.index(label)
    table = rt.build_table(runs, row, None, with_bg, rt.WITH_HIOU, row_key)
    caption = rt.caption(table, with_bg, "method entry of the sweep", replicas_text(plan),
                         count_label="runs")
    return table, caption, runs, row, row_key


def write_table(plan, out_dir, with_bg=True):
    """Write the table (Markdown, CSV, LaTeX), the cost table (``cost.md``, also appended
    to the Markdown text) and the plots of all-mIoU after each step; returns (Markdown text,
    notes, paths written)."""
    from tools import cost_table
    table, caption, runs, row, row_key = build(plan, with_bg)
    markdown = rt.to_markdown(table, caption, count_label="runs")
    cost = cost_table.to_markdown(cost_table.cost_lines(runs, row, row_key))
    paths = []
    for name, text in (("table.md", markdown), ("table.csv", rt.to_csv(table)),
                       ("table.tex", rt.to_latex(table, caption, count_label="runs")),
                       ("cost.md", cost)):
        paths.append(os.path.join(out_dir, name))
        atomic_write_text(paths[-1], text)
    paths += rt.plot_steps(runs, out_dir, row, with_bg, panels=("all",), bands=True,
                           prefix="miou_all", row_key=row_key)
    return markdown + "\n" + cost, table.notes, paths
