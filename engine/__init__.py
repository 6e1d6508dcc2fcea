"""Running one incremental step: its plan (what to do with the files already there), its
parts (data, networks, optimiser, trainer), the epoch loop, evaluation and the test phase.
``run.py`` calls ``run_step`` for each step of the command line."""
from .evaluate import evaluate
from .step import run_step

__all__ = ["evaluate", "run_step"]
