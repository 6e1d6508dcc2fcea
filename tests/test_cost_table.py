"""tools/results_table.py --cost (tools/cost_table.py) on fabricated result files: figures per
step, the whole sequence (time summed, memory the highest step, parameters of the last step)
and the mean over seeds."""
import os

import tasks
from tools.results_table import main
from utils.results import write_step_results


def cost_record(step, seed):
    return {"params_trainable": 1_000_000 * (step + 1), "params_total": 2_000_000,
            "train_seconds": 60.0 * (step + 1) * seed, "step_seconds": 70.0,
            "train_images": 600 * (step + 1), "images_per_s": 10.0 / seed, "epochs_timed": 1,
            "peak_rss_mib": 1024.0 * (2 - step), "rss_scope": "step",
            "peak_cuda_mib": 2048.0 * (step + 1), "device": "cuda:0",
            "device_name": "Some GPU", "world_size": 2, "batch_per_process": 6,
            "accumulate": 2, "total_batch": 24}


def write(root, name, seed, step, cost=True):
    labels = tasks.get_task_dict("voc", "15-5", step)
    n = 16 + 5 * step
    iou = {c: 0.5 for c in range(n)}
    write_step_results(os.path.join(root, name, "results"), task="15-5", dataset="voc",
                       step=step, name=name, method="MiB", seed=seed,
                       opts={"overlap": True, "random_seed": seed}, labels_per_step=labels,
                       results={"Class IoU": iou, "Class Acc": iou, "Overall Acc": 0.9,
                                "Mean Acc": 0.5, "Mean IoU": 0.5},
                       cost=cost_record(step, seed) if cost else None)


def cost_rows(out):
    part = out.split("Table: cost")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in part.splitlines() if line.startswith("|")]
    return rows[0], {(r[0], r[2]): r for r in rows[2:]}


def test_cost_per_step_and_sequence(tmp_path, capsys):
    for seed in (1, 2):
        for step in (0, 1):
            write(tmp_path, f"MiB-s{seed}", seed, step)
    assert main([str(tmp_path), "--cost"]) == 0
    header, rows = cost_rows(capsys.readouterr().out)
    col = {name: i for i, name in enumerate(header)}
    step0, step1, seq = rows[("MiB", "0")], rows[("MiB", "1")], rows[("MiB", "all")]
    assert step0[col["trainable (M)"]] == "1.00" and step1[col["trainable (M)"]] == "2.00"
    # time: seeds 1 and 2 -> 1 and 2 minutes at step 0 (mean 1.5), 2 and 4 at step 1
    assert step0[col["train time (min)"]] == "1.50" and step1[col["train time (min)"]] == "3.00"
    assert seq[col["train time (min)"]] == "4.50"
    # images/s of the sequence: 1800 images in 180 s (seed 1) and 360 s (seed 2)
    assert seq[col["img/s"]] == f"{(1800 / 180 + 1800 / 360) / 2:.1f}"
    assert seq[col["peak RSS (GiB)"]] == "2.00" and seq[col["peak CUDA (GiB)"]] == "4.00"
    assert seq[col["trainable (M)"]] == "2.00" and seq[col["runs"]] == "2"
    assert step0[col["device x processes"]] == "Some GPU x2"
    assert seq[col["batch"]] == "24 = 6x2x2"


def test_a_step_without_cost_shows_a_dash_and_no_sequence_time(tmp_path, capsys):
    write(tmp_path, "MiB", 1, 0, cost=False)
    write(tmp_path, "MiB", 1, 1)
    assert main([str(tmp_path), "--cost"]) == 0
    header, rows = cost_rows(capsys.readouterr().out)
    i = header.index("train time (min)")
    assert rows[("MiB", "0")][i] == "–" and rows[("MiB", "1")][i] == "2.00"
    assert rows[("MiB", "all")][i] == "–" and rows[("MiB", "all")][-1] == "0"
