"""The real training and evaluation code (``train.Trainer``), timed per iteration.

    python bench/bench_train.py --methods FT,MiB --size 128 --backbone resnet18

Each method trains step 1 of VOC 15-5 (classes 16 + 5) through ``Trainer.train`` on a small
in-memory loader, with the options that ``run.py`` would resolve for it (method preset,
``--amp``, channels-last, norm implementation): FT is the baseline; LwF adds the old model's
forward and KD, ILT also the feature distillation, LwF-MC the BCE + iCaRL terms, MiB the
unbiased CE and KD, EWC / PI / RW the regulariser update, the penalty and its backward, PLOP
the old model's maps, the pseudo-labels and local POD (its thresholds are computed before
the timed iterations, as run.py does before a step).
Regularised methods start from the state a step-0 regulariser saves. Evaluation is
``engine.evaluate`` without an old model, as the test phase runs it.

``bench/run_all.py`` calls :func:`measure_method` and :func:`measure_eval`; each runs in a
fresh process there so that its peak memory is its own.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import common  # noqa: E402

# display name -> --method spelling; FT first: it is the baseline
METHODS = {"FT": "FT", "LwF": "LWF", "ILT": "ILT", "LwF-MC": "LWF-MC", "MiB": "MiB",
           "EWC": "EWC", "PI": "PI", "RW": "RW", "PLOP": "PLOP"}
AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
DATASET, TASK = "voc", "15-5"


def method_name(value):
    for name in METHODS:
        if name.lower() == value.lower():
            return name
    raise common.BenchError(f"unknown method '{value}'; expected some of {', '.join(METHODS)}")


def trainer_options(method="FT", *, step=1, backbone="resnet101", output_stride=16,
                    norm_act="iabn_sync", impl="auto", size=512, batch=2, precision="fp32",
                    channels_last=None, device="cpu", compile=False):
    """The options ``run.py`` would train with: parsed by ``argparser.parse_options`` and
    resolved for the device (``argparser.build_options``)."""
    import argparser
    device = torch.device(device)
    argv = ["--dataset", DATASET, "--task", TASK, "--step", str(step),
            "--method", METHODS[method_name(method)], "--backbone", backbone,
            "--output_stride", str(output_stride), "--norm_act", norm_act, "--norm_impl", impl,
            "--no_pretrained", "--batch_size", str(batch), "--crop_size", str(size),
            "--amp", AMP[precision], "--no_progress", "--device", device.type]
    if channels_last is not None:
        argv += ["--channels_last", "on" if channels_last else "off"]
    if compile:
        argv.append("--compile")
    return argparser.build_options(argv, device=device)


def synthetic_batches(count, batch, size, n_classes, device, seed=0):
    """``count`` (images, labels) batches on the host, as a loader yields them (pinned on
    CUDA): random images, labels in [0, n_classes) with a border of 255 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    pin = torch.device(device).type == "cuda"
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=g)
        labels = torch.randint(0, n_classes, (batch, size, size), generator=g)
        labels[:, :2] = 255
        out.append((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))
    return out


def build_models(opts, device, train_loader=None):
    """Current and old model (step > 0) as the engine builds them, and the step's method
    with its ``before_step`` hooks run (MiB's balanced initialisation; PLOP's thresholds
    over ``train_loader``): old model frozen in eval mode, the chosen memory format."""
    import methods
    import tasks
    from engine.build import make_network, memory_format
    from train import AMP_DTYPES
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    model = make_network(opts, classes).to(device, memory_format=memory_format(opts))
    model_old = None
    method = methods.assemble(methods.StepInfo(opts, classes, device))
    if opts.step > 0:
        model_old = make_network(opts, classes[:-1]).to(device,
                                                        memory_format=memory_format(opts))
        for p in model_old.parameters():
            p.requires_grad = False
        model_old.eval()
        method.before_step(methods.StepState(model, model_old, train_loader, device,
                                             amp_dtype=AMP_DTYPES[opts.amp]))
    return model, model_old, classes, method


def tasks_classes(opts):
    import tasks
    return tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)


def previous_trainer_state(opts, model_old, device):
    """What a step-0 run with this method leaves in its checkpoint for the regulariser (an
    un-updated state: the penalty costs the same whatever the importances are)."""
    if not opts.regularizer or model_old is None:
        return None
    from methods.regularizers import make_regularizer
    params = list(model_old.parameters())
    for p in params:  # at step 0 this network was being trained: every parameter counts
        p.requires_grad = True
    state = make_regularizer(model_old, None, device, opts, None).state_dict()
    for p in params:
        p.requires_grad = False
    return {"regularizer": state}


def measure_method(method="FT", *, backbone="resnet101", output_stride=16, norm_act="iabn_sync",
                   impl="auto", size=512, batch=2, precision="fp32", channels_last=None,
                   device="cpu", warmup=1, iters=2, threads=None, compile=False):
    """Seconds per ``Trainer.train`` iteration of ``method`` at step 1, and peak memory."""
    from engine.build import make_optimizer
    from train import Trainer
    from utils.compile import maybe_compile
    from utils.scheduler import PolyLR
    device = torch.device(device)
    common.set_threads(threads)
    torch.manual_seed(0)
    baseline = common.memory_baseline(device)
    opts = trainer_options(method, step=1, backbone=backbone, output_stride=output_stride,
                           norm_act=norm_act, impl=impl, size=size, batch=batch,
                           precision=precision, channels_last=channels_last, device=device,
                           compile=compile)
    classes = tasks_classes(opts)
    batches = synthetic_batches(warmup + iters, batch, size, sum(classes), device)
    model, model_old, classes, step_method = build_models(opts, device, train_loader=batches)
    optimizer = make_optimizer(model, opts)
    scheduler = PolyLR(optimizer, max_iters=warmup + iters + 1)
    trainer = Trainer(maybe_compile(model, opts.compile), model_old, device, opts,
                      trainer_state=previous_trainer_state(opts, model_old, device),
                      classes=classes, method=step_method)
    if warmup:
        trainer.train(0, optimizer, batches[:warmup], scheduler=scheduler)
    common.sync(device)
    common.reset_peak_memory(device)
    seconds = common.timed(lambda: (trainer.train(1, optimizer, batches[warmup:],
                                                  scheduler=scheduler),
                                    common.sync(device))) / iters
    return {"method": method_name(method), "precision": precision,
            "channels_last": opts.channels_last == "on", "norm_impl": opts.norm_impl,
            "size": size, "batch": batch, "seconds": seconds, "images_per_s": batch / seconds,
            "peak_mib": common.peak_memory_mib(device, baseline)}


def measure_eval(*, backbone="resnet101", output_stride=16, norm_act="iabn_sync", impl="auto",
                 size=512, batch=2, precision="fp32", channels_last=None, device="cpu",
                 warmup=1, iters=2, threads=None):
    """Images/s of ``engine.evaluate`` (model only, metrics on the device), as the test
    phase runs it, at batch ``batch`` (``--crop_val`` validates at the training batch)."""
    from engine import evaluate
    from metrics import StreamSegMetrics
    from train import AMP_DTYPES
    device = torch.device(device)
    common.set_threads(threads)
    torch.manual_seed(0)
    baseline = common.memory_baseline(device)
    opts = trainer_options("FT", step=1, backbone=backbone, output_stride=output_stride,
                           norm_act=norm_act, impl=impl, size=size, batch=batch,
                           precision=precision, channels_last=channels_last, device=device)
    model, _, classes, _ = build_models(opts, device)
    metrics = StreamSegMetrics(sum(classes))
    batches = synthetic_batches(warmup + iters, batch, size, sum(classes), device)

    def run(part):
        return evaluate(model, part, metrics, device, AMP_DTYPES[opts.amp],
                        channels_last=opts.channels_last == "on", progress=False)
    if warmup:
        run(batches[:warmup])
    common.sync(device)
    common.reset_peak_memory(device)
    seconds = common.timed(lambda: run(batches[warmup:])) / iters
    return {"precision": precision, "channels_last": opts.channels_last == "on",
            "norm_impl": opts.norm_impl, "size": size, "batch": batch, "seconds": seconds,
            "images_per_s": batch / seconds, "peak_mib": common.peak_memory_mib(device, baseline)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-iteration cost of each method's training "
                                            "(Trainer.train, step 1) relative to FT.")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=list(AMP))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    methods = [method_name(m) for m in args.methods.split(",")]
    methods = ["FT"] + [m for m in methods if m != "FT"]  # FT first: the base row
    rows = []
    for m in methods:
        row = {"method": m}
        try:
            row.update(common.run_isolated(
                measure_method, m, backbone=args.backbone, size=args.size, batch=args.batch,
                precision=args.precision, device=str(device), warmup=args.warmup,
                iters=args.iters, threads=args.threads))
        except common.IsolatedError as e:
            row["error"] = str(e)
        rows.append(row)
    base = rows[0].get("seconds")
    for r in rows:
        r["x_ft"] = r["seconds"] / base if base and r.get("seconds") else None
    print(f"Trainer.train at step 1 of {DATASET} {TASK}: {args.backbone}, {args.size}x{args.size}, "
          f"batch {args.batch}, {args.precision}, {common.device_name(device)}")
    print(common.format_table([("method", "method"), ("seconds", "s/iter"),
                               ("images_per_s", "images/s"), ("peak_mib", "peak MiB"),
                               ("x_ft", "x FT time"), ("error", "error")], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
