"""Building one step, in the original's order (docs/behaviour.md §10.1): seeds, datasets and
loaders (with what the method's parts add), the networks (the parts' ``network`` hook, the
previous step's weights in the new and the old model), the parts' ``before_step`` hooks,
optimiser (the parts' groups) and scheduler, the DDP / compile wrappers, the trainer. Each
function returns what it builds."""
import copy
import inspect
import random
from dataclasses import dataclass

import numpy as np
import torch

import methods
import tasks
from dataset.factory import get_dataset, index_folder
from dataset.loader import MappingDataset, build_loader
from engine.body_groups import body_param_groups
from segmentation_module import make_model
from train import Trainer, optimizer_steps
from utils import distributed, eta
from utils.checkpoint import (
    CheckpointError,
    check_checkpoint_fits,
    classes_in_state,
    is_unfinished,
    load_model_state,
)
from utils.compile import maybe_compile, unwrap
from utils.errors import RunError
from utils.runtime import Runtime
from utils.scheduler import make_scheduler


@dataclass
class StepData:
    train: object
    val: object
    test: object
    n_classes: int            # classes seen so far (the metrics' size)
    train_loader: object
    val_loader: object
    test_loader: object


@dataclass
class StepModels:
    model: torch.nn.Module          # the bare network being trained
    model_old: torch.nn.Module      # the previous step's network (None at step 0)
    train_model: torch.nn.Module    # ``model`` inside its DDP / compile wrappers
    optimizer: torch.optim.Optimizer
    scheduler: object
    prev_trainer_state: dict        # what the previous step carried over (or None)


def set_seeds(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_data(opts, ctx, logger, training=True, method=None):
    """Datasets (index lists written by rank 0 first; the method's extra maps and training
    set) and their loaders, which yield mappings (``dataset.loader.as_mapping``)."""
    set_seeds(opts.random_seed)
    extra_maps = method.extra_maps() if method is not None and training else ()
    train_dst, val_dst, test_dst, n_classes = distributed.main_first(
        lambda: get_dataset(opts, rank=ctx.rank, extra_maps=extra_maps))
    random.seed(opts.random_seed)  # the dataset build may have used the generator
    if method is not None and training:
        train_dst = method.training_set(train_dst)
    logger.info(f"Dataset: {opts.dataset}, train set: {len(train_dst)}, "
                f"val set: {len(val_dst)}, test set: {len(test_dst)}, n_classes: {n_classes}")
    if training and len(train_dst) == 0:
        raise RunError(f"no training image of step {opts.step} of {opts.task} in "
                       f"{opts.data_root}; check --data_root and the index lists in "
                       f"{index_folder(opts)}")
    common = dict(num_workers=opts.num_workers, seed=opts.random_seed, rank=ctx.rank,
                  world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
    train_loader = build_loader(MappingDataset(train_dst), opts.batch_size, shuffle=True,
                                drop_last=True, **common)
    eval_batch = opts.batch_size if opts.crop_val else 1
    val_loader = build_loader(MappingDataset(val_dst), eval_batch, shuffle=True,
                              drop_last=False, **common)
    test_loader = build_loader(MappingDataset(test_dst), eval_batch, shuffle=True,
                               drop_last=False, **common)
    if training and len(train_loader) == 0:
        raise RunError(f"the training set of step {opts.step} has {len(train_dst)} images, "
                       f"fewer than one batch of {opts.batch_size} per process; lower "
                       "--batch_size")
    return StepData(train_dst, val_dst, test_dst, n_classes, train_loader, val_loader,
                    test_loader)


def runtime_of(opts, ctx):
    """The step's runtime (precision, memory format, device): ``utils.runtime.Runtime``."""
    return Runtime.from_options(opts, ctx.device)


def memory_format(opts):
    return Runtime.from_options(opts, "cpu").memory_format


def make_network(opts, classes, pretrained=True, method=None, role="train"):
    """A network for ``classes``; ImageNet weights only when asked and the options want them
    (weights that a checkpoint overwrites need no ImageNet file: same numbers). ``method``'s
    parts may change it for its ``role`` (``train``, ``old`` or ``final``)."""
    net_opts = opts
    if not pretrained and not opts.no_pretrained:
        net_opts = copy.copy(opts)
        net_opts.no_pretrained = True
    net = make_model(net_opts, classes=classes)
    return method.network(net, role) if method is not None else net


def default_groups(model, opts):
    """The optimiser groups body (``body_param_groups``), head, classifiers
    (docs/behaviour.md §7.1), trainable parameters only; one group of every trainable
    parameter for a network a method built without that layout."""
    if not all(hasattr(model, n) for n in ("body", "head", "cls")):
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": opts.weight_decay}]
    groups = [] if opts.freeze else body_param_groups(model.body, opts)
    return groups + [{"params": [p for p in getattr(model, n).parameters() if p.requires_grad],
                      "weight_decay": opts.weight_decay} for n in ("head", "cls")]


def make_optimizer(model, opts, method=None):
    """SGD with Nesterov momentum over ``default_groups``, or the method's groups."""
    groups = default_groups(model, opts)
    if method is not None:      # the parts' own groups; lr_factor scales --lr
        groups = [dict(g, lr=opts.lr * g["lr_factor"]) if "lr_factor" in g else g
                  for g in method.optimizer_groups(groups, model)]
    kernel = sgd_kernel(next(model.parameters()).is_cuda, opts.amp)
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=True, **kernel)


def sgd_kernel(on_cuda, amp):
    """SGD's implementation keyword: one fused kernel for all parameters on CUDA; the same
    update rule everywhere. Not under fp16: when the loss scaler skips the first step (an
    overflow), the fused kernel returns before it fills the momentum buffers it allocated,
    and every later step reads that garbage; the default kernel allocates them only on a
    step it takes."""
    return {"fused": True} if on_cuda and amp != "fp16" else {}


def wrap_ddp(model, ctx):
    """DDP when there are several processes; the model itself otherwise."""
    if ctx.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # no buffer broadcast in forward, as the original's apex DDP (the keyword was renamed)
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    # a timm body's stage norms get no gradient when no loss reads them (docs §20, W11)
    unused = getattr(getattr(unwrap(model), "body", None), "has_unused_parameters", False)
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused,
                                   **{no_sync: False})


def step_info(opts, ctx, classes, logger=None):
    return methods.StepInfo(opts, list(classes), ctx.device, rank=ctx.rank,
                            world_size=ctx.world_size, logger=logger)


def step_state(opts, ctx, model, model_old, data, logger):
    """What ``before_step`` and ``after_step`` hooks work on."""
    return methods.StepState(model=model, model_old=model_old, train_loader=data.train_loader,
                             device=ctx.device, logger=logger,
                             amp_dtype=runtime_of(opts, ctx).amp_dtype)


def build_models(opts, ctx, classes, data, method, logger, prev_ckpt=None, prev_path=None):
    """The network (and the old one at step > 0) as the method's parts build them, with the
    previous step's weights, the parts' ``before_step`` hooks run on them (every step), the
    optimiser with the parts' groups, the scheduler, the wrappers. No random number is drawn
    between the network's initialisation and ``before_step``."""
    later = opts.step > 0
    model = make_network(opts, classes, pretrained=not later, method=method, role="train")
    model_old = (make_network(opts, classes[:-1], pretrained=False, method=method, role="old")
                 if later else None)
    if opts.fix_bn:
        model.fix_bn()
    runtime = runtime_of(opts, ctx)
    runtime.place(model)
    if model_old is not None:
        runtime.place(model_old)
    prev_trainer_state = None
    if later:
        prev_trainer_state = load_previous_step(opts, classes, model, model_old, prev_ckpt,
                                                prev_path, logger)
    method.before_step(step_state(opts, ctx, model, model_old, data, logger))
    optimizer = make_optimizer(model, opts, method)
    # the poly schedule counts optimiser steps (--accumulate K: one per K batches)
    n_steps = opts.epochs * optimizer_steps(len(data.train_loader), opts.accumulate)
    scheduler = make_scheduler(optimizer, opts.lr_policy, n_steps,
                               power=opts.lr_power, decay_step=opts.lr_decay_step,
                               decay_factor=opts.lr_decay_factor)
    train_model = maybe_compile(wrap_ddp(model, ctx), opts.compile)
    return StepModels(model, model_old, train_model, optimizer, scheduler, prev_trainer_state)


def load_previous_step(opts, classes, model, model_old, ckpt, path, logger):
    """The previous step's weights into the new network (its newest classifier stays as
    built) and the old one (strictly, then frozen). Returns its trainer state."""
    state = None
    if ckpt is None:
        logger.warning(f"previous-step checkpoint {path} not found; continuing because of "
                       "--debug (the old model keeps random weights)")
    else:
        check_checkpoint_fits(ckpt, path, opts, network_classes(model_old),
                              "previous-step checkpoint")
        if is_unfinished(ckpt):
            msg = (f"previous-step checkpoint {path} is from an unfinished run (epoch "
                   f"{ckpt['epoch'] + 1} of {ckpt['meta']['epochs']}); finish step "
                   f"{opts.step - 1} first")
            if not opts.debug:
                raise CheckpointError(msg)
            logger.warning(msg)
        source = f"previous-step checkpoint {path}"
        load_model_state(model, ckpt["model_state"], strict=False, source=source)
        load_model_state(model_old, ckpt["model_state"], strict=True, source=source)
        state = ckpt.get("trainer_state")
        logger.info(f"[!] Previous model loaded from {path}")
    for p in model_old.parameters():
        p.requires_grad = False
    model_old.eval()
    return state


def network_classes(net):
    """Classes per step of ``net``'s classifiers (``cls.<k>``): what a checkpoint must hold
    to load into it (a method's network may add channels, or have no such classifiers)."""
    return classes_in_state(unwrap(net).state_dict())


def build_trainer(opts, ctx, classes, models, method, logger):
    trainer = Trainer(models.train_model, models.model_old, ctx.device, opts,
                      trainer_state=models.prev_trainer_state, classes=classes, logger=logger,
                      method=method, dist=ctx)
    steps = getattr(opts, "steps", [opts.step])
    added = eta.new_classes(tasks.get_per_task_classes(opts.dataset, opts.task, max(steps)))
    trainer.later_share = eta.later_steps_share(added, opts.step, steps)
    return trainer
