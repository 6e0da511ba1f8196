#!/usr/bin/env python
"""Parts against DDP, local SGD, a pipeline and one device, over the same emulated links, at equal wall-clock budgets.

    python scripts/bench_links.py --quick          # 10 s per cell, links inf and 10Mbit, 2 seeds
    python scripts/bench_links.py                  # the full race: 5 minutes per cell, five links, 3 seeds
    python scripts/bench_links.py --project-only --step-time 0.2
    python scripts/bench_links.py --real --links 10Mbit,1Mbit    # over kernel-shaped links (root)

Contestants (each worker or part is one CPU thread, joined by the link):
  parts       2 async parts that never wait (--starve stale, --full drop-oldest, --queue-size 1,
              upstream weights every --sync-every steps);
              also "parts + fine-tune": the weights at 2/3 of the budget, gathered
              over the link, fine-tuned end to end for the rest of it, on one device
              or by DDP over the link, whichever was faster in its block
  ddp         2 DDP workers, every gradient all-reduced over the link (a comm hook;
              --bucket-cap-mb, --ddp-compression)
  local-sgd   2 workers averaging their parameters every --average-every steps
              (--outer-lr: DiLoCo's outer step; --average-overlap)
  pipeline    the same model cut where the parts cut it, trained end to end as a
              2-stage pipeline (1F1B, --micro-batches): activations forward, gradients back
  one-device  end to end on one thread, no link: the floor
Every parts and pipeline cell uses one split, measured once per race (split.json).

The race is a study (raylocal.bench.race): for each seed and link, one block
runs every contestant back to back, one device included, in an order that
rotates from block to block; every comparison pairs cells by seed and uses only
cells of the same block. Every cell runs in a fresh process (its own Ray
instance and peak memory) and writes a JSON under --out that describes itself:
every setting that shapes it, and the host of its block (commit, CPU model,
and a host-speed probe measured at the start of the block: one device's
images/s over --probe seconds). A rerun reads a finished cell back when its
settings are the same and refuses, in one line, one run with other settings; so
a race can be stopped and resumed. The table and the figure (mean test BPD at
the budget against bandwidth, 95% intervals) are written at the end.

The projection (also printed first) needs no training: from the model config
alone, the bytes per step each method puts on the wire, and the bandwidth
below which it becomes link-bound at a given step time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray is imported by the functions of the cells that use it (ray, parts_phase, async_bench): the
# one-device cell's process, whose peak memory is one of its figures, stays free of it

import torch

from raylocal.baselines.projection import StepModel, bandwidth_losing, wire_bytes_per_step
from raylocal.bench.race import (
    METHODS,
    SCHEDULES,
    Cell,
    check_methods,
    check_targets,
    plot,
    race_cells,
    results_table,
    twins_table,
)
from raylocal.bench.sweep import SWEEP_GRID, best_settings, race_settings, sweep_cells, sweep_table, tuned_at
from raylocal.cluster import netns
from raylocal.core.checkpoint import load_checkpoint
from raylocal.core.config import RaylocalConfig, data_source
from raylocal.core.links import FakeClock, LinkSpec, Wire, with_real_costs
from raylocal.core.runlog import peak_rss_mb
from raylocal.errors import ClusterError, ConfigError
from raylocal.run.run import Run
from raylocal.study.compare import parse_seeds
from raylocal.training.service import ModelService

LINKS = {
    "inf": "bw=inf,lat=20ms",
    "100Mbit": "bw=100Mbit,lat=20ms",
    "10Mbit": "bw=10Mbit,lat=20ms",
    "1Mbit": "bw=1Mbit,lat=20ms",
    "10Mbit+outages": "bw=10Mbit,lat=20ms,mtbf=60s,mttr=15s",
    "10Mbit+straggler": "bw=10Mbit,lat=20ms",
}
# conditions in which the second worker, part or stage runs 2x slower than its hardware
STRAGGLERS = {"10Mbit+straggler": "straggle:2@2"}
QUICK_LINKS = ("inf", "10Mbit")
# --quick: 24 cells (2 links, 2 seeds) of 10 s each; a cell takes 20-45 s with its process's start
# (its own Ray instance, Ray Train's for DDP and local SGD), about 14 minutes in all
QUICK_BUDGET = 10.0
QUICK_SEEDS = 2
RACE_SEEDS = 3  # blocks per link, paired by seed: seeds 1-3 (seed 0 is the sweep's)
DEFAULTS = RaylocalConfig()  # what a cell leaves at the config's default (PowerSGD's rank and start)
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


def own_ray(join: bool = False) -> None:
    """A Ray instance of the cell's own, 2 CPUs, even where another runs on this host
    (a plain ``ray.init`` would join that one); with ``join``, the cluster at
    RAY_ADDRESS instead (the calibration's real network, ``raylocal.tools.calibrate``)."""
    import ray

    if join:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def _data(args: dict[str, Any]):
    return data_source(_config(args)).load()


def cell_link(args: dict[str, Any], schedule: str | None) -> str:
    """The cell's emulated link; with ``link_costs``, also charging what ``schedule``'s
    messages were measured to cost on a real link (``with_real_costs``)."""
    link = args.get("link_spec") or (LINKS[args["link"]] if args.get("link") else "up")
    return with_real_costs(link, schedule or "") if args.get("link_costs") == "measured" else link


def _config(args: dict[str, Any], **extra: Any) -> RaylocalConfig:
    link = cell_link(args, extra.get("schedule"))
    values = {**BENCH_MODEL, "link": link, "epochs": 1000, "seed": args.get("seed", 0)}
    # the config names the cell's data, so that an actor can load the same images on its own node
    values |= {"train_subset": args.get("train_subset"), "test_subset": args.get("test_subset")}
    values["validation"] = args.get("validation")  # a sweep cell: scored on held-out training images
    values["images_from"] = args.get("images_from", "driver")
    values.update(extra)
    if values.get("schedule") != "e2e":  # two workers, parts or stages: one of them may straggle
        values["inject"] = STRAGGLERS.get(args.get("link"))
    return RaylocalConfig(**values)


def run_one_device(args: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = _data(args)
    config = _config(args, schedule=SCHEDULES["one-device"], time_budget=args["budget"], link="up")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = Run(config.replace(storage_path=tmp, run_name="run"), data).execute()
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
    """DDP (``average_every`` 0) or local SGD: a data-parallel ``Run`` of two
    workers of one CPU each, from ``state`` when given (the parts' weights)."""
    import ray

    data = _data(args)
    outer = args.get("outer_lr") if average_every else None
    overlap = bool(average_every and args.get("average_overlap"))
    config = _config(
        args, schedule=SCHEDULES["ddp"], workers=2, cpus_per_part=1.0, time_budget=budget or args["budget"],
        average_every=average_every, outer_lr=outer, average_overlap=overlap,
        bucket_cap_mb=args.get("bucket_cap_mb"), ddp_compression=args.get("ddp_compression") or "none",
    )  # fmt: skip
    own_ray(args.get("join", False))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(config.replace(storage_path=tmp, run_name="run"), data, start_from=state)
        summary = run.execute()
        weights = load_checkpoint(Path(summary["checkpoint"]), kind="run")["model"]
    ray.shutdown()
    stats = summary["data_parallel"]
    return {
        "images_per_s": stats["images"] / stats["seconds"],
        "steps": stats["steps"],
        "seconds": stats["seconds"],
        "bytes_per_step": stats["bytes_per_step"],
        "start_bytes": stats["start_bytes"],  # DDP's first broadcast, once (over an emulated link)
        "start_spread_s": stats["start_spread_s"],  # the gap between the first and the last worker starting to train
        "idle": stats["idle_s"] / stats["seconds"],
        "sync": stats["sync_s"] / stats["seconds"],  # of the idle: waiting for the other workers
        "rounds": stats["rounds_s"] / stats["seconds"],  # of the idle: local SGD's averaging after its meeting
        "allreduce_s": stats.get("allreduce_s"),  # DDP's, per step, as its reducer timed it
        "allreduce_exposed_s": stats.get("allreduce_exposed_s"),  # of that, after the backward pass
        "allreduce_exposed_least_s": stats.get("allreduce_exposed_least_s"),  # the least exposed worker's
        "workers": stats.get("workers"),  # each worker's reducer timing and its steps' times, by rank
        "peak_rss_mb": stats["peak_rss_mb"],
        "loss_curve": stats.get("loss_curve"),  # rank 0's, a point every 10 steps
        "test_bpd": summary["test_bpd"],
        "state": weights,
    }


class WeightsSnapshot:
    """A parts-phase monitor: the parts' weights once they have trained ``at``
    seconds, where "parts + fine-tune" starts its fine-tune. The seconds count
    from the first poll that finds every part training (as the parts' own budget
    does); ``seconds`` is when the weights were in hand (None: never)."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.start: float | None = None
        self.seconds: float | None = None
        self.state: dict[str, torch.Tensor] = {}

    def __call__(self, actors: list[Any], polled: list[dict[str, Any]]) -> None:
        from raylocal.cluster.parts_phase import gather_weights

        now = time.perf_counter()
        self.start = now if self.start is None else self.start
        if not self.state and now - self.start >= self.at:
            self.state = gather_weights(actors)
            self.seconds = time.perf_counter() - self.start  # the fine-tune has the rest


def run_parts(args: dict[str, Any]) -> dict[str, Any]:
    """The parts: a parts-only ``Run`` whose model service is this process (the
    cell's two CPUs are the parts'), watched by a monitor that takes the weights
    at 2/3 of the budget for "parts + fine-tune"."""
    import ray

    data = _data(args)
    config = _config(
        args, schedule=SCHEDULES["parts"], parts=2, cpus_per_part=1.0, gpus_per_part=0.0, starve="stale",
        full="drop-oldest", queue_size=args.get("queue_size") or 1, sync_every=args.get("sync_every") or 50,
        part_spec=args["split"], time_budget=args["budget"], wire_dtype=args.get("wire_dtype", "float32"),
        placement=args.get("placement", "pack"), finetune_epochs=0, trace_packets=args.get("trace_packets", 0),
    )  # fmt: skip
    own_ray(args.get("join", False))
    snapshot = WeightsSnapshot(FINETUNE_AT * args["budget"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(
            config.replace(storage_path=tmp, run_name="run"), data,
            service_here=True, monitor=lambda service, plan: snapshot,
        )  # fmt: skip
        summary = run.execute()
    ray.shutdown()
    parts, plan = run.carry.parts, run.carry.plan
    stats, report = parts.stats, parts.report
    steps = [st["steps"] for st in stats]
    seconds = [st["end_time"] - st["start_time"] for st in stats]
    first = stats[0]
    traced = {"packet_delays": summary["packet_delays"]} if config.links.trace_packets else {}
    return traced | {
        # every image trains every layer once: the slowest part sets the model's rate
        "images_per_s": min(n * config.schedule.batch_size / s for n, s in zip(steps, seconds)),
        "part_images_per_s": [n * config.schedule.batch_size / s for n, s in zip(steps, seconds)],
        "steps": steps,
        "seconds": max(seconds),
        "bytes_per_step": (first["bytes_forward"] + first["bytes_weights"]) / max(first["steps"], 1),
        "idle": max(report["idle_fraction"]),
        "peak_rss_mb": max(report["peak_rss_mb"]),
        "test_bpd": summary["test_bpd"],
        "fresh_steps": report["fresh_steps"],
        "stale_steps": report["stale_steps"],
        "behind_steps": report["behind_steps"],
        "behind_s": report["behind_s"],
        "dropped_latents": report["dropped_latents"],
        "outage_latents": report["outage_latents"],
        "bytes_received": report["bytes_received"],  # per boundary: what the next part fetched
        "part_weight_bytes": plan["part_param_bytes"][0],
        "snapshot_s": snapshot.seconds,  # None: the parts ended before 2/3 of the budget
        "actor_nodes": report["actor_nodes"],  # where each part ran (Ray's node ids)
        "queue_nodes": report["queue_nodes"],  # and each boundary's queue actor
        "part_wait_s": report["wait_s"],  # per part: waiting for latents, and computing
        "part_compute_s": report["compute_s"],
        "part_window": [min(st["start_time"] for st in stats), max(st["end_time"] for st in stats)],  # wall clock
        "state": snapshot.state or None,
    }


def run_pipeline(args: dict[str, Any]) -> dict[str, Any]:
    """The pipeline-parallel rival: a pipeline ``Run``, the model cut where the
    parts cut it, trained end to end over the link (1F1B, activations forward,
    their gradients back)."""
    import ray

    data = _data(args)
    micro = args["micro_batches"]
    config = _config(
        args, schedule=SCHEDULES["pipeline"], parts=2, cpus_per_part=1.0, gpus_per_part=0.0, part_spec=args["split"],
        micro_batches=micro, queue_size=micro, placement=args.get("placement", "pack"), time_budget=args["budget"],
    )  # fmt: skip
    own_ray(args.get("join", False))
    with tempfile.TemporaryDirectory() as tmp:
        summary = Run(config.replace(storage_path=tmp, run_name="run"), data).execute()
    ray.shutdown()
    stages = summary["pipeline"]["per_stage"]
    return (
        pipeline_figures(stages, config.schedule.batch_size)
        | {
            "test_bpd": summary["test_bpd"],
            "actor_nodes": [s["node_id"] for s in stages],  # where each stage ran (Ray's node ids)
            "queue_nodes": [s["queue_nodes"] for s in stages[:-1]],  # each boundary's activation and gradient queue
        }
    )


def pipeline_figures(stages: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """A 2-stage pipeline cell's speed and traffic from its stages' figures: the
    bytes a step puts on the boundary's link, activations forward and their
    gradients back; the busiest stage's idle share (waiting, or sending)."""
    first = stages[0]["stats"]
    seconds = max(s["seconds"] for s in stages)
    steps = first["steps"]
    return {
        "images_per_s": steps * batch_size / seconds,
        "steps": steps,
        "seconds": seconds,
        "bytes_per_step": (first["bytes_forward"] + stages[-1]["stats"]["bytes_backward"]) / max(steps, 1),
        "idle": max((s["stats"]["wait_s"] + s["stats"]["send_s"]) / s["seconds"] for s in stages),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages),
    }


def gather_seconds(args: dict[str, Any], parts_cell: dict[str, Any]) -> float:
    """What the fine-tune's start waits for part 1's weights to cross the emulated
    link to the fine-tune's machine (part 2's). Over real links nothing: the parts
    cell's snapshot ended only once the weights had crossed the real link."""
    if args.get("network") == "real":
        return 0.0
    spec = LinkSpec.parse(
        cell_link(args, SCHEDULES["parts"]), seed=args["seed"]
    )  # the weights cross as the parts' packets do
    return Wire(spec, FakeClock(0.0)).deliver(parts_cell["part_weight_bytes"])


def run_finetune(args: dict[str, Any]) -> dict[str, Any]:
    """Parts + fine-tune: the parts' weights at 2/3 of the budget, part 1's sent
    over the link to the fine-tune's machine, then the rest of the budget end to
    end on whichever was faster in its block: one device, or DDP over the link."""
    block = {m: Path(path) for m, path in args["block"].items()}  # this block's cells (file names without .json)
    parts = torch.load(block["parts"].with_suffix(".pt"), weights_only=True)
    cells = {m: json.loads(path.with_suffix(".json").read_text()) for m, path in block.items()}
    gather = gather_seconds(args, cells["parts"])
    snapshot_s = cells["parts"].get("snapshot_s", FINETUNE_AT * args["budget"])  # (cells from before it was kept)
    if snapshot_s is None:
        raise SystemExit(
            f"error: the block's parts ended before {FINETUNE_AT:.0%} of the budget: no weights to fine-tune"
        )
    budget = args["budget"] - snapshot_s - gather
    on = "ddp" if cells["ddp"]["images_per_s"] > cells["one-device"]["images_per_s"] else "one device"
    if budget <= 0:
        return {"test_bpd": float("nan"), "finetune_on": on, "gather_s": gather, "note": "no time left"}
    if on == "ddp":
        result = run_data_parallel(args, 0, state=parts, budget=budget)
    else:
        torch.set_num_threads(1)
        config = _config(args, schedule="e2e", time_budget=budget)  # e2e from the parts' weights
        with tempfile.TemporaryDirectory() as tmp:
            run = Run(config.replace(storage_path=tmp, run_name="run"), _data(args), start_from=parts)
            summary = run.execute()
        result = {"test_bpd": summary["test_bpd"], "peak_rss_mb": peak_rss_mb()}
    return {"test_bpd": result["test_bpd"], "finetune_on": on, "gather_s": gather, "finetune_s": budget}


def cell_settings(cell: Cell, opts: argparse.Namespace, split: str, tuned: dict[str, Any] | None = None) -> dict:
    """Every setting that shapes a cell: what its JSON records, what its process
    runs, and what a stored cell must match to be read back instead of run.
    ``tuned`` (the sweep's setting for this cell) overrides the command line's."""
    tuned = tuned or {}
    unknown = set(tuned) - set(SWEPT) - {"variant"}
    if unknown:
        raise ValueError(f"not a setting of a cell: {sorted(unknown)}")

    def option(key: str) -> Any:
        return tuned[key] if key in tuned else getattr(opts, key)

    m = cell.method
    local, parts = m == "local-sgd", m in ("parts", "parts+ft")
    ddp = m == "ddp" or m == "parts+ft"  # a parts fine-tune may run on DDP
    return {
        "method": m, "link": None if m == "one-device" else cell.link, "block": cell.link, "seed": cell.seed,
        "variant": tuned.get("variant"), "budget": opts.budget, "model": BENCH_MODEL, "threads": 1,
        "train_subset": opts.train_subset, "test_subset": opts.test_subset,
        # a sweep cell trains without its last N training images and is scored on them, not on the race's test images
        "validation": getattr(opts, "validation", None) or None,
        "split": split if parts or m == "pipeline" else None,
        "average_every": option("average_every") if local else None,
        "outer_lr": option("outer_lr") if local else None,
        "average_overlap": option("average_overlap") if local else None,
        "bucket_cap_mb": option("bucket_cap_mb") if ddp else None,
        "ddp_compression": option("ddp_compression") if ddp else None,
        "powersgd": [DEFAULTS.cluster.powersgd_rank, DEFAULTS.cluster.powersgd_start]
        if ddp and option("ddp_compression") == "powersgd"
        else None,
        "sync_every": option("sync_every") if parts else None,
        "queue_size": option("queue_size") if parts else None,
        "micro_batches": option("micro_batches") if m == "pipeline" else None,
        "finetune_at": FINETUNE_AT if m == "parts+ft" else None,
        "straggler": STRAGGLERS.get(cell.link) if m != "one-device" else None,
        # None: the emulated link; "real": two namespaced Ray nodes, the bandwidth shaped by the kernel
        "network": "real" if getattr(opts, "real", False) else None,
        # the real links' TCP congestion control (None: the host's default, which host_figures records)
        "congestion": getattr(opts, "congestion", None) if getattr(opts, "real", False) and m != "one-device" else None,
        # "measured": the emulated link also charges a real link's measured costs (None: payload only)
        "link_costs": "measured" if getattr(opts, "costs", False) and m != "one-device" else None,
    }  # fmt: skip


# the settings a sweep may tune (each a command-line option of the same name)
SWEPT = sorted({key for grid in SWEEP_GRID.values() for setting in grid.values() for key in setting})


def host_figures(probe_s: float) -> dict[str, Any]:
    """What a cell's numbers depend on besides its settings: the commit, the CPU
    model, the host's TCP congestion control (what a namespaced node's links run
    unless told otherwise), and the host's speed now (one device's images/s, one
    thread, over ``probe_s`` seconds of random images; 0 skips the probe)."""
    from raylocal.bench.async_bench import e2e_throughput, random_images

    root = Path(__file__).resolve().parents[2]
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    probe = None
    if probe_s > 0:
        probe = e2e_throughput(RaylocalConfig(**BENCH_MODEL), random_images(), 1, probe_s)
    tcp = netns.host_congestion()
    return {"commit": git.stdout.strip() or None, "cpu": cpu, "tcp_congestion": tcp, "probe_images_per_s": probe}


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def cell_main(args: dict[str, Any]) -> None:
    method = args["method"]
    if method == "one-device":
        result = run_one_device(args)
    elif method in ("ddp", "local-sgd"):
        result = run_data_parallel(args, args["average_every"] or 0)
    elif method == "pipeline":
        result = run_pipeline(args)
    elif method == "parts":
        result = run_parts(args)
    else:
        result = run_finetune(args)
    state = result.pop("state", None)
    out = Path(args["out"])
    if method == "parts" and state is not None:
        torch.save(state, out.with_suffix(".pt"))  # what the block's fine-tune starts from
    result |= {"settings": args["settings"], "host": args["host"]}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)  # a cell's file exists only once it is whole


# ---------------------------------------------------------------- the race


def race_split(opts: argparse.Namespace, out: Path) -> str:
    """The split of every parts and pipeline cell of a race: measured once, from
    this host's layer times, and kept in ``out/split.json``, so that a resumed
    race cuts the model where it did before."""
    path = out / "split.json"
    if getattr(opts, "sweep_from", None):  # tuned in another race: cut where that race cut
        theirs = json.loads(swept_race_split(Path(opts.sweep_from)).read_text())["split"]
        ours = json.loads(path.read_text())["split"] if path.is_file() else theirs
        if ours != theirs:
            raise SystemExit(f"error: {path} cuts at {ours}, the race of --sweep-from at {theirs}")
        if not path.is_file():
            path.write_text(json.dumps({"split": theirs, "measured": f"the race of {opts.sweep_from}"}))
        return theirs
    if path.is_file():
        return json.loads(path.read_text())["split"]
    config = RaylocalConfig(**BENCH_MODEL, schedule="async", parts=2, balance="measure")
    data = _data({"train_subset": opts.train_subset, "test_subset": opts.test_subset})
    bounds = ModelService(config, data.shape, "cpu").plan(data.train)["bounds"]
    split = "layers:" + "|".join(f"{a}-{b - 1}" for a, b in bounds)
    path.with_suffix(".tmp").write_text(json.dumps({"split": split, "measured": "balance measure, on this host"}))
    path.with_suffix(".tmp").replace(path)
    return split


def real_link(link: str) -> tuple[str | None, str]:
    """How ``--real`` runs a race link: (the ``tbf`` rate of each node's veth,
    None where unshaped; the link the cell still emulates). The kernel shapes
    the bandwidth; it cannot delay here (no ``netem``), so the latency stays emulated."""
    spec = LinkSpec.parse(LINKS[link])
    if spec.mtbf or spec.outages or spec.p < 1:
        raise SystemExit(f"error: --real cannot run link {link!r}: the kernel's links here have no outages")
    rate = None if math.isinf(spec.bandwidth) else f"{spec.bandwidth / 1e3:.0f}kbit"
    return rate, f"bw=inf,lat={spec.latency * 1e3:g}ms"


def _run_cell_process(args: dict[str, Any], timeout: float) -> subprocess.CompletedProcess:
    """The cell's process; past ``timeout`` (a hung cell) it is killed with every
    process it started (its own Ray), and the cell has failed. On a real network
    (``args["network"] == "real"``) it runs on the first of two Ray nodes in
    network namespaces, each node one CPU, joined at the link's bandwidth, so
    that each worker, part or stage sits on a node of its own and loads its
    images there; the network is torn down after the cell."""
    argv = [sys.executable, "-m", "raylocal.bench.links", "--cell"]
    if args.get("network") != "real" or args["method"] == "one-device":  # one device: no link to be real
        return _wait(subprocess.Popen([*argv, json.dumps(args)], **_PIPES), timeout)

    rate, emulated = real_link(args["settings"]["block"])
    args = args | {"link_spec": emulated, "join": True, "placement": "spread", "images_from": "node"}
    try:
        with netns.Network([rate, rate], congestion=args.get("congestion")) as net, netns.ray_cluster(net, 1) as env:
            return _wait(net.popen(0, [*argv, json.dumps(args)], env=env, **_PIPES), timeout)
    except ClusterError as e:  # the network or its Ray did not start: the cell failed
        return subprocess.CompletedProcess(argv, -1, "", f"the real network: {e}")


_PIPES: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}


def _wait(p: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    with p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return subprocess.CompletedProcess(p.args, -9, "", f"hung: killed after {timeout:.0f} s")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


class CellFailed(SystemExit):
    """A cell's process failed: the race stops in one line; the sweep records it."""


def run_cell(
    cell: Cell, opts: argparse.Namespace, out: Path, host: dict | None, split: str, tuned: dict | None = None
) -> dict[str, Any]:
    """A cell's result: read back when it finished before with the same settings,
    else run in a process of its own (its own Ray instance and peak memory)."""
    path = out / f"{cell.name}.json"
    settings = cell_settings(cell, opts, split, tuned)
    if path.is_file():
        stored = json.loads(path.read_text())
        differ = _differing(stored.get("settings"), settings)
        if differ:
            raise SystemExit(f"error: {path} was run with other settings ({differ}); move it away or use another --out")
        return stored
    block = {m: str(out / Cell(m, cell.link, cell.seed).name) for m in ("parts", "ddp", "one-device")}
    args = settings | {"out": str(path), "settings": settings, "host": host, "block": block}
    where = "no link" if settings["link"] is None else cell.link
    variant = f" ({settings['variant']})" if settings["variant"] else ""
    print(f"-- seed {cell.seed}, block {cell.link}: {cell.method}{variant} over {where}, {opts.budget:.0f} s",
          flush=True)  # fmt: skip
    start = time.perf_counter()
    proc = _run_cell_process(args, timeout=4 * opts.budget + 300)
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise CellFailed(f"error: cell {cell.name} failed: " + " ".join(tail))
    result = json.loads(path.read_text())
    print(f"   done in {time.perf_counter() - start:.0f} s: test BPD {result['test_bpd']:.4f}", flush=True)
    return result


def run_sweep(opts: argparse.Namespace, links: list[str], seed: int, out: Path, split: str) -> dict[str, Any]:
    """Each rival's grid (raylocal.bench.sweep) at each link, at one seed and
    --sweep-budget seconds a cell; its table and choices go to ``out/sweep``.
    Returns the choices: per link and method, the settings the race runs."""
    where = out / "sweep"
    where.mkdir(exist_ok=True)
    held_out = getattr(opts, "sweep_validation", 0) or None
    short = argparse.Namespace(**vars(opts) | {"budget": opts.sweep_budget, "validation": held_out})
    results, hosts = {}, {}
    # a race of some methods tunes those alone (the fine-tune runs at the parts' and DDP's choices)
    raced = getattr(opts, "methods", METHODS)
    methods = getattr(opts, "sweep_methods", None) or [m for m in SWEEP_GRID if m in raced]
    for cell in sweep_cells(links, seed, methods):
        if opts.finished_only and not (where / f"{cell.name}.json").is_file():
            continue
        if cell.link not in hosts and not (where / f"{cell.name}.json").is_file():
            hosts[cell.link] = host_figures(opts.probe)
        grid = SWEEP_GRID[cell.method][cell.variant] | {"variant": cell.variant}
        try:
            results[cell] = run_cell(cell, short, where, hosts.get(cell.link), split, grid)
        except CellFailed as e:  # a setting that fails is a result of the sweep, kept, and never chosen
            failed = {"test_bpd": math.nan, "images_per_s": math.nan, "bytes_per_step": math.nan, "idle": math.nan,
                      "failed": str(e), "settings": cell_settings(cell, short, split, grid)}  # fmt: skip
            (where / f"{cell.name}.json").write_text(json.dumps(failed, indent=1))
            results[cell] = failed
    scored_on = f"{held_out} held-out training images" if held_out else "the test images"
    table = sweep_table(results, links, methods, "held-out BPD" if held_out else "test BPD")
    best = best_settings(results, links, methods)
    (where / "table.md").write_text(table + "\n")
    (where / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    print(f"\n# the sweep: seed {seed}, {opts.sweep_budget:.0f} s per cell, on {scored_on}\n{table}\n", flush=True)
    return best


def chosen_settings(opts: argparse.Namespace, links: list[str], out: Path, split: str) -> dict[str, Any]:
    """Each rival's settings per link: another race's sweep (``--sweep-from``), a
    sweep here, or none (the command line's options)."""
    if opts.sweep_from:
        best = json.loads(Path(opts.sweep_from).read_text())
        print(f"each rival at its best of the sweep in {opts.sweep_from}", flush=True)
        return best
    return run_sweep(opts, links, opts.sweep_seed, out, split) if opts.sweep_budget > 0 else {}


def _differing(stored: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    """How a stored cell's settings differ from ``settings`` ("" when they do
    not). A setting added after the cell ran counts as the same when its value
    now is None: the cell's behaviour without it."""
    if stored is None:
        return "none recorded"
    now = json.loads(json.dumps(settings))
    return ", ".join(
        f"{k} {stored.get(k)!r} here, {v!r} now" for k, v in now.items()
        if stored.get(k) != v and (k in stored or v is not None)
    )  # fmt: skip


def _options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help=f"{QUICK_BUDGET:.0f} s per cell, links inf and 10Mbit, seeds 1-2"
    )
    p.add_argument("--budget", type=float, default=None, help="seconds per cell (default 300)")
    p.add_argument("--links", default=None, help=f"comma-separated, of {', '.join(LINKS)}")
    p.add_argument("--seeds", default=None, help='the blocks\' seeds, "1,2,3" or "1-3" (default: 1-3)')
    p.add_argument("--repeats", type=int, default=None, help="as --seeds 1-N")
    p.add_argument("--sweep-seed", type=int, default=0, help="the sweep's seed, never one of the race's")
    p.add_argument("--sweep-budget", type=float, default=None,
                   help="seconds per cell of the sweep that tunes each rival per link before the race, at "
                   "--sweep-seed (default 60; --quick: 0, no sweep, the options below as given)")  # fmt: skip
    p.add_argument("--sweep-validation", type=int, default=2000,
                   help="the sweep trains without the last N training images and chooses by its BPD on them, "
                   "never on the race's test images (0: the test images, as sweeps before 2026-12-05)")  # fmt: skip
    p.add_argument("--sweep-only", action="store_true", help="the sweep and its table, then stop: no race")
    p.add_argument("--sweep-methods", type=lambda v: v.split(","), default=None,
                   help=f"with --sweep-only: sweep these methods alone (of {', '.join(SWEEP_GRID)})")  # fmt: skip
    p.add_argument(
        "--methods",
        type=lambda v: tuple(v.split(",")),
        default=METHODS,
        help=f"the race's methods, of {', '.join(METHODS)} (default: all); each block runs these only",
    )
    p.add_argument("--average-every", type=int, default=50, help="local SGD's H")
    p.add_argument("--outer-lr", type=float, default=None, help="local SGD with DiLoCo's outer Nesterov step")
    p.add_argument("--average-overlap", action="store_true", help="local SGD's rounds overlap the next step")
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP's largest gradient bucket (MB)")
    p.add_argument("--ddp-compression", choices=("none", "bf16", "powersgd"), default="none",
                   help=f"DDP's compression (powersgd: torch's hook, rank {DEFAULTS.cluster.powersgd_rank} after "
                   f"{DEFAULTS.cluster.powersgd_start} plain steps)")  # fmt: skip
    p.add_argument("--sync-every", type=int, default=50, help="the parts' upstream weight syncs (steps)")
    p.add_argument("--queue-size", type=int, default=1, help="the parts' latent queue bound")
    p.add_argument("--micro-batches", type=int, default=4, help="the pipeline's micro-batches per batch")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--step-time", type=float, default=0.2, help="seconds per step for the projection")
    p.add_argument("--probe", type=float, default=10.0, help="seconds of the host-speed probe of each block (0: none)")
    p.add_argument("--project-only", action="store_true", help="print the projection and stop")
    p.add_argument("--finished-only", action="store_true",
                   help="run nothing: the tables of the seeds whose every block has finished")  # fmt: skip
    p.add_argument("--out", default=None, help="directory of the cells' results (default bench_runs/links[-quick])")
    p.add_argument("--real", action="store_true",
                   help="over real links: each worker, part or stage on a Ray node of its own in a network "
                   "namespace, the bandwidth shaped by the kernel (tbf), the latency still emulated; needs root "
                   "(raylocal.cluster.netns), and links without outages")  # fmt: skip
    p.add_argument("--congestion", help="with --real: the links' TCP congestion control (default: the host's)")
    p.add_argument("--costs", action="store_true",
                   help="the emulated links also charge what a real link's messages were measured to cost "
                   "(eff=, msg=; raylocal.core.links.with_real_costs): measured at 100, 10 and 1 Mbit")  # fmt: skip
    p.add_argument("--sweep-from", default=None,
                   help="the best.json of another race's sweep (OUT/sweep/best.json): its choices, in place of a "
                   "sweep here (a --real race run at the emulated race's tuned settings)")  # fmt: skip
    p.add_argument("--twin-of", default=None,
                   help="the OUT of the same race on the other network (real for an emulated race, or the "
                   "reverse): each method's real cells against their emulated twins, paired by seed "
                   "(OUT/twins.md)")  # fmt: skip
    p.add_argument("--cell", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def swept_race_split(best: Path) -> Path:
    """The split.json of the race whose sweep chose ``best`` (``OUT/sweep/best.json``)."""
    return best.parent.parent / "split.json"


def _check_sweep_from(path: Path, links: list[str]) -> None:
    try:
        best = json.loads(path.read_text())
        if not all(isinstance(m, dict) and all(isinstance(s, dict) for s in m.values()) for m in best.values()):
            raise ValueError("not {link: {method: settings}}")
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: --sweep-from {path}: not a sweep's best.json ({e})") from None
    missing = [link for link in links if link not in best]
    if missing:
        raise SystemExit(f"error: --sweep-from {path} has no choices for link {missing[0]!r}")
    if not swept_race_split(path).is_file():
        raise SystemExit(f"error: --sweep-from {path}: its race's split.json ({path.parent.parent}) is missing")


def _check_sweep_only(opts: argparse.Namespace) -> None:
    """A sweep of some methods only chooses nothing for the others: it cannot feed a race."""
    methods = getattr(opts, "sweep_methods", None) or []
    bad = [m for m in methods if m not in SWEEP_GRID]
    if bad:
        raise SystemExit(f"error: --sweep-methods: {bad[0]!r} is not one of {', '.join(SWEEP_GRID)}")
    if methods and not getattr(opts, "sweep_only", False):
        raise SystemExit("error: --sweep-methods needs --sweep-only (the race needs every method's choice)")
    if getattr(opts, "sweep_only", False) and (getattr(opts, "sweep_from", None) or not opts.sweep_budget):
        raise SystemExit("error: --sweep-only needs a sweep here (a --sweep-budget above 0, no --sweep-from)")


def race_plan(opts: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The race's links and seeds, checked before anything runs."""
    links = opts.links.split(",") if opts.links else list(QUICK_LINKS if opts.quick else LINKS)
    bad = [link for link in links if link not in LINKS]
    if bad:
        raise SystemExit(f"error: unknown link {bad[0]!r} (one of {', '.join(LINKS)})")
    if getattr(opts, "sweep_from", None):
        _check_sweep_from(Path(opts.sweep_from), [tuned_at(link) for link in links])
    if getattr(opts, "costs", False):
        if getattr(opts, "real", False):
            raise SystemExit("error: --costs charges an emulated link what a real one costs; --real has the real one")
        try:
            for link in links:
                with_real_costs(LINKS[link], "async")
        except ConfigError as e:
            raise SystemExit(f"error: --costs: {e}") from None
    if getattr(opts, "congestion", None) and not getattr(opts, "real", False):
        raise SystemExit("error: --congestion sets the real links' TCP: it needs --real")
    if getattr(opts, "real", False):
        for link in links:
            real_link(link)
        why = netns.available()
        if why is not None:
            raise SystemExit(f"error: --real: {why}")
        try:
            netns.check_congestion(getattr(opts, "congestion", None))
        except ClusterError as e:
            raise SystemExit(f"error: --congestion: {e}") from None
    _check_sweep_only(opts)
    try:
        check_methods(opts.methods)
    except ValueError as e:
        raise SystemExit(f"error: --methods {e}") from None
    if getattr(opts, "twin_of", None) and not Path(opts.twin_of).is_dir():
        raise SystemExit(f"error: --twin-of {opts.twin_of}: no such directory")
    if opts.repeats is not None and opts.repeats < 1:
        raise SystemExit(f"error: --repeats {opts.repeats}: needs at least 1")
    try:
        n = opts.repeats or (QUICK_SEEDS if opts.quick else RACE_SEEDS)
        seeds = parse_seeds(opts.seeds) if opts.seeds else list(range(1, n + 1))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(opts, "sweep_budget", 0) and opts.sweep_seed in seeds:
        raise SystemExit(f"error: --sweep-seed {opts.sweep_seed} is also a race seed: the sweep's choice would be "
                         "judged on its own runs")  # fmt: skip
    return links, seeds


def main(argv: list[str] | None = None) -> None:
    opts = _options(argv)
    if opts.cell:
        return cell_main(json.loads(opts.cell))
    print(f"# projection: bytes per step on each sender's link; link-bound at {opts.step_time} s per step")
    print(projection_table(opts.step_time, opts.average_every), flush=True)
    if opts.project_only:
        return None
    opts.budget = opts.budget or (QUICK_BUDGET if opts.quick else 300.0)
    if opts.sweep_budget is None:
        opts.sweep_budget = 0.0 if opts.quick else 60.0
    links, seeds = race_plan(opts)
    real, costs = "-real" if opts.real else "", "-costs" if opts.costs else ""
    out = Path(opts.out or f"bench_runs/links{real}{costs}{'-quick' if opts.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    split = race_split(opts, out)
    print(f"split of every parts and pipeline cell: {split}", flush=True)
    best = chosen_settings(opts, links, out, split)
    if opts.sweep_only:
        return None
    results, hosts = {}, {}
    for cell in race_cells(links, seeds, opts.methods):
        if opts.finished_only and not (out / f"{cell.name}.json").is_file():
            continue
        block = (cell.seed, cell.link)
        if block not in hosts and not (out / f"{cell.name}.json").is_file():
            hosts[block] = host_figures(opts.probe)  # at the start of the block: its host speed
            print(f"block seed {cell.seed}, {cell.link}: host {hosts[block]}", flush=True)
        results[cell] = run_cell(cell, opts, out, hosts.get(block), split, race_settings(best, cell))
    seeds = [s for s in seeds if all(Cell(m, link, s) in results for m in opts.methods for link in links)]
    if not seeds:
        print("no seed has finished every block yet")
        return None
    table = results_table(results, links, seeds)
    tuning = "each rival at its best setting of the sweep" if best else "the options as given, no sweep"
    print(f"\n# {opts.budget:.0f} s per cell, {len(seeds)} seeds, {os.cpu_count()} cores here, {tuning}\n{table}\n")
    print("\n".join(check_targets(results, links, seeds)))
    plot(results, links, seeds, out / "links.png")
    (out / "table.md").write_text(table + "\n")
    print(f"figure: {out / 'links.png'}")
    if opts.twin_of:
        write_twins_table(results, Path(opts.twin_of), links, seeds, out, opts.methods)
    return None


TWIN_AXES = ("network", "congestion", "link_costs")


def write_twins_table(
    results: dict[Cell, dict[str, Any]],
    where: Path,
    links: list[str],
    seeds: list[int],
    out: Path,
    methods: tuple[str, ...] = METHODS,
) -> None:
    """``results`` against the same cells in ``where`` run on the other network
    (``--twin-of``), over the seeds finished in both: ``out/twins.md``."""
    twins = {}
    for cell, result in results.items():
        path = where / f"{cell.name}.json"
        if not path.is_file():
            continue
        twins[cell] = json.loads(path.read_text())
        # the network, and what the emulator charges for it, are what twins differ in
        ours, theirs = ({k: v for k, v in r["settings"].items() if k not in TWIN_AXES} for r in (result, twins[cell]))
        differ = _differing(theirs, ours)
        if differ:
            raise SystemExit(f"error: --twin-of: {path} was run with other settings ({differ})")
        if (twins[cell]["settings"].get("network") == "real") == (result["settings"].get("network") == "real"):
            raise SystemExit(f"error: --twin-of: {path} ran on the same network as {out / cell.name}.json")
    both = [s for s in seeds if all(Cell(m, link, s) in twins for m in methods for link in links)]
    if not both:
        print(f"--twin-of {where}: no seed has finished every block there")
        return
    real_here = next(iter(results.values()))["settings"].get("network") == "real"
    real, emulated = (results, twins) if real_here else (twins, results)
    table = twins_table(real, emulated, links, both)
    (out / "twins.md").write_text(table + "\n")
    print(f"\n# real links against their emulated twins, {len(both)} seeds paired\n{table}")


if __name__ == "__main__":
    main()
