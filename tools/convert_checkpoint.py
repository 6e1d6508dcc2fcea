"""Inspect a checkpoint, or rewrite its model keys with or without the ``module.`` prefix.

    python tools/convert_checkpoint.py FILE [--keys]
    python tools/convert_checkpoint.py FILE --strip-prefix -o OUT [--overwrite]
    python tools/convert_checkpoint.py FILE --add-prefix -o OUT [--overwrite]
    python tools/convert_checkpoint.py FILE --from-nest-swin -o OUT [--overwrite]

Reads step checkpoints (``model_state``, written by the original or by this project), In-Place
ABN ImageNet files (``state_dict``) and bare state dicts. Inspection prints the top-level
entries, where the model keys are, how many there are, whether they carry ``module.``, the
backbone their layout implies, the classes per step (from ``cls.<k>.weight``) and the epoch.

The original writes every model key with ``module.`` (its DDP wrapper) and reads only such
files; this project reads both. ``--strip-prefix`` / ``--add-prefix`` rewrite the model keys
(all other entries are kept as they are) into OUT, atomically. The input is never
overwritten, nor any existing file, unless ``--overwrite`` is given.

Swin bodies: the Swin release files (entry ``model``) and NeST's Swin checkpoints merge at the
end of a stage and save index buffers; ``--from-nest-swin`` rewrites such model keys into this
project's (timm's) layout: buffers dropped, ``layers.<i>.downsample`` -> ``layers.<i+1>``.

The file is loaded with ``weights_only=False`` (it holds optimiser states and plain Python
objects): use it only on files you trust.
"""
import argparse
import os
import re
import sys
from collections import OrderedDict

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from modules.resnet import RESNET_STRUCTURES  # noqa: E402
from modules.swin import infer_swin, merges_at_stage_end, nest_to_project_keys  # noqa: E402
from segmentation_module import PREFIX, add_module_prefix, strip_module_prefix  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    classes_in_state,
    is_unfinished,
    load_trusted,
)
from utils.errors import UserError  # noqa: E402

MODEL_ENTRIES = ("model_state", "state_dict", "model")


class ConvertError(UserError, RuntimeError):
    """Bad arguments or a file this tool cannot work on."""


def find_model_state(checkpoint):
    """(entry name or None for a bare state dict, the state dict)."""
    if isinstance(checkpoint, dict):
        for entry in MODEL_ENTRIES:
            if isinstance(checkpoint.get(entry), dict):
                return entry, checkpoint[entry]
        if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            return None, checkpoint
    raise ConvertError("no model state found (expected an entry 'model_state' or "
                       "'state_dict', or a bare state dict)")


def prefix_form(state):
    prefixed = sum(k.startswith(PREFIX) for k in state)
    if prefixed == len(state):
        return "prefixed"
    return "unprefixed" if prefixed == 0 else f"mixed ({prefixed} of {len(state)} prefixed)"


def infer_backbone(state):
    """The ResNet or Swin whose layout the keys follow (``body.`` optional), or None."""
    swin = infer_swin(state)
    if swin is not None:
        layout = ("Swin release / NeST layout, merging at stage ends"
                  if merges_at_stage_end(state) else "this project's (timm) layout")
        return f"{swin} ({layout})"
    blocks, bottleneck = {}, False
    for key in strip_module_prefix(state):
        match = re.match(r"(?:body\.)?mod([2-5])\.block(\d+)\.convs\.conv(\d)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block)
            bottleneck = bottleneck or match.group(3) == "3"
    structure = tuple(blocks.get(s, 0) for s in (2, 3, 4, 5))
    for name, (known, is_bottleneck) in RESNET_STRUCTURES.items():
        if known == structure and is_bottleneck == bottleneck:
            return name
    return None


def describe(checkpoint, path, list_keys=False):
    """The inspection report, as lines of text."""
    lines = [f"file: {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)"]
    if isinstance(checkpoint, dict):
        lines.append("top-level entries:")
        for key, value in checkpoint.items():
            if torch.is_tensor(value):
                what = f"tensor {list(value.shape)}"
            elif isinstance(value, dict):
                what = f"dict ({len(value)} entries)"
            elif isinstance(value, (int, float, str, bool)) or value is None:
                what = repr(value)
            else:
                what = type(value).__name__
            lines.append(f"  {key}: {what}")
    entry, state = find_model_state(checkpoint)
    tensors = [v for v in state.values() if torch.is_tensor(v)]
    lines.append(f"model keys: {len(state)} in {entry!r} "
                 f"({sum(t.numel() for t in tensors):,} values), {prefix_form(state)}")
    lines.append(f"backbone: {infer_backbone(state) or 'unknown layout'}")
    steps = classes_in_state(state)
    if steps:
        lines.append(f"classes per step: {steps} (total {sum(steps)}, steps 0..{len(steps) - 1})")
    else:
        lines.append("classes per step: none (no cls.<k>.weight: a body-only file)")
    if isinstance(checkpoint, dict) and "epoch" in checkpoint:
        lines.append(f"epoch: {checkpoint['epoch']}")
    lines += record_lines(checkpoint)
    plain = strip_module_prefix(state)
    if any(k.startswith("classifier.fc.") for k in plain):
        lines.append("ImageNet classifier: present (dropped when loading the body)")
    counters = sum(k.endswith("num_batches_tracked") for k in plain)
    if counters:
        lines.append(f"num_batches_tracked entries: {counters} (ignored when loading)")
    if list_keys:
        lines.append("keys:")
        lines += [f"  {k}\t{list(v.shape) if torch.is_tensor(v) else type(v).__name__}"
                  for k, v in state.items()]
    return lines


def record_lines(checkpoint):
    """What the checkpoint's record (``meta``, see utils/checkpoint.py) says of the run."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return ["written by: the original code or another tool (no record of the run)"]
    method = (meta.get("fingerprint") or {}).get("method")
    state = "unfinished" if is_unfinished(checkpoint) else "finished"
    return [f"written by: this project ({meta['format']}), {state} step {meta['step']} of "
            f"{meta['task']}-{meta['dataset']}, run '{meta['name']}', method {method}, "
            f"{meta['epochs']} epochs"]


def rewrite(checkpoint, add_prefix=False, from_nest_swin=False):
    """The checkpoint with its model keys prefixed (``add_prefix``) or stripped, or (with
    ``from_nest_swin``) a NeST Swin body's keys in this project's layout."""
    entry, state = find_model_state(checkpoint)
    if from_nest_swin:
        if infer_swin(state) is None or not merges_at_stage_end(state):
            raise ConvertError("--from-nest-swin: the model keys are not a Swin body in the "
                               "Swin release / NeST layout (no layers.0.downsample)")
        converted = nest_to_project_keys(state)
    else:
        converted = add_module_prefix(state) if add_prefix else strip_module_prefix(state)
    if entry is None:
        return converted
    out = OrderedDict(checkpoint) if isinstance(checkpoint, OrderedDict) else dict(checkpoint)
    out[entry] = converted
    return out


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file to read")
    p.add_argument("--keys", action="store_true", help="list every model key with its shape")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strip-prefix", action="store_true",
                      help="write the model keys without 'module.' (this project's plain form)")
    mode.add_argument("--add-prefix", action="store_true",
                      help="write the model keys with 'module.' (the original's form)")
    mode.add_argument("--from-nest-swin", action="store_true",
                      help="write a NeST Swin checkpoint's keys in this project's layout")
    p.add_argument("-o", "--output", help="where to write the rewritten checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="allow OUT to be an existing file, the input included")
    return p


def run(argv=None, out=sys.stdout):
    args = get_parser().parse_args(argv)
    rewriting = args.strip_prefix or args.add_prefix or args.from_nest_swin
    if args.output and not rewriting:
        raise ConvertError("-o is for a rewrite: add --strip-prefix or --add-prefix (or "
                           "--from-nest-swin)")
    if rewriting and not args.output:
        raise ConvertError("give the output file with -o OUT")
    if rewriting and os.path.exists(args.output) and not args.overwrite:
        same = os.path.abspath(args.output) == os.path.abspath(args.checkpoint)
        raise ConvertError(f"{args.output} " + ("is the input file" if same else "exists")
                           + "; pass --overwrite to replace it")
    checkpoint = load_trusted(args.checkpoint)
    for line in describe(checkpoint, args.checkpoint, list_keys=args.keys):
        print(line, file=out)
    if rewriting:
        converted = rewrite(checkpoint, add_prefix=args.add_prefix,
                            from_nest_swin=args.from_nest_swin)
        atomic_torch_save(converted, args.output)
        _, state = find_model_state(converted)
        print(f"wrote {args.output}: model keys {prefix_form(state)}", file=out)


def main(argv=None):
    try:
        run(argv)
    except UserError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
