"""The time left of a sequence of steps (``--step all`` or a list of steps): an estimate.

The training sets of the later steps are made only when those steps start, so their size is
estimated from the current one: each later step is taken to have as many iterations per new
class as the current step has (step 0's background label is no new class). The time per
iteration measured so far applies to all of them; later steps also run the previous step's
network, so the estimate is rather low than high."""


def new_classes(per_task_classes):
    """The classes each step adds, from ``tasks.get_per_task_classes`` (which counts the
    background label in step 0)."""
    return [n - 1 if s == 0 else n for s, n in enumerate(per_task_classes)]


def later_steps_share(added, step, steps):
    """The training of the steps after ``step`` in ``steps``, as a multiple of ``step``'s
    own (``added``: the classes each step adds); None when ``step`` is the last one."""
    later = [added[s] for s in steps if s > step]
    if not later:
        return None
    return sum(later) / max(added[step], 1)


def sequence_left(step_left, step_total, share):
    """What is left of the sequence (seconds or iterations, as given): the rest of the
    current step and ``share`` times a whole step (``step_total``) for the later steps."""
    return step_left + step_total * share
