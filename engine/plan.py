"""Where a step's files are, and what to do with the ones already there (docs/behaviour.md
§10.7, §10.9): every input is checked before anything is built or written.

The plan of a step is one of ``test`` (``--test``), ``ckpt`` (continue from ``--ckpt``),
``auto`` (continue an interrupted run from its last epoch checkpoint), ``fresh`` or ``done``
(finished with the same options: skipped)."""
import os
from dataclasses import dataclass

import methods
from utils.checkpoint import fingerprint, fingerprint_changes, load_trusted, step_checkpoint_path
from utils.errors import RunError


@dataclass(frozen=True)
class StepPaths:
    logdir: str      # <logdir>/<task>-<dataset>/<name>: TensorBoard, log.txt, results, records
    ckpt: str        # this step's checkpoint
    prev: str        # the previous step's checkpoint (None at step 0)


def step_paths(opts):
    prev = None
    if opts.step > 0:
        prev = opts.step_ckpt or step_checkpoint_path(opts.checkpoint_dir, opts.task_name,
                                                      opts.name, opts.step - 1)
    return StepPaths(logdir=os.path.join(opts.logdir, opts.task_name, opts.name),
                     ckpt=step_checkpoint_path(opts.checkpoint_dir, opts.task_name, opts.name,
                                               opts.step),
                     prev=prev)


def run_fingerprint(opts, world_size):
    """The fingerprint of this step: the common options and those of every method."""
    return fingerprint(opts, world_size, methods.fingerprint_keys())


def preflight(opts, paths, manifest, world_size):
    """Check every input file and folder; return the plan."""
    if not os.path.isdir(opts.data_root):
        raise RunError(f"data root {opts.data_root} does not exist; get the data with "
                       f"data/download_{opts.dataset}.sh or point --data_root at it")
    if opts.ckpt is not None and not os.path.isfile(opts.ckpt):
        raise RunError(f"--ckpt {opts.ckpt} does not exist (the original silently ignores "
                       "this and trains from scratch; give an existing file or drop --ckpt)")
    if opts.test:
        if opts.ckpt is None and not os.path.isfile(paths.ckpt):
            raise RunError(f"--test: no trained checkpoint for step {opts.step} at "
                           f"{paths.ckpt}; train the step first (same command without "
                           "--test) or name a checkpoint with --ckpt")
        return "test"
    if paths.prev is not None and not os.path.isfile(paths.prev) and not opts.debug:
        how = ("--step_ckpt names it" if opts.step_ckpt else
               f"make it with the same command and --step {opts.step - 1}")
        raise RunError(f"previous-step checkpoint {paths.prev} does not exist; {how} (all "
                       "steps of a task need the same --name and --checkpoint_dir)")
    if opts.step == 0 and not opts.no_pretrained:
        from segmentation_module import pretrained_path, require_pretrained
        require_pretrained(pretrained_path(opts.backbone, opts.norm_act, opts.pretrained_dir),
                           opts.backbone)
    for folder in (opts.checkpoint_dir, paths.logdir):
        check_writable(folder)
    if opts.ckpt is not None:
        return "ckpt"
    if opts.resume == "never":
        return "fresh"
    if manifest.check_finished_checkpoint(opts.step):
        check_finished_with_same_options(manifest, opts, paths.ckpt, world_size)
        return "done"
    if os.path.isfile(paths.ckpt):
        return "auto"
    return "fresh"


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {folder}: {e.strerror}; choose another folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"{folder} is not writable; fix its permissions or choose another "
                       "folder (--checkpoint_dir / --logdir)")


def check_finished_with_same_options(manifest, opts, path, world_size):
    """A finished step is skipped only when it was trained with the options given now."""
    recorded = manifest.entry(opts.step).get("fingerprint")
    if recorded is None:      # a manifest written before fingerprints were recorded
        recorded = (load_trusted(path, "checkpoint").get("meta") or {}).get("fingerprint")
    if recorded is None:
        return
    diff = fingerprint_changes(recorded, run_fingerprint(opts, world_size))
    if diff:
        raise RunError(f"step {opts.step} of {opts.task_name}/{opts.name} finished with other "
                       f"options ({'; '.join(diff)}); rerun with --resume never to train it "
                       "again with these options (its checkpoint and results are replaced), "
                       "or choose another --name")
