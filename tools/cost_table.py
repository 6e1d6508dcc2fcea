"""The cost table: what each run's steps cost, beside the mIoU table.

One line per (row, setting, step) and one ``all`` line per (row, setting) for the whole
sequence, from the ``cost`` record of the result files (``utils/cost.py``): trainable and
total parameters (millions, at that step; the sequence line: its last step), training time
(minutes; the sequence: the sum over its steps), images per second of all processes (the
sequence: all images over all time), peak host RSS and peak CUDA memory (GiB; the sequence:
the highest step), the device and the number of processes, and the batch of one optimiser
step (``total = per process x processes x accumulated``). Several runs of a row (seeds,
class orders) are averaged; a step without a cost record (written before costs were
recorded) shows ``–``, and a sequence with such a step has no ``all`` time.
"""
import statistics

from tools.results_table import MISSING, group_runs, row_sort_key

COLUMNS = ("trainable (M)", "total (M)", "train time (min)", "img/s", "peak RSS (GiB)",
           "peak CUDA (GiB)")


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def step_figures(cost):
    """The table's figures of one step's cost record (None entries where unknown)."""
    if not cost:
        return None
    cuda = cost.get("peak_cuda_mib")
    return {"trainable (M)": cost["params_trainable"] / 1e6,
            "total (M)": cost["params_total"] / 1e6,
            "train time (min)": cost["train_seconds"] / 60,
            "img/s": cost.get("images_per_s"),
            "peak RSS (GiB)": cost["peak_rss_mib"] / 1024,
            "peak CUDA (GiB)": None if cuda is None else cuda / 1024,
            "_images": cost.get("train_images") or 0,
            "_seconds": cost["train_seconds"]}


def sequence_figures(run, last):
    """The whole sequence 0..last of one run (None when a step lacks its cost)."""
    steps = [step_figures((run.docs.get(s) or {}).get("cost")) for s in range(last + 1)]
    if any(f is None for f in steps):
        return None
    seconds = sum(f["_seconds"] for f in steps)
    cuda = [f["peak CUDA (GiB)"] for f in steps if f["peak CUDA (GiB)"] is not None]
    return {"trainable (M)": steps[-1]["trainable (M)"], "total (M)": steps[-1]["total (M)"],
            "train time (min)": seconds / 60,
            "img/s": sum(f["_images"] for f in steps) / seconds if seconds > 0 else None,
            "peak RSS (GiB)": max(f["peak RSS (GiB)"] for f in steps),
            "peak CUDA (GiB)": max(cuda) if cuda else None}


def _batch(runs, steps):
    found = set()
    for run in runs:
        for s in steps:
            cost = (run.docs.get(s) or {}).get("cost")
            if cost and cost.get("total_batch"):
                found.add(f"{cost['total_batch']} = {cost['batch_per_process']}x"
                          f"{cost.get('world_size', 1)}x{cost.get('accumulate', 1)}")
    return ", ".join(sorted(found)) or MISSING


def _device(runs, steps):
    names = set()
    for run in runs:
        for s in steps:
            cost = (run.docs.get(s) or {}).get("cost")
            if cost:
                names.add(f"{cost.get('device_name') or cost.get('device')} "
                          f"x{cost.get('world_size', 1)}")
    return ", ".join(sorted(names)) or MISSING


def cost_lines(runs, group_by="name", row_key=row_sort_key):
    """[(row, setting label, step or 'all', {column: mean or None}, device, batch, runs)]."""
    lines = []
    for setting, by_row in group_runs(runs, group_by, row_key).items():
        for row, row_runs in by_row.items():
            last = max(s for r in row_runs for s in r.docs)
            for step in range(last + 1):
                figures = [step_figures((r.docs.get(step) or {}).get("cost")) for r in row_runs]
                figures = [f for f in figures if f is not None]
                lines.append((row, setting.label, str(step),
                              {c: _mean([f[c] for f in figures]) for c in COLUMNS},
                              _device(row_runs, [step]), _batch(row_runs, [step]),
                              len(figures)))
            seq = [f for f in (sequence_figures(r, last) for r in row_runs) if f is not None]
            lines.append((row, setting.label, "all",
                          {c: _mean([f[c] for f in seq]) for c in COLUMNS},
                          _device(row_runs, range(last + 1)), _batch(row_runs, range(last + 1)),
                          len(seq)))
    return lines


def _text(column, value):
    if value is None:
        return MISSING
    if column in ("trainable (M)", "total (M)"):
        return f"{value:.2f}"
    if column == "img/s":
        return f"{value:.1f}"
    return f"{value:.2f}"


def to_markdown(lines):
    header = ["method", "setting", "step", *COLUMNS, "device x processes", "batch", "runs"]
    body = [[row, label, step, *(_text(c, figures[c]) for c in COLUMNS), device, batch, str(n)]
            for row, label, step, figures, device, batch, n in lines]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) if i in (0, 1, 9) else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    caption = ("Table: cost per step and for the whole sequence (step 'all': time summed, "
               "memory the highest step, parameters of the last step); img/s of all processes; "
               "batch = total per optimiser step = per process x processes x accumulated; "
               "mean over the runs of a row.")
    return "\n".join([caption, "", line(header), rule] + [line(r) for r in body]) + "\n"
