"""DKD's label rules (docs/behaviour.md §19.2, §19.8): label masking per set, the image
selection predicates, and the records its memory selection draws from.

Labels keep their dataset ids (no remapping, D15). Masking with value m:

| set                      | 0, 255 | current | old | future |
| training (and exemplars) | kept   | kept    | m   | m      |
| validation               | kept   | kept    | m   | m      |
| test                     | kept   | kept    | kept| m      |

(m = 0 in training; VOC 0 / ADE 255 in validation and test.)
"""
import torch

__all__ = ["mask_labels", "has_new_class", "only_seen_classes", "has_seen_class",
           "candidate_labels", "pseudo_label_background", "candidate_records",
           "CANDIDATE_THRESHOLD"]

CANDIDATE_THRESHOLD = 0.9


def mask_labels(label, new_classes, old_classes, masking_value, keep_old=False):
    """Values outside {0, 255} and the current classes (and the old ones with ``keep_old``,
    the test set) become ``masking_value``."""
    label = torch.as_tensor(label)
    keep = set(new_classes) | {0, 255} | (set(old_classes) if keep_old else set())
    kept = torch.isin(label, torch.tensor(sorted(keep), dtype=label.dtype))
    return torch.where(kept, label, torch.full_like(label, masking_value))


def _present(label):
    return set(torch.unique(torch.as_tensor(label)).tolist())


def has_new_class(label, new_classes):
    """Training and validation selection: a class of the current step is present."""
    return bool(_present(label) & set(new_classes))


def only_seen_classes(label, old_classes, new_classes):
    """Disjoint training selection: nothing outside old, current, 0 and 255."""
    return _present(label) <= set(old_classes) | set(new_classes) | {0, 255}


def has_seen_class(label, old_classes, new_classes):
    """Test selection: an old or current class is present."""
    return bool(_present(label) & (set(old_classes) | set(new_classes)))


def candidate_labels(label):
    """A memory candidate's label list: its distinct values, ascending, 0 removed (255 kept,
    D3)."""
    return sorted(_present(label) - {0})


def pseudo_label_background(labels, logits_old, threshold=CANDIDATE_THRESHOLD):
    """Step >= 2 candidates: where the label is 0 and the old model's best class score
    (sigmoid, first argmax over the class channels, auxiliary channel 0 excluded) is at least
    ``threshold``, the label becomes that class."""
    scores = torch.sigmoid(logits_old[:, 1:])
    best, index = scores.amax(dim=1), scores.argmax(dim=1)   # argmax: the first on ties
    relabel = (labels == 0) & (best >= threshold)
    return torch.where(relabel, (index + 1).to(labels.dtype), labels)


def candidate_records(names, labels, logits_old=None, threshold=CANDIDATE_THRESHOLD):
    """``[name, label list]`` for each image of a batch; with the old model's logits the
    background is pseudo-labelled first (steps >= 2)."""
    labels = torch.as_tensor(labels)
    if logits_old is not None:
        labels = pseudo_label_background(labels, logits_old, threshold)
    return [[name, candidate_labels(label)] for name, label in zip(names, labels)]
