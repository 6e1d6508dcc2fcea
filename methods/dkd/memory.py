"""DKD-M's exemplar memory (docs/behaviour.md §19.8): SSUL's balanced round robin and memory
record (``methods.ssul.memory``), fed with DKD's candidates and class list.

What differs from SSUL is only what goes in: a candidate is ``[name, labels]``
(``labels.candidate_records``), the pool at step t >= 2 is the exemplars kept at t-1 (with
their label lists of then) followed by the new candidates, and the classes are every class of
the earlier steps. The draws are SSUL's (NumPy's legacy generator: DKD's global state after
``numpy.random.seed(1)``, or ``RandomState(1)``).

D6: when the candidates run out before ``mem_size`` DKD loops forever; here that is one clear
error (``MemoryStallError``), and ``on_stall="stop"`` keeps what was taken. D7: the previous
step's entry of the record gets every step-t candidate appended, as DKD rewrites it;
``alias_previous=False`` leaves it alone.
"""
from methods.ssul.memory import (
    MemorySelectionError,
    MemoryStallError,
    balanced_round_robin,
    update_memory_record,
)

__all__ = ["memory_labels", "memory_pool", "select_memory", "select_step_memory",
           "MemorySelectionError", "MemoryStallError"]


def memory_labels(entry):
    """The classes a DKD candidate ``[name, labels]`` holds."""
    return entry[1]


def memory_pool(record, step, new_candidates):
    """The candidates of ``step``: at step >= 2 the previous step's kept exemplars
    (``record["step_<t-1>"]["memory_candidates"]``) first, then ``new_candidates``."""
    if step < 1:
        raise MemorySelectionError(f"the memory is selected at steps >= 1, not at step {step}")
    pool = []
    if step >= 2:
        previous = (record or {}).get(f"step_{step - 1}")
        if previous is None:
            raise MemorySelectionError(
                f"the memory record has no entry step_{step - 1}: step {step}'s selection "
                f"starts from the exemplars of step {step - 1}; run that step with the same "
                f"memory size first")
        pool = [list(entry) for entry in previous["memory_candidates"]]
    return pool + [list(entry) for entry in new_candidates]


def select_memory(pool, old_classes, mem_size, rng, *, on_stall="error"):
    """SSUL's balanced round robin over DKD's ``[name, labels]`` candidates."""
    return balanced_round_robin(pool, old_classes, mem_size, rng, labels_of=memory_labels,
                                on_stall=on_stall)


def select_step_memory(record, step, new_candidates, old_classes, mem_size, rng, *,
                       on_stall="error", alias_previous=True):
    """DKD's memory of ``step``: the pool (``memory_pool``), the selection over
    ``old_classes`` (every class of steps < ``step``), and the record with ``step_<t>`` added
    (``record`` = the previous step's file content, None at step 1; it is not modified).
    Returns (new record, selection); the step's exemplars are the new record's
    ``step_<t>["memory_list"]``."""
    pool = memory_pool(record, step, new_candidates)
    selection = select_memory(pool, old_classes, mem_size, rng, on_stall=on_stall)
    new_record = update_memory_record(record, step, new_candidates, selection.chosen,
                                      alias_previous=alias_previous)
    return new_record, selection
