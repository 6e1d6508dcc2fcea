"""DKD's published configurations (docs/behaviour.md §19.1): its two configuration files'
defaults and what its published scripts change per step, as DKD's configuration keys. The
``--method DKD`` presets and the sweep file are to be derived from these (the mapping of the
keys to this project's options is in docs/behaviour.md §19.10).

Every published script runs 4 processes (the batch size here is per process), overlapped
setting, the same number of epochs at every step, and at step >= 1 ``--freeze_bn`` and a
memory size (0 for DKD, 100 on VOC / 300 on ADE for DKD-M)."""
import copy

__all__ = ["DEFAULTS", "SCRIPT_ARGS", "MEMORY_SIZE", "PROCESSES", "PUBLISHED_TASKS",
           "published_config"]

PROCESSES = 4
MEMORY_SIZE = {"voc": 100, "ade": 300}
PUBLISHED_TASKS = {"voc": ("19-1", "15-5", "15-1", "10-1", "5-3"),
                   "ade": ("100-50", "100-10", "50-50")}

_HYPER = {"pos_weight": 1, "mbce": 1, "kd": 5, "dkd_pos": 5, "dkd_neg": 5, "ac": 1}
DEFAULTS = {
    "voc": {"seed": 1, "use_amp": True,
            "arch_args": {"output_stride": 16, "norm_act": "bn_sync",
                          "backbone_pretrained": True, "freeze_all_bn": False},
            "task": {"name": "15-1", "step": 0, "setting": "overlap", "idxs_path": "./data/"},
            "train_batch_size": 32, "mem_size": 0,
            "optimizer_args": {"lr": 0.001, "weight_decay": 0.0001, "momentum": 0.9,
                               "nesterov": True},
            "hyperparameter": dict(_HYPER),
            "lr_scheduler": {"type": "PolyLR", "args": {}},
            "epochs": 60, "validation_period": -1, "save_period": -1,
            "val_masking_value": 0, "test_masking_value": 0},
}
DEFAULTS["ade"] = copy.deepcopy(DEFAULTS["voc"])
DEFAULTS["ade"].update(
    task={"name": "100-50", "step": 0, "setting": "overlap", "idxs_path": "./data/"},
    train_batch_size=24, optimizer_args=dict(DEFAULTS["voc"]["optimizer_args"], lr=0.0025),
    hyperparameter=dict(_HYPER, pos_weight=35),
    lr_scheduler={"type": "WarmupPolyLR", "args": {"warmup_iters": 0.2}}, epochs=100,
    val_masking_value=255, test_masking_value=255)

# what the published scripts pass beyond the task: step 0 / steps >= 1
SCRIPT_ARGS = {
    "voc": ({"lr": 0.001, "train_batch_size": 8, "pos_weight": 2},
            {"lr": 0.0001, "train_batch_size": 8, "freeze_all_bn": True}),
    "ade": ({"lr": 0.0025, "train_batch_size": 6},
            {"lr": 0.00025, "train_batch_size": 6, "freeze_all_bn": True}),
}


def published_config(dataset, task, step, memory=False, setting="overlap"):
    """DKD's effective configuration of one step of a published script (DKD-M with
    ``memory``): the defaults of its configuration file with the script's arguments."""
    if dataset not in DEFAULTS:
        raise ValueError(f"DKD publishes VOC and ADE scripts, not {dataset!r}")
    cfg = copy.deepcopy(DEFAULTS[dataset])
    args = SCRIPT_ARGS[dataset][0 if step == 0 else 1]
    cfg["name"] = "DKD"
    cfg["test"] = False
    cfg["multiprocessing_distributed"] = True
    cfg["task"].update(name=task, step=step, setting=setting)
    cfg["train_batch_size"] = args["train_batch_size"]
    cfg["optimizer_args"]["lr"] = args["lr"]
    cfg["arch_args"]["freeze_all_bn"] = args.get("freeze_all_bn", False)
    if "pos_weight" in args:
        cfg["hyperparameter"]["pos_weight"] = args["pos_weight"]
    cfg["mem_size"] = MEMORY_SIZE[dataset] if memory and step > 0 else 0
    return cfg
