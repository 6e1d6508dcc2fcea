"""Losses, regularisers, schedules, logging, checkpoints and distributed helpers."""
from .scheduler import PolyLR, make_scheduler  # noqa: F401  (original import path utils.PolyLR)
