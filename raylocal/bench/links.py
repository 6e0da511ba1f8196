#!/usr/bin/env python
"""Parts against DDP, local SGD and one device, over the same emulated links, at equal wall-clock budgets.

    python scripts/bench_links.py --quick          # a few minutes: 30 s per cell, two links
    python scripts/bench_links.py                  # the full run: 5 minutes per cell, five links
    python scripts/bench_links.py --project-only --step-time 0.2

Contestants (each worker or part is one CPU thread, joined by the link):
  parts       2 async parts that never wait (--starve stale, --full drop-oldest, queue 1,
              split balanced on measured layer times);
              also "parts + fine-tune": the weights at 2/3 of the budget, gathered
              over the link, fine-tuned end to end for the rest of it, on one device
              or by DDP over the link, whichever was faster in this run
  ddp         2 DDP workers, every gradient all-reduced over the link (a comm hook)
  local-sgd   2 workers averaging their parameters every --average-every steps
  pipeline    the same model cut where the parts cut it, trained end to end as a
              2-stage pipeline (1F1B, 4 micro-batches): activations forward, gradients back
  one-device  end to end on one thread, no link: the floor
Every cell runs in a fresh process (its own Ray instance and peak memory) and
writes a JSON under --out that describes itself: every setting that shapes it,
and the host it ran on (commit, CPU model, and a host-speed probe measured at
the start of the command: one device's images/s over --probe seconds). A rerun
reads a finished cell back when its settings are the same and refuses, in one
line, one run with other settings; so the full run can be stopped and resumed. The table and
the figure (test BPD at the budget against bandwidth) are written at the end.

The projection (also printed first) needs no training: from the model config
alone, the bytes per step each method puts on the wire, and the bandwidth
below which it becomes link-bound at a given step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch

from raylocal.baselines.projection import StepModel, bandwidth_losing, wire_bytes_per_step
from raylocal.core.config import RaylocalConfig
from raylocal.core.links import FakeClock, LinkSpec, Wire
from raylocal.training.service import ModelService

LINKS = {
    "inf": "bw=inf,lat=20ms",
    "100Mbit": "bw=100Mbit,lat=20ms",
    "10Mbit": "bw=10Mbit,lat=20ms",
    "1Mbit": "bw=1Mbit,lat=20ms",
    "10Mbit+outages": "bw=10Mbit,lat=20ms,mtbf=60s,mttr=15s",
}
QUICK_LINKS = ("inf", "10Mbit")
METHODS = ("one-device", "ddp", "local-sgd", "pipeline", "parts", "parts+ft")
PIPELINE_MICRO = 4  # micro-batches per batch of the pipeline-parallel rival (1F1B)
FINETUNE_AT = 2 / 3  # the share of the budget a parts run trains in parts before its fine-tune

# The model every cell trains: MNIST 1x28x28, L=2, K=8, width 64, batch 64, constant LR.
# Every contestant on CPU cores, also on a GPU host: a one-device cell on the GPU
# against parts on CPUs would race devices, not methods.
BENCH_MODEL = dict(
    n_levels=2, depth=8, hidden=64, batch_size=64, warmup_steps=50, lr=[1e-3], lr_schedule="constant",
    threads=1, samples=0, progress=False, eval_batch_size=500, device="cpu",
)  # fmt: skip
# The reference work's Glow: CIFAR-10 3x32x32, L=3, K=32, width 512, batch 256.
REFERENCE_MODEL = dict(n_levels=3, depth=32, hidden=512, batch_size=256)


# ---------------------------------------------------------------- projection


PROJECTION_STEPS = 2000  # the run the init packet is amortised over


def projection_table(step_time: float, average_every: int) -> str:
    """Bytes per step on each method's busiest link and, from the step-time
    models of ``raylocal.baselines.projection`` (one device's step: ``step_time`` s; no
    latency), the bandwidth below which each method loses 10% of its throughput."""
    methods = ("parts", "DDP", "local SGD", "pipeline")
    rows = [
        f"| model | bytes per step: parts (latents + syncs + init) / DDP / local SGD (every {average_every}) / "
        "pipeline | loses 10% below: " + " / ".join(methods) + " |",
        "|---|---|---|",
    ]
    for name, model, shape in [
        ("reference Glow (3x32x32, L=3, K=32, width 512, batch 256)", REFERENCE_MODEL, (3, 32, 32)),
        ("ours (1x28x28, L=2, K=8, width 64, batch 64)", BENCH_MODEL, (1, 28, 28)),
    ]:
        config = RaylocalConfig(**{**BENCH_MODEL, **model}, schedule="async", parts=2, average_every=average_every)
        b = wire_bytes_per_step(config, shape, PROJECTION_STEPS)
        steps = StepModel(step_time, parts=2, average_every=average_every).methods()
        bounds = [bandwidth_losing(lambda bw, f=f, b=b: f(b, bw, 0.0)) for f in steps.values()]
        sent = " / ".join(_mb(v) for v in (b.parts, b.ddp, b.local_sgd, b.pipeline))
        rows.append(
            f"| {name}, {b.parameters / 1e6:.2f}M parameters | {sent} | " + " / ".join(map(_bits, bounds)) + " |"
        )
    return "\n".join(rows)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3g} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.3g} kB"


def _bits(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


# ---------------------------------------------------------------- one cell, in its own process


def _data(args: dict[str, Any]):
    from raylocal.core.data import load_dataset

    return load_dataset("mnist").subset(args.get("train_subset"), args["test_subset"])


def _config(args: dict[str, Any], **extra: Any) -> RaylocalConfig:
    values = {**BENCH_MODEL, "link": LINKS[args["link"]] if args.get("link") else "up", "epochs": 1000}
    values.update(extra)
    return RaylocalConfig(**values)


def _evaluate(config: RaylocalConfig, data, state: dict[str, torch.Tensor]) -> float:
    return ModelService(config, data.shape, "cpu").evaluate(data.test, state)


def run_one_device(args: dict[str, Any]) -> dict[str, Any]:
    from raylocal.core.checkpoint import load_checkpoint
    from raylocal.core.runlog import peak_rss_mb
    from raylocal.run.run import Run

    torch.set_num_threads(1)
    data = _data(args)
    config = _config(args, schedule="e2e", time_budget=args["budget"], link="up")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = Run(config.model_copy(update={"storage_path": tmp, "run_name": "run"}), data).execute()
        seconds = time.perf_counter() - start
        state = load_checkpoint(Path(summary["checkpoint"]), kind="run")["model"]
    return {
        "images_per_s": summary["images_per_s"],
        "steps": summary["steps"],
        "seconds": seconds,
        "bytes_per_step": 0.0,
        "idle": 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "test_bpd": summary["test_bpd"],
        "state": state,
    }


def run_data_parallel(args: dict[str, Any], average_every: int, state=None, budget=None) -> dict[str, Any]:
    import ray

    from raylocal.baselines.ddp import train_ddp

    data = _data(args)
    outer = args.get("outer_lr") if average_every else None
    overlap = bool(average_every and args.get("average_overlap"))
    config = _config(args, average_every=average_every, outer_lr=outer, average_overlap=overlap)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights, _ = train_ddp(
            config, data.train, 2, config.epochs, 1e-3, Path(tmp), state, cpus_per_worker=1.0,
            time_budget=budget or args["budget"], stats=stats,
        )  # fmt: skip
    ray.shutdown()
    return {
        "images_per_s": stats["images"] / stats["seconds"],
        "steps": stats["steps"],
        "seconds": stats["seconds"],
        "bytes_per_step": stats["bytes_per_step"],
        "idle": stats["idle_s"] / stats["seconds"],
        "peak_rss_mb": stats["peak_rss_mb"],
        "test_bpd": _evaluate(config, data, weights),
        "state": weights,
    }


def run_parts(args: dict[str, Any]) -> dict[str, Any]:
    import ray

    from raylocal.cluster.parts_phase import gather_weights, run_parts_phase
    from raylocal.core.runlog import Progress

    data = _data(args)
    config = _config(
        args, schedule="async", parts=2, cpus_per_part=1.0, gpus_per_part=0.0, starve="stale",
        full="drop-oldest", queue_size=1, balance="measure", time_budget=args["budget"],
        wire_dtype=args.get("wire_dtype", "float32"),
    )  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    service = ModelService(config, data.shape, "cpu")
    plan = service.plan(data.train)
    snapshot: dict[str, Any] = {}
    started: list[float] = []

    def take_snapshot(actors: list[Any], polled: list[dict[str, Any]]) -> None:
        # the parts' weights at 2/3 of the budget: where "parts + fine-tune" starts its fine-tune;
        # the budget counts from the first poll that finds every part training (as the parts' own)
        started.append(started[0] if started else time.perf_counter())
        if not snapshot and time.perf_counter() - started[0] >= FINETUNE_AT * args["budget"]:
            snapshot.update(gather_weights(actors))

    with tempfile.TemporaryDirectory() as tmp:
        parts = run_parts_phase(config, data, plan, Progress(False), Path(tmp), take_snapshot)
    ray.shutdown()
    stats, report = parts.stats, parts.report
    steps = [st["steps"] for st in stats]
    seconds = [st["end_time"] - st["start_time"] for st in stats]
    first = stats[0]
    start, stop = plan["bounds"][0]
    first_part = service.glow.part(start, stop).state_dict()
    return {
        # every image trains every layer once: the slowest part sets the model's rate
        "images_per_s": min(n * config.batch_size / s for n, s in zip(steps, seconds)),
        "steps": steps,
        "seconds": max(seconds),
        "bytes_per_step": (first["bytes_forward"] + first["bytes_weights"]) / max(first["steps"], 1),
        "idle": max(report["idle_fraction"]),
        "peak_rss_mb": max(report["peak_rss_mb"]),
        "test_bpd": service.evaluate(data.test, parts.state),
        "fresh_steps": report["fresh_steps"],
        "stale_steps": report["stale_steps"],
        "behind_steps": report["behind_steps"],
        "behind_s": report["behind_s"],
        "dropped_latents": report["dropped_latents"],
        "outage_latents": report["outage_latents"],
        "part_weight_bytes": sum(v.numel() * v.element_size() for k, v in parts.state.items() if k in first_part),
        "state": snapshot or parts.state,
    }


def run_pipeline(args: dict[str, Any]) -> dict[str, Any]:
    """The pipeline-parallel rival: the model cut where the parts cut it, trained
    end to end over the link (1F1B, activations forward, their gradients back)."""
    import ray

    from raylocal.baselines.pipeline_on_ray import train_pipeline_parallel

    data = _data(args)
    config = _config(
        args,
        schedule="async",
        parts=2,
        cpus_per_part=1.0,
        gpus_per_part=0.0,
        balance="measure",
        queue_size=PIPELINE_MICRO,
    )  # fmt: skip (an async config: the plan cuts it where the parts cut it; an e2e one has one part)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    bounds = [tuple(b) for b in ModelService(config, data.shape, "cpu").plan(data.train)["bounds"]]
    state, stages = train_pipeline_parallel(config, data, bounds, "1f1b", PIPELINE_MICRO, budget=args["budget"])
    ray.shutdown()
    first = stages[0]["stats"]
    seconds = max(s["seconds"] for s in stages)
    steps = first["steps"]
    return {
        "images_per_s": steps * config.batch_size / seconds,
        "steps": steps,
        "seconds": seconds,
        "bytes_per_step": (first["bytes_forward"] + stages[-1]["stats"]["bytes_backward"]) / max(steps, 1),
        "idle": max(s["stats"]["wait_s"] / s["seconds"] for s in stages),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages),
        "test_bpd": _evaluate(config, data, state),
    }


def run_finetune(args: dict[str, Any]) -> dict[str, Any]:
    """Parts + fine-tune: the parts' weights at 2/3 of the budget, part 1's sent
    over the link to the fine-tune's machine, then the rest of the budget end to
    end on whichever was faster in this run: one device, or DDP over the link."""
    out = Path(args["out"]).parent
    parts = torch.load(out / f"parts-{args['link']}.pt", weights_only=True)
    cells = {m: json.loads((out / f"{m}-{args['link']}.json").read_text()) for m in ("parts", "ddp")}
    one = json.loads((out / "one-device-none.json").read_text())
    spec = LinkSpec.parse(LINKS[args["link"]], seed=1)
    gather = Wire(spec, FakeClock(0.0)).deliver(cells["parts"]["part_weight_bytes"])
    budget = args["budget"] * (1 - FINETUNE_AT) - gather
    on = "ddp" if cells["ddp"]["images_per_s"] > one["images_per_s"] else "one device"
    if budget <= 0:
        return {"test_bpd": float("nan"), "finetune_on": on, "gather_s": gather, "note": "no time left"}
    if on == "ddp":
        result = run_data_parallel(args, 0, state=parts, budget=budget)
    else:
        from raylocal.core.runlog import peak_rss_mb
        from raylocal.training.schedules import SingleProcessRun

        torch.set_num_threads(1)
        data = _data(args)
        config = _config(args, schedule="e2e", time_budget=budget)  # e2e from the parts' weights
        with tempfile.TemporaryDirectory() as tmp:
            run = SingleProcessRun(config.model_copy(update={"storage_path": tmp}), data, Path(tmp) / "run")
            run.glow.load_state_dict(parts)
            summary = run.run()
        result = {"test_bpd": summary["test_bpd"], "peak_rss_mb": peak_rss_mb()}
    return {"test_bpd": result["test_bpd"], "finetune_on": on, "gather_s": gather, "finetune_s": budget}


def cell_settings(method: str, link: str | None, opts: argparse.Namespace) -> dict[str, Any]:
    """Every setting that shapes a cell: what its JSON records, and what a stored
    cell must match to be read back instead of run."""
    return {
        "method": method, "link": LINKS[link] if link else None, "budget": opts.budget, "model": BENCH_MODEL,
        "train_subset": opts.train_subset, "test_subset": opts.test_subset,
        "average_every": opts.average_every if method == "local-sgd" else None,
        "outer_lr": opts.outer_lr if method == "local-sgd" else None,
        "average_overlap": getattr(opts, "average_overlap", False) if method == "local-sgd" else None,
        "micro_batches": PIPELINE_MICRO if method == "pipeline" else None,
        "finetune_at": FINETUNE_AT if method == "parts+ft" else None,
    }  # fmt: skip


def host_figures(probe_s: float) -> dict[str, Any]:
    """What a cell's numbers depend on besides its settings: the commit, the CPU
    model, and the host's speed now (one device's images/s, one thread, over
    ``probe_s`` seconds of random images; 0 skips the probe)."""
    from raylocal.bench.async_bench import e2e_throughput

    root = Path(__file__).resolve().parents[2]
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    probe = None
    if probe_s > 0:
        images = torch.randint(0, 256, (1280, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        probe = e2e_throughput(RaylocalConfig(**BENCH_MODEL), images, 1, probe_s)
    return {"commit": git.stdout.strip() or None, "cpu": cpu, "probe_images_per_s": probe}


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def cell_main(args: dict[str, Any]) -> None:
    method = args["method"]
    if method == "one-device":
        result = run_one_device(args)
    elif method in ("ddp", "local-sgd"):
        result = run_data_parallel(args, args["average_every"] if method == "local-sgd" else 0)
    elif method == "pipeline":
        result = run_pipeline(args)
    elif method == "parts":
        result = run_parts(args)
    else:
        result = run_finetune(args)
    state = result.pop("state", None)
    out = Path(args["out"])
    if method == "parts" and state is not None and args["save_state"]:
        torch.save(state, out.with_suffix(".pt"))  # parts-LINK.pt: what its fine-tune starts from
    result |= {"settings": args["settings"], "host": args["host"]}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)  # a cell's file exists only once it is whole


# ---------------------------------------------------------------- the study


def cells(links: list[str]) -> list[tuple[str, str | None]]:
    """In the order they run: the floor first, then per link the baselines (DDP,
    local SGD, pipeline parallelism), the parts, and the parts' fine-tune (which
    chooses between the one device and DDP)."""
    order: list[tuple[str, str | None]] = [("one-device", None)]
    for link in links:
        order += [("ddp", link), ("local-sgd", link), ("pipeline", link), ("parts", link), ("parts+ft", link)]
    return order


def repeat_cells(links: list[str], repeats: int) -> list[tuple[str, str | None, int]]:
    """The ∞ target's speed-up is a median of ``repeats`` runs: its two cells
    again, each pair side by side in time (the host's speed drifts)."""
    if "inf" not in links:
        return []
    return [cell for r in range(2, repeats + 1) for cell in [("one-device", None, r), ("parts", "inf", r)]]


def speedups(results: dict, again: dict) -> list[float]:
    """Parts at ∞ over one device, run by run (the first run's cells, then the repeats')."""
    runs = [(results[("one-device", None)], results[("parts", "inf")])]
    runs += [(again[("one-device", None, r)], again[("parts", "inf", r)]) for r in sorted({k[2] for k in again})]
    return [parts["images_per_s"] / one["images_per_s"] for one, parts in runs]


def run_cell(
    method: str, link: str | None, opts: argparse.Namespace, out: Path, run: int = 1, host: dict | None = None
) -> dict[str, Any]:
    again = f"-run{run}" if run > 1 else ""
    path = out / f"{method}-{link or 'none'}{again}.json"
    settings = cell_settings(method, link, opts)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("settings") != json.loads(json.dumps(settings)):
            shown = "none recorded" if "settings" not in stored else ", ".join(
                f"{k} {stored['settings'].get(k)!r} here, {v!r} now" for k, v in settings.items()
                if stored["settings"].get(k) != json.loads(json.dumps(v))
            )  # fmt: skip
            raise SystemExit(f"error: {path} was run with other settings ({shown}); move it away or use another --out")
        return stored
    args = {
        "method": method, "link": link, "budget": opts.budget, "out": str(path), "test_subset": opts.test_subset,
        "train_subset": opts.train_subset, "average_every": opts.average_every, "outer_lr": opts.outer_lr,
        "average_overlap": getattr(opts, "average_overlap", False),
        "save_state": run == 1,  # a repeat measures speed only: no fine-tune starts from its weights
        "settings": settings, "host": host,
    }  # fmt: skip
    print(f"-- {method} over {link or 'no link'}{f' (run {run})' if again else ''}: {opts.budget:.0f} s", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "raylocal.bench.links", "--cell", json.dumps(args)], capture_output=True, text=True
    )
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"error: cell {method} over {link} failed:\n" + "\n".join(tail))
    result = json.loads(path.read_text())
    print(f"   done in {time.perf_counter() - start:.0f} s: test BPD {result['test_bpd']:.4f}", flush=True)
    return result


def results_table(results: dict[tuple[str, str | None], dict[str, Any]], links: list[str]) -> str:
    rows = [
        "| link | method | images/s | bytes/step on the wire | idle % | peak MB per worker | test BPD at the budget |",
        "|---|---|---|---|---|---|---|",
    ]
    one = results[("one-device", None)]
    rows.append(
        f"| none | one device | {one['images_per_s']:.0f} | 0 | 0 | {one['peak_rss_mb']:.0f} | {one['test_bpd']:.4f} |"
    )
    for link in links:
        for method in ("ddp", "local-sgd", "pipeline", "parts"):
            if (method, link) not in results:  # (a race run before the pipeline rival existed)
                continue
            r = results[(method, link)]
            slower = " (slower than one device)" if r["images_per_s"] < one["images_per_s"] else ""
            rows.append(
                f"| {link} | {method} | {r['images_per_s']:.0f}{slower} | {_mb(r['bytes_per_step'])} | "
                f"{100 * r['idle']:.1f} | {r['peak_rss_mb']:.0f} | {r['test_bpd']:.4f} |"
            )
        ft = results[("parts+ft", link)]
        rows.append(
            f"| {link} | parts + fine-tune (last {100 * (1 - FINETUNE_AT):.0f}% on {ft['finetune_on']}, "
            f"gather {ft['gather_s']:.2f} s) | | | | | {ft['test_bpd']:.4f} |"
        )
    return "\n".join(rows)


def check_targets(results: dict, links: list[str], again: dict | None = None) -> list[str]:
    """The issue's targets, met or missed; ``again`` holds the repeats of the ∞ speed-up's cells."""
    lines = []
    if "10Mbit" in links:
        parts, ddp, sgd = (results[(m, "10Mbit")] for m in ("parts", "ddp", "local-sgd"))
        ratio = parts["images_per_s"] / ddp["images_per_s"]
        lines.append(f"10 Mbit: parts / DDP images/s = {ratio:.2f}x (target >= 1.5x): {_met(ratio >= 1.5)}")
        best = min(parts["test_bpd"], results[("parts+ft", "10Mbit")]["test_bpd"])
        lines.append(
            f"10 Mbit: parts BPD {best:.4f} vs DDP {ddp['test_bpd']:.4f}, local SGD {sgd['test_bpd']:.4f} "
            f"(target: lower than both): {_met(best < min(ddp['test_bpd'], sgd['test_bpd']))}"
        )
    if "10Mbit" in links and "10Mbit+outages" in links:
        kept = results[("parts", "10Mbit+outages")]["images_per_s"] / results[("parts", "10Mbit")]["images_per_s"]
        lines.append(f"10 Mbit with outages: parts keep {100 * kept:.0f}% of their images/s (target >= 90%): "
                     f"{_met(kept >= 0.9)}")  # fmt: skip
    if "inf" in links:
        parts = results[("parts", "inf")]
        ratios = speedups(results, again or {})
        ratio = statistics.median(ratios)
        each = ", ".join(f"{r:.2f}" for r in ratios)
        runs = f"median of {len(ratios)} runs: {each}" if len(ratios) > 1 else "one run"
        lines.append(f"inf: parts idle {100 * parts['idle']:.1f}% (target < 2%): {_met(parts['idle'] < 0.02)}")
        lines.append(f"inf: parts / one device = {ratio:.2f}x ({runs}; target >= 1.75x, median of 3): "
                     f"{_met(ratio >= 1.75)}")  # fmt: skip
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


SPEEDS = {"inf": 1e10, "100Mbit": 1e8, "10Mbit": 1e7, "1Mbit": 1e6}  # bits/s, for the figure's x axis


def by_bandwidth(links: list[str]) -> list[str]:
    """The links without outages, slowest first (the order --links gave them in is the cells' order)."""
    return sorted((link for link in links if link in SPEEDS), key=SPEEDS.__getitem__)


def plot(results: dict, links: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = by_bandwidth(links)  # each line drawn left to right
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, label in [("parts", "2 parts"), ("parts+ft", "2 parts + fine-tune"), ("ddp", "2 DDP workers"),
                          ("local-sgd", "2 local-SGD workers"), ("pipeline", "2-stage pipeline (1F1B)")]:  # fmt: skip
        if any((method, link) not in results for link in plain):
            continue
        xs = [SPEEDS[link] for link in plain]
        ys = [results[(method, link)]["test_bpd"] for link in plain]
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        if "10Mbit+outages" in links:
            y = results[(method, "10Mbit+outages")]["test_bpd"]
            ax.plot([1e7], [y], marker="x", markersize=9, color=line.get_color())
    ax.axhline(results[("one-device", None)]["test_bpd"], color="gray", linestyle="--", label="1 device (no link)")
    ax.set_xscale("log")
    ax.set_xticks([SPEEDS[link] for link in plain], [link.replace("inf", "∞") for link in plain])
    ax.set_xlabel("link bandwidth (20 ms latency; x: 10 Mbit with outages)")
    ax.set_ylabel("test BPD at the same wall-clock budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="30 s per cell, links inf and 10Mbit")
    p.add_argument("--budget", type=float, default=None, help="seconds per cell (default 300, quick 30)")
    p.add_argument("--links", default=None, help=f"comma-separated, of {', '.join(LINKS)}")
    p.add_argument("--average-every", type=int, default=50, help="local SGD's H")
    p.add_argument("--outer-lr", type=float, default=None, help="local SGD with DiLoCo's outer Nesterov step")
    p.add_argument("--average-overlap", action="store_true", help="local SGD's rounds overlap the next step")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1, help="runs of the ∞ speed-up's cells (target: median of 3)")
    p.add_argument("--step-time", type=float, default=0.2, help="seconds per step for the projection")
    p.add_argument("--probe", type=float, default=10.0, help="seconds of the host-speed probe at the start (0: none)")
    p.add_argument("--project-only", action="store_true", help="print the projection and stop")
    p.add_argument("--out", default=None, help="directory of the cells' results (default bench_runs/links[-quick])")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.cell:
        return cell_main(json.loads(opts.cell))
    print(f"# projection: bytes per step on each sender's link; link-bound at {opts.step_time} s per step")
    print(projection_table(opts.step_time, opts.average_every), flush=True)
    if opts.project_only:
        return None
    opts.budget = opts.budget or (30.0 if opts.quick else 300.0)
    links = opts.links.split(",") if opts.links else list(QUICK_LINKS if opts.quick else LINKS)
    bad = [link for link in links if link not in LINKS]
    if bad:
        raise SystemExit(f"error: unknown link {bad[0]!r} (one of {', '.join(LINKS)})")
    if opts.repeats < 1:
        raise SystemExit(f"error: --repeats {opts.repeats}: needs at least 1")
    out = Path(opts.out or f"bench_runs/links{'-quick' if opts.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    host = host_figures(opts.probe)
    print(f"host: {host}", flush=True)
    results = {(m, link): run_cell(m, link, opts, out, host=host) for m, link in cells(links)}
    again = {(m, link, r): run_cell(m, link, opts, out, r, host) for m, link, r in repeat_cells(links, opts.repeats)}
    table = results_table(results, links)
    print(f"\n# {opts.budget:.0f} s per cell, {os.cpu_count()} cores here, "
          f"local SGD every {opts.average_every} steps\n{table}\n")  # fmt: skip
    print("\n".join(check_targets(results, links, again)))
    plot(results, links, out / "links.png")
    (out / "table.md").write_text(table + "\n")
    print(f"figure: {out / 'links.png'}")
    return None


if __name__ == "__main__":
    main()
