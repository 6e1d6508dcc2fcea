"""The grid of a sweep expanded into runs: their names, the shared step-0 runs, the ``run.py``
commands of each, and what is already finished.

A *cell* is one method entry on one setting (task, disjoint or overlapped) with one seed and
one class order: the run ``<method>-<task>[-ov]-s<seed>[-o<order>]``, whose steps 1..N
continue from a step 0 trained once for every cell that trains step 0 the same way.

Which cells share a step 0: those whose step-0 options give equal keys (``step0_key``): the
signature of their step-0 parts (``methods.step0_signature``: FT, LwF, ILT, MiB and PLOP train
step 0 with plain cross-entropy; LwF-MC with BCE; EWC, PI and RW each collect their own
importances) and every option that shapes step 0 other than the presets' (task, dataset,
overlap, seed, class order, step-0 epochs and lr, batch, crop, backbone, ...). The shared run
is trained with the first registered method whose step 0 has that key (``FT`` for the
cross-entropy group), so its name, ``step0-FT-15-5-ov-s1``, does not depend on which methods a
sweep lists, and two sweeps of one ``out`` folder share it too.

Every command of a unit is parsed by ``argparser.parse_options`` here, so a bad option is one
``error:`` line before anything runs.
"""
import contextlib
import functools
import hashlib
import io
import os
from dataclasses import dataclass, field

import tasks
from utils.checkpoint import step_checkpoint_path
from utils.manifest import Manifest

from .spec import SweepError, epochs_per_step, option_args, shown

# options outside the checkpoint fingerprint that still change what a step-0 run produces
STEP0_EXTRA_KEYS = ("data_root", "pretrained_dir", "crop_val", "val_on_trainset")

# The options of a step-0 key, in order: the digest of the key names the shared step-0 runs
# of every sweep written so far, so this list is fixed (a moved declaration must not rename
# existing runs). It is the fingerprint's order when the original's method options were still
# part of the common list, then PLOP's options, then STEP0_EXTRA_KEYS. An option declared
# later (a new family's) joins the key only when its value differs from its default, after
# these, so that adding a family renames no run.
STEP0_KEY_ORDER = (
    "task", "dataset", "step", "epochs", "batch_size", "crop_size", "lr", "momentum",
    "weight_decay", "lr_policy", "lr_power", "lr_decay_step", "lr_decay_factor", "backbone",
    "output_stride", "norm_act", "overlap", "no_mask", "bce", "unce", "loss_kd", "unkd",
    "alpha", "loss_de", "init_balanced", "icarl", "icarl_importance", "icarl_disjoint",
    "icarl_bkg", "regularizer", "reg_importance", "reg_alpha", "reg_no_normalize",
    "reg_iterations", "fix_bn", "freeze", "random_seed", "cross_val", "train_void_as_ignore",
    "amp", "no_pretrained", "protocol", "class_order",
    "swin_shift_order", "swin_norm3_from_file", "head_rates_from_body", "body_lr_factor",
    "no_decay_norms",
    "pod", "pod_factor", "pod_options", "pod_prepro", "no_pod_schedule", "pod_logits",
    "pod_large_logits", "spp_scales", "pod_deeplab_mask", "pod_deeplab_mask_factor",
    "deeplab_mask_downscale", "pseudo", "threshold", "pseudo_nb_bins",
    "classif_adaptive_factor", "classif_adaptive_min_factor", "entropy_normalized",
    "true_median_thresholds", "pseudo_same_mask", "sync_thresholds", "classif_factor_bg_only",
    "pod_per_axis_tiles", "pod_logits_logsumexp", "pod_options_per_map", "pod_in_epoch_loss",
) + STEP0_EXTRA_KEYS


@dataclass
class Command:
    """One ``run.py`` command of a unit: its arguments (without ``--no_progress``), the task
    steps it trains and their epochs."""
    args: list
    steps: tuple
    epochs: int


@dataclass
class Unit:
    """One run folder of the sweep and the commands that fill it: a shared step-0 run
    (``kind`` "step0") or a cell of the grid ("cell"). ``after`` names the step-0 unit a
    cell starts from (the dependency ``tools.experiment.run_jobs`` waits for)."""
    name: str
    kind: str
    logdir: str              # <out>/logs/<task>-<dataset>/<name>: manifest, events, results
    console: str             # <out>/console/<name>.txt: the output of its commands
    commands: list
    after: str = None
    step0_checkpoint: str = None
    step0_logdir: str = None
    label: str = None        # the method entry (row of the table); the method of a step-0 run
    setting: object = None   # spec.TaskEntry
    seed: int = None
    order: int = 0
    shared_by: list = field(default_factory=list)   # step-0 units: the cells that use it

    @property
    def steps(self):
        return [s for c in self.commands for s in c.steps]

    @property
    def epochs(self):
        """{step: epochs} of the steps this unit trains."""
        return {s: c.epochs for c in self.commands for s in c.steps}

    @property
    def results_dir(self):
        return os.path.join(self.logdir, "results")


@dataclass
class Plan:
    sweep: object            # spec.Sweep
    step0: list              # the shared step-0 units
    cells: list              # the cells, in the order of the grid

    @property
    def units(self):
        return self.step0 + self.cells

    def unit(self, name):
        return next(u for u in self.units if u.name == name)

    def step0_saved(self):
        """Step-0 trainings the sharing saves: cells that start from a shared step 0, less
        the step-0 runs trained for them."""
        return sum(1 for c in self.cells if c.after) - len(self.step0)


# --- names and folders ------------------------------------------------------------------------

def run_suffix(setting, seed, order):
    """``15-1-ov-s1`` / ``15-1-ov-s1-o3``: the setting, seed and class order of a run."""
    return f"{setting.label}-s{seed}" + (f"-o{order}" if order else "")


def folders(sweep):
    """(logs, checkpoints, index lists, console logs) under the sweep's ``out``."""
    return tuple(os.path.join(sweep.out, f) for f in ("logs", "checkpoints", "index", "console"))


def base_args(sweep, setting, seed, order, name):
    logs, checkpoints, index, _ = folders(sweep)
    args = ["--data_root", sweep.data_root, "--dataset", setting.dataset, "--task", setting.task,
            "--random_seed", str(seed), "--name", name, "--logdir", logs,
            "--checkpoint_dir", checkpoints, "--index_dir", index]
    if setting.overlap:
        args.append("--overlap")
    if order:
        args += ["--class_order", str(order)]
    if sweep.task_file:
        args += ["--task_file", sweep.task_file]
    return args


def step_args(steps, epochs):
    return ["--step", ",".join(map(str, steps)), "--epochs", str(epochs)]


# --- parsing ----------------------------------------------------------------------------------

def parse(argv, name, where):
    """``argparser.parse_options(argv)``; a mistake is one SweepError line naming the run
    (argparse's own error line is caught instead of ending the process)."""
    import argparser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return argparser.parse_options(argv)
    except argparser.OptionError as e:
        raise SweepError(f"{where}: run {name}: {e}") from None
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1:] or ["invalid options"]
        text = message[0].removeprefix("error: ").removesuffix(" (see --help)")
        raise SweepError(f"{where}: run {name}: {text}") from None


@functools.lru_cache(maxsize=1)
def step0_option_keys():
    """The options of ``step0_key`` (the checkpoint fingerprint's, the methods' and
    ``STEP0_EXTRA_KEYS``, those of the presets left out: what they change at step 0 is in the
    signature): (the keys of ``STEP0_KEY_ORDER``, in its order; the later ones)."""
    import methods
    from utils.checkpoint import FINGERPRINT_KEYS
    preset = {k for m in methods.all_methods() for k in m.preset}
    keys = dict.fromkeys(FINGERPRINT_KEYS + methods.fingerprint_keys() + STEP0_EXTRA_KEYS)
    fixed = tuple(k for k in STEP0_KEY_ORDER if k in keys and k not in preset)
    later = tuple(k for k in keys if k not in STEP0_KEY_ORDER and k not in preset)
    return fixed, later


@functools.lru_cache(maxsize=1)
def _defaults():
    import argparser
    return vars(argparser.get_argparser().parse_args([]))


def step0_key(opts):
    """Equal for two step-0 options that train the same weights and trainer state."""
    import methods
    fixed, later = step0_option_keys()
    return (methods.step0_signature(opts),
            tuple((k, repr(getattr(opts, k))) for k in fixed)
            + tuple((k, repr(getattr(opts, k))) for k in later
                    if getattr(opts, k) != _defaults().get(k)))


def key_digest(key):
    return hashlib.sha1(repr(key).encode()).hexdigest()[:6]


# --- the grid ---------------------------------------------------------------------------------

def build_plan(sweep):
    """The ``Plan`` of a sweep: every cell, and one step-0 unit per distinct step 0."""
    plan = Plan(sweep, [], [])
    for setting in sweep.tasks:
        for seed in sweep.seeds:
            for order in setting.class_orders:
                plan_group(plan, sweep, setting, seed, order)
    return plan


def plan_group(plan, sweep, setting, seed, order):
    """The cells of one (setting, seed, class order), and the step-0 units they share."""
    where = shown(sweep.path)
    n_steps = tasks.num_steps(setting.dataset, tasks.canonical_task(setting.dataset, setting.task))
    suffix = run_suffix(setting, seed, order)
    console_dir = folders(sweep)[3]
    shared = {}       # step-0 key -> step-0 unit
    registry = registry_keys(sweep, setting, seed, order) if n_steps > 1 else {}
    for entry in sweep.methods:
        name = f"{entry.label}-{suffix}"
        options = sweep.options_of(setting, entry)
        epochs = epochs_per_step(options, n_steps)
        base = base_args(sweep, setting, seed, order, name) + option_args(options) + \
            ["--method", entry.method]
        own0 = parse(base + step_args([0], epochs[0]), name, where)
        cell = Unit(name, "cell", logdir_of(own0), os.path.join(console_dir, name + ".txt"), [],
                    label=entry.label, setting=setting, seed=seed, order=order)
        if n_steps == 1:       # e.g. offline (joint) training: nothing to share
            cell.commands.append(Command(base + step_args([0], epochs[0]), (0,), epochs[0]))
        else:
            key = step0_key(own0)
            if key not in shared:
                shared[key] = step0_unit(sweep, setting, seed, order, key, registry, entry,
                                         options, epochs[0])
                plan.step0.append(shared[key])
            first = shared[key]
            first.shared_by.append(name)
            cell.after, cell.step0_logdir = first.name, first.logdir
            cell.step0_checkpoint = first.step0_checkpoint
            cell.commands = cell_commands(base, epochs, first.step0_checkpoint)
        for command in cell.commands:
            parse(command.args, name, where)
        plan.cells.append(cell)


def registry_keys(sweep, setting, seed, order):
    """{step-0 key: method name} of every registered method with the setting's options (no
    method entry's own), the first method of each key kept: the canonical trainer of each
    kind of step 0."""
    import methods
    options = sweep.options_of(setting)
    epochs0 = epochs_per_step(options, 1)[0]
    keys = {}
    for method in methods.all_methods():
        argv = base_args(sweep, setting, seed, order, "step0") + option_args(options) + \
            ["--method", method.name] + step_args([0], epochs0)
        try:
            keys.setdefault(step0_key(parse(argv, "step0", "")), method.name)
        except SweepError:
            continue        # a method the setting's options rule out cannot train it
    return keys


def step0_unit(sweep, setting, seed, order, key, registry, entry, options, epochs0):
    """The shared step-0 run of ``key``: trained with the registered method of that key, or
    else with the first method entry that has it (then named with a digest of the key, so
    that it never takes the name of a run with other options)."""
    if key in registry:
        method, label = registry[key], registry[key]
        run_options = sweep.options_of(setting)
    else:
        method, label = entry.method, f"{entry.label}-{key_digest(key)}"
        run_options = options
    name = f"step0-{label}-{run_suffix(setting, seed, order)}"
    args = base_args(sweep, setting, seed, order, name) + option_args(run_options) + \
        ["--method", method] + step_args([0], epochs0)
    opts = parse(args, name, shown(sweep.path))
    _, checkpoints, _, console_dir = folders(sweep)
    return Unit(name, "step0", logdir_of(opts), os.path.join(console_dir, name + ".txt"),
                [Command(args, (0,), epochs0)],
                step0_checkpoint=step_checkpoint_path(checkpoints, opts.task_name, name, 0),
                label=method, setting=setting, seed=seed, order=order)


def cell_commands(base, epochs, step0_checkpoint):
    """The steps after step 0 under the cell's own name, step 1 from the shared step-0
    checkpoint (``--step_ckpt`` applies to the first step of a list): one command per run of
    steps with the same number of epochs."""
    commands = []
    step = 1
    while step < len(epochs):
        end = step
        while end + 1 < len(epochs) and epochs[end + 1] == epochs[step]:
            end += 1
        steps = tuple(range(step, end + 1))
        extra = ["--step_ckpt", step0_checkpoint] if step == 1 else []
        commands.append(Command(base + step_args(steps, epochs[step]) + extra, steps,
                                epochs[step]))
        step = end + 1
    return commands


def logdir_of(opts):
    return os.path.join(opts.logdir, opts.task_name, opts.name)


# --- what is finished -------------------------------------------------------------------------

def finished_steps(unit):
    """The steps of ``unit`` its manifest lists as finished."""
    manifest = Manifest(unit.logdir)
    return [s for s in unit.steps if manifest.finished(s)]


def is_finished(unit):
    """Every step finished, and the result file of the last one written."""
    return len(finished_steps(unit)) == len(unit.steps) and \
        os.path.isfile(os.path.join(unit.results_dir, f"step-{unit.steps[-1]}.json"))
