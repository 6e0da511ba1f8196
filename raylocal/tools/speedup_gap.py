"""Where the parts' speed-up at ∞ goes (against the race's 1.75x target).

Two parts of half the model each could train at 2x one device's images/s. The
race measures 1.59-1.63x. This splits the gap into what can be measured apart,
each in a fresh process pinned to one core, one thread, the race's model and
batch (``raylocal.bench.links.BENCH_MODEL``), on random images:

- ``whole``: one device's training step (``PartTrainer`` on the whole model);
- ``part 1`` / ``part 2``: each part's own step at the split, part 2 on part
  1's outputs: what the split's balance allows, ``whole / max(part 1, part 2)``;
- ``pair``: two ``whole`` processes at once, one per core: what running two
  processes side by side costs each of them (shared caches, memory, the host).

- ``parts cell`` / ``one-device cell``: the race's own ∞ cells (its
  contestants, ``--cell-budget`` seconds, the held-out sweep's parts settings:
  a queue of 4, syncs every 50): the speed-up as the race measures it, and
  each part's step inside Ray (its compute seconds over its steps), which the
  steps alone leave out: the sender's and receiver's threads, Ray's own
  processes on the same cores.

Every figure of one invocation is of one block: the order of the six rotates
from round to round, and the ratios are taken within a round.

    python -m raylocal.tools.speedup_gap --split 'layers:0-18|19-50' --out /work/gap50

Results: ``OUT/speedup-gap.json`` and ``OUT/speedup-gap.md``; ``--table-only`` tables them again and runs nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from raylocal.bench.async_bench import CpuMeter, random_images, training_batches
from raylocal.bench.glow_bench import step_rate
from raylocal.bench.links import BENCH_MODEL, host_figures, run_one_device, run_parts
from raylocal.core.config import RaylocalConfig
from raylocal.training.schedules import part_spec_for
from raylocal.training.trainer import PartTrainer, build_glow, initialize

STEPS = ["whole", "part 1", "part 2"]
KINDS = [*STEPS, "pair", "parts cell", "one-device cell"]


def step_seconds(kind: str, split: str, seconds: float) -> float:
    """Seconds per training step of ``kind`` (whole, part 1, part 2), one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = RaylocalConfig(**BENCH_MODEL, schedule="async", parts=2, part_spec=split)
    glow = build_glow(config, (1, 28, 28))
    noise = torch.Generator().manual_seed(1)
    batches = training_batches(random_images(), noise, torch.device("cpu"))
    parts = [glow.part(start, stop) for start, stop in part_spec_for(config, glow).bounds]
    initialize(parts, torch.cat(batches[:8]))
    if kind == "whole":
        trainer = PartTrainer(glow.whole(), 1e-3, config)
    else:
        k = int(kind[-1]) - 1
        trainer = PartTrainer(parts[k], 1e-3, config, index=k)
        with torch.no_grad():  # part 2 trains on part 1's outputs, as it does in the race
            batches = [parts[0](b)[0] if k else b for b in batches]
    for b in batches[:3]:
        trainer.step(b)
    cycle = itertools.cycle(batches)
    return BENCH_MODEL["batch_size"] / step_rate(lambda: trainer.step(next(cycle)), BENCH_MODEL["batch_size"], seconds)


def race_cell(method: str, split: str, budget: float) -> dict[str, Any]:
    """One of the race's ∞ cells (``raylocal.bench.links``), seed 1: its rate, and
    per part its steps and compute seconds; for the parts, the cores each group
    of processes used while they trained (``CpuMeter``: the parts, the queue's
    actors, this process as driver and model service, Ray's own)."""
    args = {"method": method, "link": "inf", "seed": 1, "budget": budget, "train_subset": None, "test_subset": 2000,
            "validation": None, "split": split, "sync_every": 50, "queue_size": 4}  # fmt: skip
    if method != "parts":
        return {k: v for k, v in run_one_device(args).items() if k in ("images_per_s", "steps", "test_bpd")}
    with CpuMeter() as meter:
        result = run_parts(args)
    used = meter.split(*result["part_window"])
    seconds = used.pop("seconds", 0.0)
    keep = ["images_per_s", "steps", "part_compute_s", "part_wait_s", "test_bpd"]
    return {k: result[k] for k in keep} | {"cores": {g: c / seconds for g, c in used.items()} if seconds else {}}


def _child(kind: str, core: int, split: str, seconds: float, budget: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "raylocal.tools.speedup_gap", "--child", kind, "--core", str(core)]
    argv += ["--split", split, "--seconds", str(seconds), "--cell-budget", str(budget)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _answer(proc: subprocess.Popen) -> Any:
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"error: a measuring process failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def measure_round(order: list[str], split: str, seconds: float, budget: float) -> dict[str, Any]:
    """One round: each kind in ``order``, one process at a time (the pair: two at once;
    the cells: their own Ray on both cores)."""
    out: dict[str, Any] = {}
    for kind in order:
        if kind == "pair":
            out[kind] = [_answer(p) for p in [_child("whole", core, split, seconds, budget) for core in (0, 1)]]
        else:
            out[kind] = _answer(_child(kind, 0 if kind in STEPS else -1, split, seconds, budget))
    return out


def in_ray(r: dict[str, Any]) -> dict[str, Any]:
    """A round's race cells: each part's ms per step inside Ray, one device's, and the speed-up."""
    cell, one = r["parts cell"], r["one-device cell"]
    return {
        "part_ms": [1e3 * c / n for c, n in zip(cell["part_compute_s"], cell["steps"])],
        "one_device_ms": 1e3 * BENCH_MODEL["batch_size"] / one["images_per_s"],
        "speedup": cell["images_per_s"] / one["images_per_s"],
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round ratios within the round, then their medians over the rounds."""

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rounds)

    ms = {k: 1e3 * med(lambda r, k=k: r[k]) for k in STEPS}
    return {
        "ms_per_step": ms,
        "part_over_whole": [med(lambda r, k=k: r[f"part {k + 1}"] / r["whole"]) for k in (0, 1)],
        "parts_sum_over_whole": med(lambda r: (r["part 1"] + r["part 2"]) / r["whole"]),
        "split_bound": med(lambda r: r["whole"] / max(r["part 1"], r["part 2"])),
        "pair_slowdown": med(lambda r: statistics.mean(r["pair"]) / r["whole"]),
        "in_ray_part_ms": [med(lambda r, k=k: in_ray(r)["part_ms"][k]) for k in (0, 1)],
        "in_ray_over_alone": [med(lambda r, k=k: in_ray(r)["part_ms"][k] / (1e3 * r[f"part {k + 1}"])) for k in (0, 1)],
        "one_device_ms": med(lambda r: in_ray(r)["one_device_ms"]),
        "one_device_over_alone": med(lambda r: in_ray(r)["one_device_ms"] / (1e3 * r["whole"])),
        "race_speedup": med(lambda r: in_ray(r)["speedup"]),
        "speedups": [in_ray(r)["speedup"] for r in rounds],
        # (cells run before the parts' CPU was sampled have no "cores")
        "cores": {g: med(lambda r, g=g: r["parts cell"].get("cores", {}).get(g, 0.0)) for g in CpuMeter.GROUPS},
    }


def table(s: dict[str, Any]) -> str:
    ms = s["ms_per_step"]
    rows = [
        "| measured | ms per step (median of the rounds) | ratio (median of the rounds' ratios) |",
        "|---|---|---|",
        f"| whole model, alone | {ms['whole']:.1f} | 1 |",
        f"| part 1, alone | {ms['part 1']:.1f} | {s['part_over_whole'][0]:.3f} of the whole's |",
        f"| part 2, alone | {ms['part 2']:.1f} | {s['part_over_whole'][1]:.3f} of the whole's |",
        f"| parts 1 + 2, alone | {ms['part 1'] + ms['part 2']:.1f} | {s['parts_sum_over_whole']:.3f} of the whole's |",
        f"| whole model, two processes at once, each | | {s['pair_slowdown']:.3f} of its time alone |",
        f"| one device, the race's ∞ cell | {s['one_device_ms']:.1f} | "
        f"{s['one_device_over_alone']:.3f} of the whole alone |",
    ]
    for k in (0, 1):
        rows.append(
            f"| part {k + 1}, the race's ∞ parts cell (compute s / steps) | {s['in_ray_part_ms'][k]:.1f} | "
            f"{s['in_ray_over_alone'][k]:.3f} of part {k + 1} alone |"
        )
    cores = ", ".join(f"{g} {c:.2f}" for g, c in s["cores"].items())
    speedups = ", ".join(f"{x:.2f}" for x in s["speedups"])
    rows += [
        "",
        f"- the speed-up the split allows (the whole's step over the slower part's, alone): {s['split_bound']:.2f}x",
        f"- the speed-up the race's cells reached: {s['race_speedup']:.2f}x (median of {speedups})",
    ]
    if any(s["cores"].values()):  # (none where the cells ran before the parts' CPU was sampled)
        rows.append(f"- cores used while the parts trained, of 2 (median): {cores}")
    return "\n".join(rows)


def retable(path: Path) -> int:
    """The summary and table of stored rounds, computed again (nothing runs)."""
    if not path.is_file():
        print(f"error: --table-only: no {path}", file=sys.stderr)
        return 2
    write(path, json.loads(path.read_text()))
    return 0


def write(path: Path, result: dict[str, Any]) -> None:
    """``result`` with its summary of its rounds, as JSON at ``path``, and its table beside it (``.md``)."""
    result["summary"] = summary(result["rounds"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    text = table(result["summary"])
    path.with_suffix(".md").write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="layers:0-18|19-50", help="the race's split (its split.json)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each in another order")
    p.add_argument("--cell-budget", type=float, default=60.0, help="seconds of each race cell (the race's: 60)")
    p.add_argument("--out", type=Path, default=Path("bench_runs"))
    p.add_argument("--table-only", action="store_true", help="table OUT/speedup-gap.json again; run nothing")
    p.add_argument("--child", choices=[k for k in KINDS if k != "pair"], help=argparse.SUPPRESS)
    p.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.child not in STEPS:
            print(json.dumps(race_cell(args.child.split()[0], args.split, args.cell_budget)))
            return 0
        if hasattr(os, "sched_setaffinity") and 0 <= args.core < (os.cpu_count() or 1):
            os.sched_setaffinity(0, {args.core})  # the pair's processes on cores of their own
        print(json.dumps(step_seconds(args.child, args.split, args.seconds)))
        return 0
    if args.table_only:
        return retable(args.out / "speedup-gap.json")
    if args.seconds <= 0 or args.cell_budget <= 0 or args.rounds < 1:
        print(f"error: --seconds {args.seconds}, --cell-budget {args.cell_budget} and --rounds {args.rounds} "
              "must be positive", file=sys.stderr)  # fmt: skip
        return 2
    host = host_figures(10.0)
    began = time.time()
    rounds = []
    for r in range(args.rounds):
        order = KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]
        rounds.append(measure_round(order, args.split, args.seconds, args.cell_budget) | {"order": order})
    result = {"split": args.split, "seconds": args.seconds, "cell_budget": args.cell_budget, "host": host,
              "began": began, "rounds": rounds}  # fmt: skip
    write(args.out / "speedup-gap.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
