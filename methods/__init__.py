"""The incremental methods: one module per family, each declaring its ``--method`` names,
preset, loss parts and hooks (see ``methods/base.py``); ``docs/adding_a_method.md`` shows how
to add one.

The order of registration is the order in which the terms of a step add up (the original's:
output distillation, feature distillation, iCaRL), so it is part of the numbers."""
from . import ft, ilt, lwf, lwf_mc, mib, plop, rcil, regularizers
from .base import Batch, MainLoss, Method, Part, Penalty, StepInfo, StepState, Term
from .registry import (
    StepMethod,
    add_arguments,
    all_methods,
    assemble,
    check_options,
    families,
    find_method,
    fingerprint_keys,
    method_names,
    option_ranges,
    options,
    plain_fine_tuning,
    presets,
    register,
    state_keys,
    step0_signature,
)

for _family in (ft, lwf, mib, ilt, lwf_mc, regularizers, plop, rcil):
    register(_family)

__all__ = ["Batch", "MainLoss", "Method", "Part", "Penalty", "StepInfo", "StepState", "Term",
           "StepMethod", "add_arguments", "all_methods", "assemble", "check_options",
           "families", "find_method", "fingerprint_keys", "method_names", "option_ranges",
           "options", "plain_fine_tuning", "presets", "register", "state_keys", "step0_signature"]
