"""One runtime object decides precision, autocast, memory format and a batch's way to the
device (utils/runtime.py); the epoch loop and the checkpoint code ask the trainer for what they
need instead of reading its internals."""
import logging
import re
from pathlib import Path

import torch
from trainer_helpers import TinySegNet

from argparser import build_options
from train import Trainer
from utils.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def test_the_options_decide_precision_and_memory_format():
    fp16 = Runtime.from_options(build_options(amp="fp16", channels_last="on"), "cpu")
    assert fp16.amp_dtype == torch.float16 and fp16.loss_scaling and fp16.channels_last
    assert fp16.memory_format == torch.channels_last
    assert fp16.full_precision().amp_dtype is None and fp16.full_precision().channels_last
    bf16 = Runtime.from_options(build_options(amp="bf16", channels_last="off"), "cpu")
    assert bf16.amp_dtype == torch.bfloat16 and not bf16.loss_scaling
    assert not bf16.grad_scaler().is_enabled()
    off = Runtime.from_options(build_options(amp="off"), "cpu")
    with off.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_batch_goes_to_the_device_as_the_runtime_says():
    runtime = Runtime(torch.device("cpu"), None, channels_last=True)
    images = runtime.images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert runtime.labels(torch.zeros(2, 8, 8, dtype=torch.uint8)).dtype == torch.long
    extras = runtime.extras({"saliency": torch.ones(2, 8, 8), "name": "x"})
    assert extras["name"] == "x" and torch.equal(extras["saliency"], torch.ones(2, 8, 8))
    net = runtime.place(torch.nn.Conv2d(3, 4, 3))
    assert net.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_trainer_hands_over_its_scaler_state_and_skip_report(caplog):
    opts = build_options(amp="bf16", channels_last="on")
    trainer = Trainer(TinySegNet([3]), None, torch.device("cpu"), opts, classes=[3])
    assert trainer.runtime == Runtime(torch.device("cpu"), torch.bfloat16, True)
    assert trainer.scaler_state() == trainer.scaler.state_dict()
    settings = trainer.validation_settings()
    assert settings["device"] is trainer.runtime and settings["predict"] == trainer.predict
    trainer.skipped_batches, trainer.scaler_skipped_steps = 2, 3
    with caplog.at_level(logging.INFO):
        trainer.log_skips(logging.getLogger("t"))
    assert "2 batches skipped" in caplog.text and "skipped 3 optimiser steps" in caplog.text


def test_the_loop_and_the_checkpoint_code_read_no_trainer_internals():
    internals = re.compile(r"trainer\.(scaler\b|amp_dtype|channels_last|skipped_batches|"
                           r"scaler_skipped_steps)")
    for name in ("engine/loop.py", "engine/step.py", "utils/checkpoint.py"):
        assert not internals.search((ROOT / name).read_text()), name
