"""The one short summary of a step on stdout (logs and progress bars go to stderr), so that
``python run.py ... > out.txt`` keeps the figures: the test mIoU of all, old and new classes,
the pixel accuracies, and the path of the result file that holds the rest."""
import sys

from utils.results import load_results


def _percent(value):
    return "n/a" if value is None else f"{100 * value:.2f}"


def summary_line(doc, path):
    """``step 1 of 15-5-voc/A (MiB): test mIoU all 41.23, old 50.00, new 10.00 (%); ...``."""
    return (f"step {doc['step']} of {doc['task']}-{doc['dataset']}/{doc['name']} "
            f"({doc.get('method') or 'no method'}): test mIoU all {_percent(doc['miou_all'])}, "
            f"old {_percent(doc['miou_old'])}, new {_percent(doc['miou_new'])}; "
            f"overall acc {_percent(doc['overall_acc'])}, mean acc {_percent(doc['mean_acc'])} "
            f"(%); results: {path}")


def print_summary(path, out=None):
    """Print the summary of the result file ``path`` on stdout (rank 0 calls it)."""
    out = out or sys.stdout
    out.write(summary_line(load_results(path), path) + "\n")
    out.flush()
