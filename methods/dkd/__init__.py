"""DKD (Baek et al., NeurIPS 2022): decomposed knowledge distillation with sigmoid per-class
classifiers, an auxiliary "all negative" classifier that seeds every new one, and (DKD-M) an
exemplar memory (docs/behaviour.md §19).

This package holds DKD's numerical core, with DKD's names where it has them; the network is
``modules/dkd_deeplab.py``:

* ``losses``: the maps of L_mbce, L_kd (also L_pos, L_neg) and L_ac;
* ``iteration``: one training iteration's loss in DKD's order, at step 0 and at step >= 1;
* ``optim``: the four parameter groups and the two schedules;
* ``evaluation``: the sigmoid prediction rule, the evaluator and its scores (hIoU);
* ``labels``: label masking, image selection, memory candidates and their labels;
* ``memory``: DKD-M's selection (SSUL's round robin on DKD's candidates) and memory record.

It is not registered as a ``--method`` yet (options, the memory's storage and use in
training and the lifecycle hooks come later, docs/behaviour.md §19.10)."""
from .evaluation import DKDEvaluator, dkd_scores, evaluator_layout, log_strings, predict
from .iteration import DKDLosses, DKDWeights, dkd_losses, dkd_training_loss
from .labels import (
    candidate_labels,
    candidate_records,
    has_new_class,
    has_seen_class,
    mask_labels,
    only_seen_classes,
    pseudo_label_background,
)
from .losses import ac_map, channel_sum, kd_map, per_channel_mean, wbce_map
from .memory import memory_pool, select_memory, select_step_memory
from .optim import dkd_param_groups, dkd_scheduler, param_group_layout
from .presets import published_config

__all__ = ["DKDEvaluator", "dkd_scores", "evaluator_layout", "log_strings", "predict",
           "DKDLosses", "DKDWeights", "dkd_losses", "dkd_training_loss", "candidate_labels",
           "candidate_records", "has_new_class", "has_seen_class", "mask_labels",
           "only_seen_classes", "pseudo_label_background", "ac_map", "channel_sum", "kd_map",
           "per_channel_mean", "wbce_map", "dkd_param_groups", "dkd_scheduler",
           "param_group_layout", "published_config", "memory_pool", "select_memory",
           "select_step_memory"]
