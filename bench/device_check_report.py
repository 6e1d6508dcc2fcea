"""The device check's report (bench/device_check.py): the figures' text, the comparisons
and targets drawn from them, the verdict, and the files written under OUT
(``device_check.json``, ``device_check.txt``, the logs archive)."""
import dataclasses
import glob
import io
import json
import os
import tarfile

from device_check_plan import CHECK, JSON_NAME, LOGS_NAME, TARGETS, TEXT_NAME


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def mib_text(mib):
    return "-" if mib is None else (f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB")


def row_text(row):
    head = f"{row['section']} {row['case']}" + (f", batch {row['batch']}"
                                                 if row.get("batch") else "")
    if row.get("error"):
        return f"{head}: error: {row['error'][:200]}"
    bits = [f"{row['images_per_s']:.4g} images/s"] if row.get("images_per_s") else []
    if row.get("peak_mib") is not None:
        bits.append(f"peak {mib_text(row['peak_mib'])}")
    if row.get("tflops") is not None:
        bits.append(f"{row['tflops']:.3g} TFLOP/s")
    if row.get("mfu_pct") is not None:
        bits.append(f"MFU {row['mfu_pct']:.1f}%")
    if row.get("x_base") is not None:
        bits.append(f"{row['x_base']:.2f}x the time per image of {row['baseline']}")
    return f"{head}: {', '.join(bits)}"


# --- targets (figures, never checks) ----------------------------------------------------------

def all_rows(results):
    return [r for res in results.values() for r in res.get("data", {}).get("rows", [])]


def comparisons(cfg, results):
    """Figures of two parts side by side: --compile on vs off, and the compiled norm
    layers vs pure PyTorch in training (same case)."""
    rows = [r for r in all_rows(results) if r.get("images_per_s")]

    def pick(part, section, case):
        return next((r for r in rows if (r["part"], r["section"], r["case"]) ==
                     (part, section, case)), None)

    found = []
    eager, compiled = pick("bench-methods", "methods", "FT"), pick("bench-compile", "methods",
                                                                   "FT")
    if eager and compiled:
        ratio = compiled["images_per_s"] / eager["images_per_s"]
        found.append({"name": "compile", "ratio": ratio, "text": f"--compile: FT step 1 "
                      f"{compiled['images_per_s']:.4g} images/s vs {eager['images_per_s']:.4g}"
                      f" eager, {ratio:.2f}x"
                      + (" (compiling is off in this mode: "
                         + " ".join(f"{k}={v}" for k, v in cfg.compile_env) + ")"
                         if cfg.compile_env else "")})
    for row in (r for r in rows if r["part"] == "bench-iabn"):
        base = pick("bench-train", row["section"], row["case"])
        if base:
            ratio = row["images_per_s"] / base["images_per_s"]
            found.append({"name": f"compiled norm {row['case']}", "ratio": ratio,
                          "text": f"compiled norm layers, train {row['case']}: batch "
                                  f"{row['batch']} vs {base['batch']}, {ratio:.2f}x the "
                                  f"images/s, peak {mib_text(row.get('peak_mib'))} vs "
                                  f"{mib_text(base.get('peak_mib'))}"})
    return found


def targets(cfg, results):
    """The issue's speed targets against the figures taken; the dry run's sizes say nothing
    about them, so there each is shown without a verdict."""
    rows = [r for r in all_rows(results) if r.get("images_per_s")]
    train = [r for r in rows if r["section"] == "train" and r.get("size") == cfg.crop]
    bf16 = max((r for r in train if r.get("precision") == "bf16"),
               key=lambda r: r["images_per_s"], default=None)
    mib = next((r for r in rows if r["section"] == "methods" and r["case"] == "MiB"
                and r.get("x_base")), None)
    loader = max((r for r in rows if r["section"] == "data" and r["case"].startswith("loader")),
                 key=lambda r: r["images_per_s"], default=None)
    fastest = max(train, key=lambda r: r["images_per_s"], default=None)
    found = []

    def add(text, value, goal, met):
        verdict = ("met" if met else "NOT met") if cfg.mode == "cuda" else \
            "no verdict: toy sizes in the dry run"
        found.append({"target": text, "value": value, "goal": goal,
                      "met": met if cfg.mode == "cuda" else None,
                      "text": f"{text}: {value:.3g} ({verdict})"})

    goal = TARGETS["bf16_images_per_s"]
    if bf16:
        add(f"bf16 training >= {goal:.0f} images/s ({bf16['part']}: {bf16['case']}, batch "
            f"{bf16['batch']})",
            bf16["images_per_s"], goal, bf16["images_per_s"] >= goal)
    goal = TARGETS["mib_vs_ft"]
    if mib:
        add(f"MiB step-1 iteration <= {goal}x FT", mib["x_base"], goal, mib["x_base"] <= goal)
    goal = TARGETS["loader_headroom"]
    if loader and fastest:
        ratio = loader["images_per_s"] / fastest["images_per_s"]
        add(f"input pipeline >= {goal:.0f}x what training consumes ({loader['case']} vs "
            f"{fastest['case']}, batch {fastest['batch']})", ratio, goal, ratio >= goal)
    return found


# --- the report -------------------------------------------------------------------------------

def verdict(ctx, parts):
    records = [ctx.results[p.name] for p in parts if p.name in ctx.results]
    checks = [c for r in records if r["kind"] == CHECK for c in r["checks"]]
    failed = [r for r in records if r["failed"]]
    return checks, failed


def rerun_names(ctx, parts):
    """Parts worth a second call: those that failed or ran out of budget or time."""
    return [p.name for p in parts if p.name in ctx.results and
            (ctx.results[p.name]["failed"] or ctx.results[p.name]["status"] in
             ("error", "timeout") or ctx.results[p.name]["note"].startswith("out of budget"))]


def document(ctx, parts, finished):
    checks, failed = verdict(ctx, parts)
    rerun = rerun_names(ctx, parts)
    return {
        "format": 1, "mode": ctx.cfg.mode, "created": ctx.created, "argv": ctx.argv,
        "finished": finished, "passed": (not failed) if finished else None,
        "seconds": round(ctx.elapsed(), 1), "budget_s": ctx.cfg.budget_s,
        "checks_total": len(checks), "checks_failed": sum(not c["passed"] for c in checks),
        "failed_parts": [r["name"] for r in failed], "environment": ctx.environment,
        "config": dataclasses.asdict(ctx.cfg),
        "plan": [{"name": p.name, "kind": p.kind, "limit_s": p.limit_s, "needs": list(p.needs),
                  "group": p.group, "background": p.background} for p in parts],
        "parts": [ctx.results[p.name] for p in parts if p.name in ctx.results],
        "comparisons": comparisons(ctx.cfg, ctx.results),
        "targets": targets(ctx.cfg, ctx.results),
        "rerun": (f"bash bench/device_check.sh OUT --only {','.join(rerun)}"
                  + (" --cpu-dry-run" if ctx.cfg.mode != "cuda" else "")) if rerun else None,
    }


STATUS_TAG = {True: "PASS", False: "FAIL"}


def summary_lines(doc):
    """The text summary: a headline, one line per part with its time against its limit,
    one per check and per figure, the targets, and the result last."""
    env = doc.get("environment") or {}
    device = (env.get("gpus") or [{}])[0].get("name") or env.get("cpu_model") or ""
    lines = [f"MiB device check ({doc['mode']}{', ' + device if device else ''}): "
             f"{doc['seconds']:.0f} s of a {doc['budget_s']} s budget"]
    for part in doc["parts"]:
        note = f" ({part['note']})" if part["note"] else ""
        lines.append(f"[{part['name']}] {part['status']} in {part['seconds']:.0f} s of its "
                     f"{part['limit_s']} s limit{note}")
        lines += [f"  {STATUS_TAG[c['passed']]} {c['name']}: {c['detail']}"
                  for c in part["checks"]]
        lines += [f"  figure {f['text']}" for f in part["figures"]]
    if doc["comparisons"]:
        lines.append("comparisons:")
        lines += [f"  {c['text']}" for c in doc["comparisons"]]
    if doc["targets"]:
        lines.append("targets (figures, not checks):")
        lines += [f"  {t['text']}" for t in doc["targets"]]
    if doc["rerun"]:
        lines.append(f"rerun what failed or did not fit: {doc['rerun']}")
    if not doc["finished"]:
        lines.append("RESULT: unfinished")
    elif doc["passed"]:
        lines.append(f"RESULT: all {doc['checks_total']} checks passed")
    else:
        lines.append(f"RESULT: FAILED: {doc['checks_failed']} of {doc['checks_total']} checks "
                     f"failed; parts failed or not run: {', '.join(doc['failed_parts'])}")
    return lines


def _atomic_write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(ctx, parts, finished=False):
    doc = document(ctx, parts, finished)
    _atomic_write(os.path.join(ctx.out, JSON_NAME), json.dumps(doc, indent=1, default=str))
    _atomic_write(os.path.join(ctx.out, TEXT_NAME), "\n".join(summary_lines(doc)) + "\n")
    return doc


def write_logs(ctx):
    """Every subprocess's output in one archive (a device run brings back a few files)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(ctx.logs, "*.log"))):
            tar.add(path, arcname=os.path.basename(path))
    with open(os.path.join(ctx.out, LOGS_NAME), "wb") as f:
        f.write(buffer.getvalue())
