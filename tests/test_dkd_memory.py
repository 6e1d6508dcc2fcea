"""DKD-M's memory selection reproduces DKD's own values (tests/data/dkd_cases.json, "memory":
DKD's ``memory_sampling_balanced`` run at steps 1 and 2 of VOC 5-3 on fake candidates, NumPy
seeded with 1 before each selection): the candidate list before and after NumPy's shuffle,
the class order before and after its shuffle, and the memory file written. Candidates come
from ``methods.dkd.labels.candidate_records``, the selection from SSUL's round robin through
``methods.dkd.memory``. Also: the endless loop (D6) is one clear error, its fix stops short,
and the record fix (D7) leaves the previous step's entry alone."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from methods.dkd.labels import candidate_records, mask_labels
from methods.dkd.memory import (
    MemorySelectionError,
    MemoryStallError,
    memory_pool,
    select_memory,
    select_step_memory,
)
from utils.errors import UserError

MEMORY = json.loads((Path(__file__).parent / "data" / "dkd_cases.json").read_text())["memory"]


def new_candidates(case):
    """The step's own candidates: each batch of the step t-1 loader, pseudo-labelled by the
    old model's logits at step 2."""
    logits = case.get("logits")
    records = []
    for i, batch in enumerate(case["batches"]):
        old = None if logits is None else torch.tensor(logits[i], dtype=torch.float64)
        records += candidate_records(batch["image_name"],
                                     torch.tensor(batch["label"], dtype=torch.uint8), old)
    return records


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_memory_selection_and_file(name):
    case = MEMORY[name]
    previous = case.get("previous_memory_json")
    kept_previous = copy.deepcopy(previous)
    new = new_candidates(case)
    candidates, classes = case["expected_shuffles"]
    assert memory_pool(previous, case["step"], new) == candidates["before"]
    assert case["old_classes"] == classes["before"]
    record, selection = select_step_memory(previous, case["step"], new, case["old_classes"],
                                           case["mem_size"], np.random.RandomState(1))
    assert selection.shuffled_pool == candidates["after"]
    assert selection.class_order == classes["after"]
    assert record == case["expected_memory_json"]
    assert len(selection.chosen) == case["mem_size"]
    assert previous == kept_previous          # the caller's record is not modified


def test_memory_selection_draws_from_the_global_generator_alike():
    """DKD draws from NumPy's global state seeded with 1: the same as a RandomState(1)."""
    case = MEMORY["step1"]
    pool = memory_pool(None, 1, new_candidates(case))
    np.random.seed(1)
    by_module = select_memory(pool, case["old_classes"], case["mem_size"], np.random)
    assert by_module == select_memory(pool, case["old_classes"], case["mem_size"],
                                      np.random.RandomState(1))


def test_memory_that_cannot_be_filled_is_one_clear_error():
    """D6: 12 candidates hold classes 1-5, 13 exemplars cannot be found: DKD never ends."""
    case = MEMORY["step1"]
    pool = memory_pool(None, 1, new_candidates(case))
    with pytest.raises(MemoryStallError, match="cannot hold 13 images: only 12 of the 12") as err:
        select_memory(pool, case["old_classes"], 13, np.random.RandomState(1))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    stopped = select_memory(pool, case["old_classes"], 13, np.random.RandomState(1),
                            on_stall="stop")
    assert sorted(e[0] for e in stopped.chosen) == sorted(e[0] for e in pool)
    # a class no candidate holds is skipped while the others still fill the memory
    only_5 = select_memory(pool, [5, 9], 3, np.random.RandomState(1))
    assert [5 in e[1] for e in only_5.chosen] == [True] * 3 and only_5.per_class[9] == []


def test_memory_record_fix_leaves_the_previous_step_alone():
    """D7: DKD appends every step-2 candidate to step_1's list; the fix keeps step_1 as read."""
    case = MEMORY["step2"]
    previous = case["previous_memory_json"]
    record, _ = select_step_memory(previous, 2, new_candidates(case), case["old_classes"],
                                   case["mem_size"], np.random.RandomState(1),
                                   alias_previous=False)
    assert record["step_1"] == previous["step_1"]
    assert record["step_2"] == case["expected_memory_json"]["step_2"]
    assert case["expected_memory_json"]["step_1"] != previous["step_1"]


def test_step_2_needs_the_previous_record():
    case = MEMORY["step2"]
    with pytest.raises(MemorySelectionError, match="no entry step_1"):
        select_step_memory({}, 2, new_candidates(case), case["old_classes"], 6,
                           np.random.RandomState(1))
    with pytest.raises(MemorySelectionError, match="steps >= 1"):
        memory_pool(None, 0, [])


def test_exemplar_labels_lose_their_old_classes_unless_kept():
    """D4: an exemplar used at step 1 of 5-3 (classes 1-5 old, 6-8 new) is masked as that
    step's training data, so its old classes become 0; the fix keeps its ground truth (255
    stays, future classes still become 0)."""
    label = torch.tensor([[0, 2, 6], [5, 255, 9]], dtype=torch.uint8)
    old, new = [1, 2, 3, 4, 5], [6, 7, 8]
    assert mask_labels(label, new, old, 0).tolist() == [[0, 0, 6], [0, 255, 0]]
    assert mask_labels(label, new, old, 0, keep_old=True).tolist() == [[0, 2, 6], [5, 255, 0]]
