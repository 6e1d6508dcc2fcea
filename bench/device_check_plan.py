"""The device check's planner (bench/device_check.py): its constants, the two
configurations (the GPU run and the CPU dry run), the parts and the benchmark invocations
as data, and the rules that order them: what a part needs, which run together, and the
worst-case timetable against the budget."""
import dataclasses
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_DIR = os.path.join(ROOT, "device_bundle")
BUNDLE_LIMIT_MIB = 20
BUNDLE_MODULES = ("tensorboardX",)  # what run.py needs that the GPU machine lacks
SDIST_PATTERN = "inplace[-_]abn-*.tar.gz"
TASK, DATASET = "15-5", "voc"
TASK_NAME = f"{TASK}-{DATASET}"
METHODS = "FT,LWF,ILT,LWF-MC,MiB,EWC,PI,RW,PLOP"  # every method of bench/bench_train.py
JSON_NAME, TEXT_NAME, LOGS_NAME = "device_check.json", "device_check.txt", \
    "device_check-logs.tar.gz"
TAIL_CHARS = 3000

CHECK, BUILD, FIGURES = "check", "build", "figures"
# worst relative error ||compiled - torch|| / ||torch|| allowed per dtype
NORM_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
TARGETS = {"bf16_images_per_s": 250.0, "mib_vs_ft": 1.3, "loader_headroom": 2.0}


# --- configuration: the real run and the dry run ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that differs between the GPU run and the CPU dry run; the parts are the
    same code for both."""
    mode: str
    device: str
    backend: str
    backbone: str
    crop: int
    batch: int
    n_train: int
    n_val: int
    image_size: int
    workers: int
    threads: int
    precisions: tuple
    resume_precision: str
    exact_resume: bool
    iabn: str                 # build: from the bundle's source archive; installed: as found
    build_jobs: int
    budget_s: int
    bench_args: tuple
    bench_batches: str
    paper_batch: int
    bench_precisions: str
    methods_precision: str
    eval_precisions: str
    iabn_precisions: str
    data_workers: tuple
    data_images: int
    swin_args: tuple          # bench/bench_backbones.py: the first backbone is the base
    swin_limit_s: int
    compile_env: tuple = ()
    figures_alone: bool = True  # False: the figures parts run at the same time
    cuda_arch: str = "9.0"


def batch_ladder(gpu_gib, gib_per_image, headroom=0.8):
    """Training batches to try, from a memory estimate: the largest that should fit in
    ``headroom`` of the GPU, and a half and a quarter of it (multiples of 8), so no try is
    a forward that cannot fit. ResNet-101 OS16 at 512 px saves about 0.8 GiB of activations
    per image in fp32 (less under bf16/fp16: the fp32 estimate bounds every precision)."""
    top = int(headroom * gpu_gib / gib_per_image) // 8 * 8
    return ",".join(str(b) for b in sorted({max(top // 4 // 8 * 8, 8), max(top // 2 // 8 * 8, 8),
                                            max(top, 8)}))


GPU = Config(
    mode="cuda", device="cuda", backend="nccl", backbone="resnet101", crop=512, batch=8,
    n_train=48, n_val=16, image_size=512, workers=2, threads=4,
    precisions=("fp16", "bf16"), resume_precision="fp16", exact_resume=False, iabn="build",
    # the checks' worst case (90 + 300 + 90 s): every check starts; figures when time is left
    build_jobs=8, budget_s=480,
    bench_args=("--device", "cuda", "--iters", "5", "--warmup", "2"),
    bench_batches=batch_ladder(gpu_gib=78, gib_per_image=0.8), paper_batch=12,
    bench_precisions="fp32,bf16,fp16",
    # the compiled norm in both half precisions: it has fp16 kernels only, so under bf16
    # its layers run the PyTorch code (the bf16 rows should equal bench-train's)
    methods_precision="bf16", eval_precisions="fp32,bf16", iabn_precisions="bf16,fp16",
    # 40 loader batches of 12: several rounds of 16 workers' prefetching
    data_workers=(8, 16), data_images=480,
    # the Swin-B papers' crop and per-GPU batch (4 GPUs x 6 images of 512 px)
    swin_args=("--device", "cuda", "--size", "512", "--batch", "6", "--precision", "fp16",
               "--iters", "5", "--warmup", "2", "--backbones", "resnet101,swin_b"),
    swin_limit_s=150)

DRY_RUN = Config(
    mode="cpu-dry-run", device="cpu", backend="gloo", backbone="resnet18", crop=64, batch=4,
    n_train=20, n_val=10, image_size=64, workers=0, threads=1,
    precisions=("fp32", "bf16"), resume_precision="fp32", exact_resume=True, iabn="installed",
    build_jobs=2, budget_s=1200,   # covers the worst case: no part is left out for time
    bench_args=("--device", "cpu", "--quick", "--threads", "1", "--no-isolate",
                "--size", "64"),
    # bf16 is emulated on most CPUs (10x slower): the e2e and norm parts cover it here
    bench_batches="2,4", paper_batch=2, bench_precisions="fp32",
    methods_precision="fp32", eval_precisions="fp32", iabn_precisions="fp32",
    data_workers=(1, 2), data_images=8,
    # one image per batch would leave the ASPP's pooled map one value per channel: 2
    swin_args=("--device", "cpu", "--size", "64", "--batch", "2", "--iters", "1", "--warmup",
               "0", "--threads", "1", "--backbones", "resnet18,swin_t"),
    swin_limit_s=150,   # 65 s on a busy 2-core machine
    # inductor takes 80+ s for this network on a 2-core CPU: the dry run proves the plumbing
    compile_env=(("TORCHDYNAMO_DISABLE", "1"),),
    # toy figures mean nothing, so they need not be taken alone: half the time on 2 cores
    figures_alone=False)


# --- the plan ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of the check. ``run(ctx, deadline, outcome)`` records checks and figures;
    parts of one ``group`` run at the same time; a ``background`` part runs beside the
    following ones until a part that needs it starts."""
    name: str
    kind: str
    limit_s: int
    run: object
    needs: tuple = ()
    group: str = None
    background: bool = False


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One figures part: bench/run_all.py once per argument list in ``invocations``."""
    name: str
    limit_s: int
    invocations: tuple
    needs: tuple = ()
    env: tuple = ()
    iabn: bool = False


def bench_specs(cfg):
    common = (*cfg.bench_args, "--norm_impl", "torch")
    paper = str(cfg.paper_batch)
    train = ("--only", "train", "--precisions", cfg.bench_precisions)
    methods = ("--methods-batch", paper, "--methods-precision", cfg.methods_precision)
    return [
        BenchSpec("bench-train", 240, ((*common, *train, "--batches", cfg.bench_batches),)),
        BenchSpec("bench-methods", 180, ((*common, "--only", "methods,eval", "--no-isolate",
                                          "--methods", METHODS, *methods, "--eval-batch",
                                          paper, "--eval-precisions", cfg.eval_precisions),)),
        BenchSpec("bench-data", 150, tuple(
            (*common, "--only", "data", "--workers", str(w), "--methods-batch", paper,
             "--data-images", str(cfg.data_images)) for w in cfg.data_workers)),
        BenchSpec("bench-train-12", 150, ((*common, *train, "--batches", paper),)),
        BenchSpec("bench-compile", 240, ((*common, "--only", "methods", "--methods", "FT",
                                          "--compile", *methods),),
                  env=cfg.compile_env),
        BenchSpec("bench-iabn", 150, ((*cfg.bench_args, "--norm_impl", "inplace_abn", "--only",
                                       "train", "--precisions", cfg.iabn_precisions,
                                       "--batches", cfg.bench_batches),),
                  needs=("norm",), iabn=True),
    ]


def select(parts, names):
    """The parts named, with every part they need (transitively), in plan order."""
    by_name = {p.name: p for p in parts}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"error: unknown part '{unknown[0]}'; the parts are "
                         f"{', '.join(by_name)}")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs
    return [p for p in parts if p.name in wanted]


def batches(parts):
    """Consecutive parts of one group run together; every other part runs alone."""
    out = []
    for p in parts:
        if out and p.group and out[-1][0].group == p.group:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def time_plan(cfg, parts):
    """Worst-case timetable from the limits: each batch starts when the one before has
    used its whole limit (a background part overlaps the batches after it); a part starts
    only when the budget left covers its limit. Lines of text and the parts that would
    not start in the worst case."""
    lines, clock, late = [], 0, []
    for batch in batches(parts):
        limit = max(p.limit_s for p in batch)
        fits = [p.name for p in batch if cfg.budget_s - clock >= p.limit_s]
        late += [p.name for p in batch if p.name not in fits]
        names = ", ".join(p.name for p in batch)
        if batch[0].background:
            lines.append(f"  {clock:4d} s  {names} (background, up to {limit} s)")
            continue
        lines.append(f"  {clock:4d} s  {names} (up to {limit} s)"
                     + ("" if len(fits) == len(batch) else "  <- not started in the worst "
                        "case: budget"))
        clock += limit if fits else 0
    lines.append(f"  worst case {clock} s of a {cfg.budget_s} s budget; parts start as soon "
                 "as the ones before finish, so most start earlier")
    return lines, late


def print_plan(cfg, parts):
    print(f"plan ({cfg.mode}, budget {cfg.budget_s} s):")
    for p in parts:
        extra = (f", with {p.group}" if p.group else "") + (", background" if p.background
                                                            else "")
        needs = f", needs {', '.join(p.needs)}" if p.needs else ""
        print(f"  {p.name:15} {p.kind:8} limit {p.limit_s:4d} s{extra}{needs}")
    print("time plan (start by, worst case):")
    print("\n".join(time_plan(cfg, parts)[0]))
