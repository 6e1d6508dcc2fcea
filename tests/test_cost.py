"""Cost in the result files: parameters, training time, throughput, peak memory, device and
the effective batch (the run accumulates 2 batches per optimiser step)."""
import json

import pytest
import torch

import run
import tasks
from argparser import build_options
from engine.build import make_network
from utils.cost import StepCost, count_parameters

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4",
        "--epochs", "1", "--lr", "0.01", "--num_workers", "0", "--no_progress"]


pytestmark = pytest.mark.slow


def run_here(argv):
    try:
        run.main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), f"run.py exited with {e.code}"


def test_count_parameters_splits_frozen_ones():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    assert count_parameters(net) == (4 + 10, 12 + 4 + 10)
    cost = StepCost(net, torch.device("cpu"))
    cost.add_epoch(10, 2.0)
    cost.add_epoch(6, 2.0)
    record = cost.record()
    assert record["train_images"] == 16 and record["images_per_s"] == 4.0
    assert record["epochs_timed"] == 2 and record["peak_cuda_mib"] is None
    assert record["device"] == "cpu" and record["world_size"] == 1


def test_result_files_carry_the_cost_of_each_step(synthetic_voc, workdir):
    args = ["--data_root", synthetic_voc, "--dataset", "voc", "--task", "15-5", *TINY,
            "--name", "cost", "--accumulate", "2"]
    run_here(args + ["--step", "0,1"])
    docs = [json.loads((workdir / f"logs/15-5-voc/cost/results/step-{s}.json").read_text())
            for s in (0, 1)]
    opts = build_options(["--dataset", "voc", "--task", "15-5", *TINY])
    for step, doc in enumerate(docs):
        cost = doc["cost"]
        net = make_network(opts, tasks.get_per_task_classes("voc", "15-5", step),
                           pretrained=False)
        own = sum(p.numel() for p in net.parameters())
        assert cost["params_total"] == own and cost["params_trainable"] == own   # FT
        assert 0 < cost["train_seconds"] <= cost["step_seconds"]
        assert cost["epochs_timed"] == 1
        # the training images of the step (drop_last: a multiple of the batch)
        assert cost["train_images"] > 0 and cost["train_images"] % 4 == 0
        assert cost["images_per_s"] == pytest.approx(
            cost["train_images"] / cost["train_seconds"], rel=1e-3)
        size_mib = sum(p.numel() * p.element_size() for p in net.parameters()) / 2 ** 20
        assert cost["peak_rss_mib"] >= size_mib
        assert cost["device"] == "cpu" and cost["peak_cuda_mib"] is None
        assert cost["rss_scope"] in ("step", "process")
        assert (cost["batch_per_process"], cost["accumulate"], cost["total_batch"]) == (4, 2, 8)
    # step 1 has more output channels: more parameters than step 0
    assert docs[1]["cost"]["params_total"] > docs[0]["cost"]["params_total"]
    # a --test rerun rewrites the figures and keeps the training cost
    run_here(args + ["--step", "1", "--test"])
    again = json.loads((workdir / "logs/15-5-voc/cost/results/step-1.json").read_text())
    assert again["cost"] == docs[1]["cost"] and again["mean_iou"] == docs[1]["mean_iou"]
