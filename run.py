"""Entry point: train (then test) one incremental step, or several in a row.

    python run.py --data_root data --dataset voc --task 15-5 --step 0 --method MiB ...
    torchrun --nproc_per_node=2 run.py ...
    python -m torch.distributed.launch --nproc_per_node=2 run.py ...

One code path for a plain process, torchrun and the legacy launcher; CPU or GPU. Every user
mistake ends with one line on stderr and exit code 1 (``--debug`` shows the traceback); the
work itself is in ``engine/``.
"""
import copy
import os
import sys

import torch
from tqdm import tqdm

import argparser
from engine import run_step
from utils import distributed
from utils.errors import UserError
from utils.run_lock import holding_run_folder


def options_for_step(opts, step):
    """The options of one step of the command line's list of steps."""
    step_opts = copy.copy(opts)
    step_opts.step = step
    step_opts.lr = argparser.lr_for_step(opts, step)
    if step != opts.steps[0]:
        step_opts.ckpt = None
        step_opts.step_ckpt = None
    return step_opts


def run_folder(opts):
    """The log folder of the run (every step of it), which its lock guards."""
    return os.path.normpath(os.path.join(opts.logdir, opts.task_name, opts.name))


def close_progress_bars():
    """Close the bars still open (an epoch or evaluation stopped half-way), so that the error
    or Ctrl-C message starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):   # made with the first bar
        bar.close()


def main(argv=None):
    try:
        opts = argparser.parse_options(argv)
    except argparser.OptionError as e:
        argparser.main_error(str(e))
    try:
        ctx = distributed.setup(opts.device, opts.local_rank)
    except UserError as e:
        argparser.main_error(str(e))
    try:
        argparser.resolve_runtime_options(opts, ctx.device)
        if ctx.device.type == "cuda":
            # fixed crop sizes: pick the fastest kernels once; with full-image evaluation
            # every new image size would start a new search
            torch.backends.cudnn.benchmark = opts.crop_val
        with holding_run_folder(run_folder(opts), ctx.is_main, ctx.device,
                                warn=lambda line: sys.stderr.write(f"warning: {line}\n")):
            for s in opts.steps:
                run_step(options_for_step(opts, s), ctx)
    except UserError as e:
        close_progress_bars()
        if opts.debug:
            raise
        argparser.main_error(str(e))
    except KeyboardInterrupt:
        close_progress_bars()
        sys.stderr.write("interrupted; rerun the same command to resume from the last "
                         "finished epoch\n")
        sys.exit(130)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
