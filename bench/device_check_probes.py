"""The device check's probes (bench/device_check.py ``--probe NAME``): a few lines of torch
each, run in a fresh process so that a crash or a hang there cannot take the check down;
each returns a JSON-able dict."""
import os
import platform
import subprocess
import sys
import tempfile

# --- probes (run in a subprocess by Context.probe) --------------------------------------------

def probe_imports(args):
    found = {}
    for module in args.modules.split(","):
        try:
            mod = __import__(module)
            found[module] = {"version": getattr(mod, "__version__", None),
                             "file": getattr(mod, "__file__", None) or ""}
        except Exception as e:  # ImportError, or a build that does not fit this torch
            found[module] = {"error": f"{type(e).__name__}: {e}"}
    return found


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def _collective(torch, backend, device):
    """One all_reduce in a process group of one on ``backend``."""
    import torch.distributed as dist
    with tempfile.TemporaryDirectory() as folder:
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} \
            if device == "cuda" else {}
        dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0,
                                world_size=1, **kwargs)
        try:
            t = torch.arange(4.0, device=device)
            dist.all_reduce(t)
            values = t.tolist()
        finally:
            dist.destroy_process_group()
    return {"ok": values == [0.0, 1.0, 2.0, 3.0], "device": device,
            "detail": f"{values} for [0, 1, 2, 3]"}


def _nccl_version(torch):
    version = torch.cuda.nccl.version()  # a tuple in torch 2, an int before
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def probe_env(args):
    import numpy
    import torch
    import torchvision
    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "memory_gib": p.total_memory / 2 ** 30,
                     "capability": f"{p.major}{p.minor}", "multiprocessors":
                     p.multi_processor_count})
    info = {"python": platform.python_version(), "executable": sys.executable,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "cuda_available": cuda, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": _nccl_version(torch) if cuda else None,
            "driver": _driver_version() if cuda else None, "gpus": gpus,
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gib": _memory_gib(),
            "platform": platform.platform()}
    device = "cuda" if args.device == "cuda" and cuda else "cpu"
    try:
        info["collective"] = _collective(torch, args.backend, device)
    except Exception as e:  # reported as a failed check
        info["collective"] = {"ok": False, "device": device, "detail": f"{type(e).__name__}: {e}"}
    return info


def _saved_mib(torch, layer, x, minimum):
    """``layer(x)`` and the MiB of the activation-sized tensors (at least ``minimum``
    elements, one count per storage) that autograd keeps for backward: the figure the
    in-place layer exists to shrink."""
    storages = {}

    def pack(t):
        if t.numel() >= minimum:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return y, sum(storages.values()) / 2 ** 20


def _norm_case(torch, norm_act_factory, norm_act, dtype, layout, mode, device):
    """Relative errors ||compiled - torch|| / ||torch|| of the output, the gradients of the
    input, weight and bias, and the running statistics after one step; and per
    implementation the MiB saved for backward and (CUDA) the peak of the step.
    ``mode`` "train-sync": the layers take their synchronising code (the process group of
    one is taken for two processes), as they do on every step of a multi-GPU run."""
    import modules.norm as norm
    g = torch.Generator().manual_seed(0)
    channels = 64
    ours = norm_act_factory(norm_act, "torch")(channels)
    with torch.no_grad():
        w = torch.rand(channels, generator=g) + 0.5
        w[::2] *= -1  # mixed signs, as in the ImageNet weights: |w| + eps in iabn
        ours.weight.copy_(w)
        ours.bias.copy_(torch.randn(channels, generator=g))
        ours.running_mean.copy_(torch.randn(channels, generator=g))
        ours.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    theirs = norm_act_factory(norm_act, "inplace_abn")(channels)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, channels, 32, 32, generator=g) * 2 + 0.7
    upstream = torch.randn(x.shape, generator=g)
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    low = getattr(torch, dtype)
    cuda = device == "cuda"
    found, memory = {}, {}
    group_size = norm._process_group_size
    if mode == "train-sync":
        norm._process_group_size = lambda group: 2
    try:
        for label, layer in (("torch", ours), ("compiled", theirs)):
            layer = layer.to(device).train(mode != "eval")
            leaf = x.to(device, low, copy=True).contiguous(memory_format=fmt).requires_grad_()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.autocast(device, dtype=low, enabled=low != torch.float32):
                # the package writes into its input: a copy of the leaf
                y, saved = _saved_mib(torch, layer, leaf.clone(), x.numel())
            (y.float() * upstream.to(device)).sum().backward()
            memory[label] = {"saved_mib": saved}
            if cuda:
                torch.cuda.synchronize()
                memory[label]["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            found[label] = {"output": y.float(), "input grad": leaf.grad.float(),
                            "weight grad": layer.weight.grad, "bias grad": layer.bias.grad,
                            "running mean": layer.running_mean,
                            "running var": layer.running_var}
    finally:
        norm._process_group_size = group_size
    errors = {}
    for key, ref in found["torch"].items():
        other = found["compiled"][key].detach().double()
        ref = ref.detach().double()
        errors[key] = float((other - ref).norm() / ref.norm().clamp_min(1e-30))
    return errors, memory


def _process_group_of_one(torch, backend, device):
    """A real process group (one process, a file store) for the sync layers to find."""
    import torch.distributed as dist
    folder = tempfile.mkdtemp(prefix="norm-probe-")
    kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} \
        if device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0,
                            world_size=1, **kwargs)
    return f"{backend}, 1 process"


def probe_norm(args):
    import torch
    import torch.distributed as dist

    from modules.norm import norm_act_factory
    device = args.device
    dtypes = ["float32", "bfloat16"] + (["float16"] if device == "cuda" else [])
    group = _process_group_of_one(torch, args.backend, device)
    cases = []
    try:
        for dtype in dtypes:
            for norm_act in ("iabn_sync", "iabn", "abn"):
                modes = ("train", "eval") + (("train-sync",) if norm_act == "iabn_sync" else ())
                for layout in ("contiguous", "channels-last"):
                    for mode in modes:
                        case = {"dtype": dtype, "norm_act": norm_act, "layout": layout,
                                "mode": mode}
                        try:
                            case["errors"], case["memory"] = _norm_case(
                                torch, norm_act_factory, norm_act, dtype, layout, mode,
                                device)
                        except Exception as e:  # reported as a failed check
                            case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        cases.append(case)
    finally:
        dist.destroy_process_group()
    return {"device": device, "group": group, "cases": cases}


def probe_gpu_path(args):
    from device_check_gpu_path import probe_gpu_path as probe
    return probe(args)


PROBES = {"env": probe_env, "imports": probe_imports, "norm": probe_norm,
          "gpu-path": probe_gpu_path}
