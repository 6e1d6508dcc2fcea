"""The command line: every option of the original, the method presets, and our additions.

``parse_options(argv)`` is the one entry: it parses, applies the method preset and the
derived options exactly as the original does, validates combinations, and returns the
options namespace. Problems that make the run impossible raise ``OptionError`` (one line);
things worth knowing (a preset overriding an explicit option, an option the original
ignores) are collected in ``opts.warnings`` for the logger.

Run ``python argparser.py`` (or ``python run.py --help``) for the grouped option list.
"""
import argparse
import copy
import difflib
import os
import sys

import methods
import task_file
import tasks
from dataset.errors import DatasetLayoutError
from modules.backbones import backbone_choice
from utils.errors import OptionError  # noqa: F401  (argparser.OptionError, as before)
from utils.option_range import Range

# Method presets, declared by the methods (``methods/``), applied after parsing: they
# overwrite the options they set, as the original does. (The registry is read again at
# every parse, so a method registered later is known too.)
METHOD_PRESETS = methods.presets()
METHODS = list(METHOD_PRESETS)

# Options the original parses but never reads: option -> (dest, what happens here).
IGNORED_BY_ORIGINAL = {
    "--fusion-mode": ("fusion_mode", "it has no effect (the original never reads it either)"),
    "--num_classes": ("num_classes", "it is derived from --dataset (21 for voc, 150 for ade), "
                                     "as in the original"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, exit code 1 and the nearest valid spelling. The
    namespace keeps the parsed command line (``_argv``), so that
    ``modify_command_options`` can tell the options given explicitly from the defaults."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        ns, extras = super().parse_known_args(args, namespace)
        ns._argv = [str(a) for a in args]
        return ns, extras

    def error(self, message):
        hint = self._suggest(message)
        sys.stderr.write(f"error: {message}{hint} (see --help)\n")
        sys.exit(1)

    def _suggest(self, message):
        if "unrecognized arguments" not in message:
            return ""
        words = [w for w in message.split(":", 1)[1].split() if w.startswith("-")]
        known = [s for a in self._actions for s in a.option_strings]
        hints = []
        for w in words:
            near = difflib.get_close_matches(w.split("=")[0], known, n=1, cutoff=0.6)
            if near:
                hints.append(f"{w} -> did you mean {near[0]}?")
        return ("; " + "; ".join(hints)) if hints else ""


def _method(value):
    """Method names are case-insensitive here (the original accepts only its spelling)."""
    found = methods.find_method(value)
    if found is not None:
        return found.name
    names = methods.method_names()
    near = difflib.get_close_matches(value.upper(), [m.upper() for m in names], n=1)
    hint = ""
    if near:
        hint = f" (did you mean {names[[m.upper() for m in names].index(near[0])]}?)"
    raise argparse.ArgumentTypeError(
        f"unknown method '{value}'{hint}; valid: {', '.join(names)}")


def _steps(value):
    """``0``, ``0,1,2`` or ``all`` (resolved against the task later)."""
    if value.strip().lower() == "all":
        return "all"
    try:
        steps = [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid step '{value}': give a step number, a list such as 0,1,2, or all")
    if not steps or any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"invalid step '{value}': steps are numbers >= 0")
    return steps


def _floats(value):
    """One float, or a comma-separated list (one value per task step, the last repeats)."""
    try:
        vals = [float(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value '{value}': give a number or a comma-separated list of numbers")
    if not vals:
        raise argparse.ArgumentTypeError("empty value")
    return vals


# The original's method options, in the original's order (its --help and the namespace's
# order); their types, defaults and help are declared by the method families
# (``OPTIONS`` of ``methods/lwf.py``, ``mib.py``, ``ilt.py``, ``lwf_mc.py``, ``regularizers.py``).
ORIGINAL_METHOD_OPTIONS = (
    "bce", "unce", "loss_kd", "unkd", "alpha", "loss_de", "init_balanced", "icarl",
    "icarl_importance", "icarl_disjoint", "icarl_bkg", "regularizer", "reg_importance",
    "reg_alpha", "reg_no_normalize", "reg_iterations",
)


def _add_method_options(group):
    """The families' ``OPTIONS``: the original's in its order, then any others."""
    declared = methods.options()
    missing = [name for name in ORIGINAL_METHOD_OPTIONS if name not in declared]
    if missing:
        raise RuntimeError(f"no registered method family declares the original's option(s) "
                           f"{', '.join('--' + n for n in missing)}")
    names = ORIGINAL_METHOD_OPTIONS + tuple(n for n in declared
                                            if n not in ORIGINAL_METHOD_OPTIONS)
    for name in names:
        group.add_argument(f"--{name}", **declared[name])


def get_argparser():
    p = _Parser(description="MiB: incremental semantic segmentation (FT, LwF, LwF-MC, ILT, "
                            "EWC, RW, PI, MiB) on Pascal VOC 2012 and ADE20K.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("process and reproducibility")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="GPU index of this process; set by the launcher (torchrun sets the "
                        "LOCAL_RANK environment variable instead)")
    g.add_argument("--random_seed", type=int, default=42, help="seed of torch, numpy and random")
    g.add_argument("--num_workers", type=int, default=1,
                   help="data loader workers (also used to scan masks when building index lists)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="[new] auto = CUDA when available, else CPU; cpu forces the CPU")
    g.add_argument("--debug", action="store_true", default=False,
                   help="verbose logging and full tracebacks; lets step>0 start without the "
                        "previous checkpoint (as the original)")

    g = p.add_argument_group("data")
    g.add_argument("--data_root", type=str, default="data",
                   help="folder that holds PascalVOC12/ or ADEChallengeData2016/")
    g.add_argument("--dataset", type=str, default="voc", choices=["voc", "ade", "folder"],
                   help="dataset; folder: your own data in the layout of docs/custom_data.md")
    g.add_argument("--num_classes", type=int, default=None,
                   help="ignored: derived from --dataset (as in the original)")
    g.add_argument("--index_dir", type=str, default="data",
                   help="[new] root of the image index lists <index_dir>/<dataset>/<task>[-ov]/ "
                        "(the original uses data/ in the working directory; point it at a copy "
                        "of the original project's data/ folder to reuse its lists)")
    g.add_argument("--crop_size", type=int, default=512,
                   help="training crop side; also the validation resize/crop side")
    g.add_argument("--crop_val", action="store_false", default=True,
                   help="inverted flag, as in the original: PASSING it disables the validation "
                        "resize+center crop (full images, batch 1)")
    g.add_argument("--full_image_eval", action="store_true", default=False,
                   help="[new] evaluate on full images (the same as passing --crop_val)")
    g.add_argument("--no_mask", action="store_true", default=False,
                   help="do not map old-class pixels of the training set to background")
    g.add_argument("--overlap", "--overlapped", dest="overlap", action="store_true",
                   default=False, help="overlapped image selection (default: disjoint)")
    g.add_argument("--val_on_trainset", action="store_true", default=False,
                   help="run the final test on the training split instead of val")
    g.add_argument("--cross_val", action="store_true", default=False,
                   help="validate on a random 20%% of the step's training subset")
    g.add_argument("--protocol", type=str, default="mib", choices=["mib", "plop"],
                   help="[new] rules shared by every method: mib (the original's) or plop "
                        "(PLOP's label remapping, test reloading and ImageNet key cut, which "
                        "shape its published numbers; docs/behaviour.md §15.7)")
    g.add_argument("--train_void_as_ignore", action="store_true", default=False,
                   help="[fix] keep void pixels (VOC 255 borders, ADE 0) ignored in training "
                        "instead of training them as background")

    g = p.add_argument_group("task")
    g.add_argument("--task", type=str, default="19-1", metavar="TASK",
                   help=f"task split: {', '.join(tasks.get_task_list())}, or one of "
                        "--task_file")
    g.add_argument("--task_file", type=str, default=None, metavar="FILE",
                   help="[new] JSON or TOML file of task splits (dataset -> task -> step -> "
                        "labels), checked like the built-in ones (docs/tasks.md)")
    g.add_argument("--class_order", type=int, default=0,
                   help="[new] 0: the task's order of classes; k > 0 (VOC): the classes 1-20 "
                        "in the random order drawn with seed k, background first (index lists "
                        "go to <task>-o<k>); the result files record it")
    g.add_argument("--step", type=_steps, default="0",
                   help="step to run; [new] also a list (0,1,2) or all, run one after the other")
    g.add_argument("--step_ckpt", type=str, default=None,
                   help="previous-step checkpoint of the (first) step to run (default "
                        "<checkpoint_dir>/<task>-<dataset>_<name>_<step-1>.pth); with a list "
                        "of steps the later ones start from this run's own checkpoints, as "
                        "PLOP's code does")

    g = p.add_argument_group("method")
    g.add_argument("--method", type=_method, default=None, metavar="METHOD",
                   help=f"preset ({', '.join(methods.method_names())}; any letter case); "
                        "overwrites the options it sets, as in the original")
    g.add_argument("--explicit_overrides_preset", action="store_true", default=False,
                   help="[new] options given explicitly win over the --method preset "
                        "(the original lets the preset win)")
    _add_method_options(g)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="epochs of this step")
    g.add_argument("--batch_size", type=int, default=4,
                   help="batch size PER PROCESS (total = batch_size x processes)")
    g.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="[new] gradient accumulation: K batches per optimiser step (total "
                        "batch = batch_size x processes x K; BatchNorm statistics stay per "
                        "batch)")
    g.add_argument("--total_batch", type=int, default=None, metavar="N",
                   help="[new] the total batch per optimiser step: sets --accumulate to "
                        "N / (batch_size x processes), which must divide exactly")
    g.add_argument("--lr", type=_floats, default="0.007",
                   help="learning rate; [new] a list gives one value per task step "
                        "(0.01,0.001: step 0 at 0.01, later steps at 0.001)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum (hard-wired to 0.9 in the original; honoured here)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--body_lr_factor", type=float, default=1.0,
                   help="[new, fix W8] the body's learning rate is lr x this (1: one lr for "
                        "all, as MiB, PLOP and NeST with every backbone)")
    g.add_argument("--no_decay_norms", action="store_true", default=False,
                   help="[new, fix W8] no weight decay on the body's norm weights, biases "
                        "and relative-position tables (the Swin recipes' rule)")
    g.add_argument("--lr_policy", type=str, default="poly", choices=["poly", "step"],
                   help="learning-rate schedule, stepped every iteration")
    g.add_argument("--lr_decay_step", type=int, default=5000,
                   help="step schedule period (iterations)")
    g.add_argument("--lr_decay_factor", type=float, default=0.1, help="step schedule factor")
    g.add_argument("--lr_power", type=float, default=0.9, help="poly exponent")
    g.add_argument("--fix_bn", action="store_true", default=False,
                   help="freeze the affine parameters of every norm layer")
    g.add_argument("--freeze", action="store_true", default=False,
                   help="do not optimise the body")
    g.add_argument("--opt_level", type=str, default="O0", choices=["O0", "O1", "O2", "O3"],
                   help="apex level of the original: O0 = fp32; O1-O3 = autocast "
                        "(fp16 + loss scaling on CUDA, bf16 on CPU)")
    g.add_argument("--amp", type=str, default=None, choices=["off", "fp16", "bf16"],
                   help="[new] mixed precision explicitly; wins over --opt_level")
    g.add_argument("--skip_nonfinite", action="store_true", default=False,
                   help="[new] skip a batch whose loss is not finite instead of stopping")
    g.add_argument("--compile", action="store_true", default=False,
                   help="[new] torch.compile the model (falls back to eager if it fails)")
    g.add_argument("--channels_last", type=str, default="auto", choices=["auto", "on", "off"],
                   help="[new] channels-last memory format (auto: on with CUDA)")

    g = p.add_argument_group("network")
    g.add_argument("--backbone", type=backbone_choice, default="resnet101",
                   help="body: resnet18/34/50/101/152 (the original offers resnet50 and "
                        "resnet101); [new] swin_b (NeST's Swin-B, window 12), swin_b_22k, "
                        "swin_b_224, swin_l, swin_l_224, swin_t (timm), or timm:<model> for "
                        "any timm model with feature maps (docs/behaviour.md §20)")
    g.add_argument("--swin_shift_order", type=str, default="pad_then_shift",
                   choices=["pad_then_shift", "timm"],
                   help="[fix W6] Swin blocks: NeST's pad-then-shift (default) or timm's "
                        "shift-then-pad (other numbers wherever a map is padded)")
    g.add_argument("--swin_norm3_from_file", action="store_true", default=False,
                   help="[fix W2] start the Swin body's last stage norm from the ImageNet "
                        "file's final norm instead of 1/0")
    g.add_argument("--head_rates_from_body", action="store_true", default=False,
                   help="[fix W1] ASPP rates for the stride of the map the head reads (3/6/9 "
                        "on the stride-32 Swin body) instead of --output_stride's")
    g.add_argument("--output_stride", type=int, default=16, choices=[8, 16], help="output stride")
    g.add_argument("--no_pretrained", "--no-pretrained", dest="no_pretrained",
                   action="store_true", default=False, help="do not load ImageNet weights")
    g.add_argument("--pretrained_dir", type=str, default="pretrained",
                   help="[new] folder of the ImageNet weights: <backbone>_<norm_act>.pth.tar "
                        "for ResNets, the Swin release's file names for Swin")
    g.add_argument("--norm_act", type=str, default="iabn_sync",
                   choices=["iabn_sync", "iabn", "abn", "std"], help="norm + activation layers")
    g.add_argument("--norm_impl", type=str, default="auto",
                   choices=["auto", "torch", "inplace_abn"],
                   help="[new] implementation of the norm layers: torch (pure PyTorch, exact), "
                        "inplace_abn (the compiled package), auto (the package on CUDA when "
                        "installed, else torch)")
    g.add_argument("--fusion-mode", dest="fusion_mode", type=str, default="mean",
                   choices=["mean", "voting", "max"], help="ignored (as in the original)")
    g.add_argument("--pooling", type=int, default=32, help="eval-time pooling window of the head")

    g = p.add_argument_group("checkpoints, resume and test")
    g.add_argument("--checkpoint_dir", type=str, default="checkpoints/step",
                   help="[new] where step checkpoints go (the original's fixed folder)")
    g.add_argument("--ckpt", type=str, default=None,
                   help="checkpoint to resume from, or to test with --test")
    g.add_argument("--test", action="store_true", default=False,
                   help="only test (the trained checkpoint of the step, or --ckpt)")
    g.add_argument("--resume", type=str, default="auto", choices=["auto", "never"],
                   help="[new] auto: skip finished steps and continue an interrupted one from "
                        "its last epoch checkpoint; never: train from scratch")
    g.add_argument("--ckpt_interval", type=int, default=1,
                   help="epochs between resume checkpoints (ignored by the original)")
    g.add_argument("--overlap_in_names", action="store_true", default=False,
                   help="[fix] add -ov to checkpoint and log names of overlapped runs so they "
                        "do not overwrite the disjoint ones")

    g = p.add_argument_group("logging")
    g.add_argument("--logdir", type=str, default="./logs", help="TensorBoard and results root")
    g.add_argument("--name", type=str, default="Experiment", help="experiment name")
    g.add_argument("--sample_num", type=int, default=0,
                   help="validation batches whose first image is logged as a picture")
    g.add_argument("--visualize", action="store_false", default=True,
                   help="inverted flag, as in the original: PASSING it disables TensorBoard")
    g.add_argument("--print_interval", type=int, default=10, help="iterations between loss logs")
    g.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    g.add_argument("--no_progress", action="store_true", default=False,
                   help="[new] no progress bars")

    methods.add_arguments(p)     # the options of methods beyond the original's
    return p


def _explicit_dests(argv):
    """Names of the options that appear on the command line (to report preset overrides)."""
    parser = get_argparser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    ns, _ = parser.parse_known_args(argv)
    return set(vars(ns)) - {"_argv"}


def apply_method_preset(opts, explicit=frozenset()):
    """The original's preset step; returns one line per explicit option it overwrote."""
    notes = []
    if opts.method is None:
        return notes
    for key, value in methods.find_method(opts.method).preset.items():
        value = copy.deepcopy(value)          # a preset's dicts are not shared between runs
        given = getattr(opts, key)
        if key in explicit and given != value:
            if opts.explicit_overrides_preset:
                notes.append(f"--{key} {given} kept over the {opts.method} preset's {value} "
                             "(--explicit_overrides_preset)")
                continue
            notes.append(f"--method {opts.method} sets {key} = {value}, overriding the "
                         f"--{key} {given} you gave (as the original does; add "
                         "--explicit_overrides_preset to keep yours)")
        setattr(opts, key, value)
    return notes


def _derive(opts):
    """Derived options of the original (docs/behaviour.md §2.4)."""
    opts.num_classes = {"voc": 21, "ade": 150}.get(opts.dataset,
                                                   tasks.NUM_LABELS.get(opts.dataset))
    if not opts.visualize:
        opts.sample_num = 0
    opts.no_overlap = not opts.overlap
    opts.no_cross_val = not opts.cross_val
    opts.task_name = f"{opts.task}-{opts.dataset}"
    if opts.overlap and opts.overlap_in_names:
        opts.task_name = f"{opts.task}-ov-{opts.dataset}"
    return opts


def lr_for_step(opts, step):
    """Learning rate of a task step: the step-th value of --lr, the last one repeating."""
    return opts.lrs[min(step, len(opts.lrs) - 1)]


# Every numeric option with a range, checked in one place (``check_ranges``); the methods'
# own options declare theirs (``methods.option_ranges``). A ``None`` value means "unset".
OPTION_RANGES = {
    "lr": Range(0, warn_at=(0, "the weights never change; give a positive rate")),
    "momentum": Range(0, 1), "weight_decay": Range(0), "lr_decay_step": Range(1),
    "lr_decay_factor": Range(0, low_open=True), "lr_power": Range(0),
    "epochs": Range(1), "batch_size": Range(1), "crop_size": Range(16),
    "val_interval": Range(1), "ckpt_interval": Range(1), "print_interval": Range(1),
    "num_workers": Range(0), "sample_num": Range(0), "random_seed": Range(0, 2 ** 32 - 1),
    "pooling": Range(1), "accumulate": Range(1), "total_batch": Range(1),
    "body_lr_factor": Range(0, low_open=True),
}


def check_ranges(opts):
    """Refuse (``OptionError``) a numeric option outside its range; return warnings for the
    allowed values that are surely mistakes. ``--lr`` lists are checked value by value."""
    ranges = {**OPTION_RANGES, **methods.option_ranges()}
    warnings = []
    for key, allowed in ranges.items():
        given = getattr(opts, "lrs" if key == "lr" else key, None)
        values = given if isinstance(given, (list, tuple)) else [given]
        for value in values:
            if value is None:
                continue
            if allowed.problem(value) is not None:
                raise OptionError(f"--{key} must be {allowed.text()}, got {value:g}")
            if allowed.warn_at is not None and value == allowed.warn_at[0]:
                warnings.append(f"--{key} {value:g}: {allowed.warn_at[1]}")
    return warnings


def _step_list(step):
    """``opts.step`` as ``_steps`` gives it; an integer (the original's own scripts set
    ``opts.step = 1`` after parsing) is that one step."""
    if isinstance(step, bool) or not isinstance(step, (int, str, list, tuple)):
        raise OptionError(f"invalid step {step!r}: give a step number, a list or 'all'")
    if isinstance(step, (int, str)):
        try:
            return _steps(str(step))
        except argparse.ArgumentTypeError as e:
            raise OptionError(str(e))
    return list(step)


def _resolve_accumulation(opts, explicit):
    """--accumulate from --total_batch and the process count (WORLD_SIZE of the launcher)."""
    if opts.accumulate < 1:
        raise OptionError(f"--accumulate must be at least 1, got {opts.accumulate}")
    if opts.total_batch is None:
        return
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_step = opts.batch_size * world
    if opts.total_batch < per_step or opts.total_batch % per_step:
        raise OptionError(f"--total_batch {opts.total_batch} is not a multiple of --batch_size "
                          f"{opts.batch_size} x {world} process(es) = {per_step}; pick a "
                          "multiple or change --batch_size")
    k = opts.total_batch // per_step
    if "accumulate" in explicit and opts.accumulate != k:
        raise OptionError(f"--accumulate {opts.accumulate} and --total_batch "
                          f"{opts.total_batch} disagree ({opts.total_batch} = {opts.batch_size} "
                          f"x {world} x {k}); give one of them")
    opts.accumulate = k


def _validate(opts, explicit):
    warnings = []
    opts.step = _step_list(opts.step)
    # task and steps
    try:
        if opts.dataset == "folder":
            from dataset.folder import read_class_names
            tasks.add_dataset("folder", read_class_names(opts.data_root))
        if getattr(opts, "task_file", None):
            task_file.load_task_file(opts.task_file)
        canonical = tasks.canonical_task(opts.dataset, opts.task)
    except (tasks.TaskError, DatasetLayoutError) as e:
        raise OptionError(str(e))
    if canonical != opts.task:
        warnings.append(f"task '{opts.task}' is the paper's name of '{canonical}'; "
                        f"files use '{canonical}'")
        opts.task = canonical
    try:
        tasks.class_permutation(opts.dataset, opts.class_order)
    except tasks.TaskError as e:
        raise OptionError(str(e))
    n = tasks.num_steps(opts.dataset, opts.task)
    steps = list(range(n)) if opts.step == "all" else opts.step
    bad = [s for s in steps if s >= n]
    if bad:
        raise OptionError(f"step {bad[0]} does not exist in task '{opts.task}' of "
                          f"'{opts.dataset}'; valid steps: 0..{n - 1}")
    if steps != sorted(set(steps)):
        raise OptionError(f"steps must be increasing and distinct, got {','.join(map(str, steps))}")
    if len(steps) > 1 and (steps[1:] != list(range(steps[0] + 1, steps[-1] + 1))):
        raise OptionError("a list of steps must be consecutive (each step starts from the "
                          "previous one's checkpoint)")
    opts.steps = steps
    opts.step = steps[0]
    opts.lrs = opts.lr
    opts.lr = lr_for_step(opts, opts.step)

    if len(opts.lrs) > n:
        # a warning, not an error: one sweep gives one --lr list to tasks of every length
        warnings.append(f"--lr gives {len(opts.lrs)} values but task '{opts.task}' of "
                        f"'{opts.dataset}' has {n} steps: the last {len(opts.lrs) - n} are "
                        "not used")
    warnings += check_ranges(opts)
    _resolve_accumulation(opts, explicit)

    # contradictions
    if opts.test and len(opts.steps) > 1:
        raise OptionError("--test takes one step; give --step N")
    if opts.ckpt is not None and len(opts.steps) > 1:
        raise OptionError("--ckpt belongs to one step; give --step N or drop --ckpt "
                          "(interrupted steps resume by themselves with --resume auto)")
    if opts.protocol == "plop" and opts.no_mask and opts.dataset == "voc":
        raise OptionError("--no_mask does not exist under --protocol plop for VOC (PLOP's code "
                          "stops there); drop one of them")
    if opts.step_ckpt is not None and opts.step == 0:
        warnings.append("--step_ckpt is ignored at step 0 (there is no previous step)")
    if opts.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise OptionError("--device cuda given but no CUDA device is available; "
                              "use --device cpu or auto")

    # options that do nothing in this combination
    if opts.full_image_eval:
        opts.crop_val = False
    warnings += methods.check_options(opts, explicit)
    for option, (dest, why) in IGNORED_BY_ORIGINAL.items():
        if dest in explicit:
            warnings.append(f"{option} is ignored: {why}")
    if opts.step > 0 and opts.method is None and methods.plain_fine_tuning(opts):
        warnings.append("no --method and no loss option given: step>0 runs plain "
                        "fine-tuning (FT)")
    return warnings


def modify_command_options(opts):
    """Finish a namespace of ``get_argparser().parse_args(...)`` as the original's function
    of this name does, and as ``parse_options`` does: the method preset, validation, the
    derived options, ``opts.lr`` as the float of this step. Raises ``OptionError``."""
    if getattr(opts, "_finished", False):
        return opts
    explicit = _explicit_dests(getattr(opts, "_argv", []))
    if not isinstance(opts.lr, list):     # a namespace built by hand with a float lr
        opts.lr = [float(opts.lr)]
    notes = apply_method_preset(opts, explicit)
    notes += _validate(opts, explicit)
    _derive(opts)
    opts.explicit = sorted(explicit)
    opts.warnings = notes
    opts._finished = True
    return opts


def parse_options(argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into the options of a run: the same as
    ``modify_command_options(get_argparser().parse_args(argv))``."""
    return modify_command_options(get_argparser().parse_args(argv))


def resolve_runtime_options(opts, device):
    """Turn the ``auto`` choices (precision, norm implementation, memory format) into the
    concrete ones for ``device``."""
    if opts.amp is None:
        opts.amp = "off" if opts.opt_level == "O0" else \
            ("fp16" if device.type == "cuda" else "bf16")
    from modules.norm import resolve_norm_impl
    opts.norm_impl = resolve_norm_impl(opts.norm_impl, device)
    if opts.channels_last == "auto":
        opts.channels_last = "on" if device.type == "cuda" else "off"
    return opts


def build_options(argv=(), device=None, **values):
    """Complete options for code that runs a piece of the project without the command line
    (tests, benchmarks): ``parse_options(argv)``, resolved for ``device`` (default the CPU),
    then ``values`` set as given (no preset or validation applies to them)."""
    import torch
    opts = resolve_runtime_options(parse_options([str(a) for a in argv]),
                                   torch.device(device or "cpu"))
    for key, value in values.items():
        if not hasattr(opts, key):
            raise OptionError(f"build_options: there is no option '{key}'")
        setattr(opts, key, value)
    return opts


def main_error(message):
    """Print one error line and exit with status 1 (used by the entry points)."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


if __name__ == "__main__":
    get_argparser().print_help()
