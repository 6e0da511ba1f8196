#!/usr/bin/env python
"""Run a set of configs one after another and compare them like the reference
work's Table 1 and Figure 2.

    python scripts/compare.py configs/mnist/*.json --out docs/results/mnist

Writes ``<out>.md`` (ID, approach, parts, spec, LR, test BPD, wall time, plus
epoch-time ratios and the same-wall-clock comparison) and ``<out>.png`` (test
BPD against epoch, one line per run, a dashed line where fine-tuning starts).
A config's ID is the number its file name starts with (``3-alt-2p.json`` -> 3).
Runs already finished under --storage-path are reused unless --rerun is given.

With ``--seeds 0,1,2,3`` every config runs once per seed (a config's own seed,
0 unless it sets one, keeps its run name; other seeds add ``-seed<N>``) and
``<out>.md`` gains a table of paired differences from the e2e run of the same
seed, with their mean, a 95% Student-t interval and what that interval decides
about the targets: within 0.02 BPD of e2e at the same epochs, better than e2e
at the same wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from raylocal.core.config import (
    RIVAL_SCHEDULES,
    RaylocalConfig,
    load_config_file,
    read_config_file,
    validate_config,
)
from raylocal.core.runlog import has_checkpoint
from raylocal.errors import ConfigError, RaylocalError
from raylocal.run.launch import Loaded, run, set_threads
from raylocal.study.stats import mean_interval


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-3"``; a one-line ConfigError naming the bad value otherwise."""
    seeds: list[int] = []
    for item in text.split(","):
        first, _, last = item.strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"--seeds: {item.strip()!r} is not a seed or a range like 0-3") from None
        if lo < 0 or hi < lo:
            raise ConfigError(f"--seeds: {item.strip()!r} is not a range of non-negative seeds")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {text!r} names a seed twice")
    return seeds


def seeded(values: dict, seed: int) -> dict:
    """The config run with another seed, under its own run name."""
    if seed == values.get("seed", 0):
        return values
    return {**values, "seed": seed, "run_name": f"{values['run_name']}-seed{seed}"}


def run_config(
    path: Path, values: dict, storage: str, rerun: bool, seed: int | None = None, loaded: Loaded | None = None
) -> dict:
    """Run the config read from ``path`` as ``values``: reuse it when it finished,
    resume it from its checkpoint when it was killed (a rival starts again). Its
    images come from ``loaded`` when that holds its data source."""
    values = {"run_name": path.stem, **values}
    if seed is not None:
        values = seeded(values, seed)
    values["storage_path"] = storage
    config = validate_config(values, str(path))
    summary_path = Path(storage) / config.run.run_name / "summary.json"
    if summary_path.is_file() and not rerun:
        _check_same_settings(summary_path.parent, config)
        print(f"reusing {summary_path}", flush=True)
        return json.loads(summary_path.read_text())
    if not rerun and config.schedule.name not in RIVAL_SCHEDULES and has_checkpoint(summary_path.parent):
        # killed mid-run (a session's end kills what runs): on from its last checkpoint
        _check_same_settings(summary_path.parent, config)
        config = validate_config({**values, "resume": True}, str(path))
        print(f"resuming {summary_path.parent} from its checkpoint", flush=True)
    set_threads(config)
    print(f"running {path} ...", flush=True)
    summary = run(config, loaded)
    print(f"  test BPD {summary['test_bpd']:.4f} in {summary['wall_time']:.0f}s", flush=True)
    return summary


# Settings that do not change what a run computes
_NOT_RESULTS = {"progress", "resume", "storage_path", "log_every", "run_name"}


def changed_settings(stored: dict, wanted: dict) -> str:
    """The settings that change what a run computes and differ between ``stored``
    and ``wanted``, as "key old -> new" (the first three), or "" when none do."""
    differ = sorted(k for k in set(stored) | set(wanted) if k not in _NOT_RESULTS and stored.get(k) != wanted.get(k))
    return ", ".join(f"{k} {stored.get(k)!r} -> {wanted.get(k)!r}" for k in differ[:3])


def _check_same_settings(run_dir: Path, config: RaylocalConfig) -> None:
    """A finished run is only read back for the settings it ran with: after a
    config or a study changed, its old results must not pass for new ones."""
    stored_path = run_dir / "config.json"
    if not stored_path.is_file():
        return
    stored = load_config_file(stored_path, recorded=True).flat()
    wanted = config.flat()
    if wanted["device"] == "auto":  # an async run stores the device "auto" chose for it
        wanted["device"] = stored["device"]
    shown = changed_settings(stored, wanted)
    if shown:
        raise ConfigError(
            f"{run_dir} finished with other settings ({shown}); move it away or use another --storage-path"
        )


def epoch_times(summary: dict, phase: str) -> list[float]:
    return [h["epoch_time"] for h in summary["history"] if h["phase"] == phase]


def bpd_at_time(summary: dict, seconds: float) -> float | None:
    """The run's test BPD at a wall-clock time (linear between evaluations on the
    whole test set: an async run's live evaluations on a subset are left out);
    None outside its evaluations: a run is never credited with time it did not
    train (clamping at its last value compared a slower arm with a run that
    never got the extra time)."""
    curve = [c for c in summary["curve"] if "live_images" not in c]
    times = [c["elapsed"] for c in curve]
    if not times or not times[0] <= seconds <= times[-1]:
        return None
    return float(np.interp(seconds, times, [c["test_bpd"] for c in curve]))


def approach(summary: dict, config: dict) -> str:
    name = summary["schedule"]
    if config.get("alternate_every"):
        name += f" every {config['alternate_every']} batches"
    return name + (" + fine-tune" if summary["finetune_epochs"] and summary["schedule"] != "e2e" else "")


def table(ids: list[str], summaries: list[dict], configs: list[dict]) -> str:
    rows = [
        "| ID | approach | parts | spec | LR | epochs (+fine-tune) | test BPD | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s, c in zip(ids, summaries, configs):
        lr = ",".join(f"{v:g}" for v in c.get("lr", [1e-3]))
        if c.get("lr_schedule", "constant") != "constant":
            lr += f" ({c['lr_schedule']})"
        if c.get("finetune_lr"):
            lr += f", fine-tune {c['finetune_lr']:g}"
        epochs = f"{s['epochs']}" + (f" + {s['finetune_epochs']}" if s["finetune_epochs"] else "")
        spec = s["parts"].replace("|", "\\|")  # a literal | would end the table cell
        rows.append(
            f"| {i} | {approach(s, c)} | {s['n_parts']} | {spec} | {lr} | {epochs} | "
            f"{s['test_bpd']:.4f} | {s['wall_time']:.0f} |"
        )
    return "\n".join(rows)


def analysis(ids: list[str], summaries: list[dict]) -> str:
    """Epoch-time ratios and the comparisons with the best e2e run."""
    e2e = [(i, s) for i, s in zip(ids, summaries) if s["schedule"] == "e2e"]
    if not e2e:
        return ""
    best_id, best = min(e2e, key=lambda t: t[1]["test_bpd"])
    e2e_epoch = float(np.mean(epoch_times(best, "parts")))
    lines = [
        f"Reference: e2e run {best_id}, mean epoch time {e2e_epoch:.1f}s, test BPD {best['test_bpd']:.4f}.",
        "",
    ]
    lines.append(
        "| ID | mean parts-epoch time / e2e epoch time | BPD - e2e BPD (same epochs) "
        "| e2e BPD at this run's wall time | this run - e2e at same wall time |"
    )
    lines.append("|---|---|---|---|---|")
    for i, s in zip(ids, summaries):
        if s["schedule"] == "e2e":
            continue
        ratio = float(np.mean(epoch_times(s, "parts"))) / e2e_epoch
        same_time = bpd_at_time(best, s["wall_time"])
        at_time = ("| beyond e2e's run | |" if same_time is None
                   else f"| {same_time:.4f} | {s['test_bpd'] - same_time:+.4f} |")  # fmt: skip
        lines.append(f"| {i} | {ratio:.3f} | {s['test_bpd'] - best['test_bpd']:+.4f} {at_time}")
    return "\n".join(lines)


def verdict(lo: float, hi: float, bound: float) -> str:
    """What a 95% interval of (run - e2e) says about "at most ``bound``"."""
    if math.isnan(lo):
        return "one seed: no interval"
    if hi <= bound:
        return "**met**"
    if lo > bound:
        return "not met"
    return "undecided"


def difference_cells(diffs: list[float], bound: float) -> str:
    """Table cells: the per-seed differences, their mean [95% interval], the verdict."""
    m, lo, hi = mean_interval(diffs)
    per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
    return f" {per_seed} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | {verdict(lo, hi, bound)} |"


def seeds_analysis(ids: list[str], runs: list[list[dict]], configs: list[dict], seeds: list[int]) -> str:
    """Paired differences from the e2e run of the same seed (the e2e config with
    the lowest mean BPD), with 95% intervals and what they decide."""
    e2e = [k for k, r in enumerate(runs) if r[0]["schedule"] == "e2e"]
    if not e2e or len(seeds) < 2:
        return ""
    ref = min(e2e, key=lambda k: np.mean([s["test_bpd"] for s in runs[k]]))
    lines = [
        f"Over seeds {', '.join(map(str, seeds))}; differences are paired with e2e run {ids[ref]} "
        "of the same seed, intervals are 95% Student-t intervals of the mean difference.",
        "",
        "| ID | approach | test BPD per seed | mean ± std | − e2e per seed | mean − e2e [95%] "
        "| within 0.02 | − e2e at the same wall time, per seed | mean [95%] | better at the same wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, (i, r, c) in enumerate(zip(ids, runs, configs)):
        bpd = [s["test_bpd"] for s in r]
        row = f"| {i} | {approach(r[0], c)} | {', '.join(f'{b:.4f}' for b in bpd)} "
        row += f"| {np.mean(bpd):.4f} ± {np.std(bpd, ddof=1):.4f} |"
        if k == ref:
            lines.append(row + " | | | | | |")
            continue
        diff = [s["test_bpd"] - e["test_bpd"] for s, e in zip(r, runs[ref])]
        at_time = [(s, bpd_at_time(e, s["wall_time"])) for s, e in zip(r, runs[ref])]
        wall = [s["test_bpd"] - bpd for s, bpd in at_time if bpd is not None]  # seeds whose e2e ran that long
        lines.append(row + difference_cells(diff, 0.02) + (difference_cells(wall, 0.0) if wall else " | | |"))
    return "\n".join(lines)


def finetune_start(summary: dict) -> float | None:
    """The epoch after which a parts run's fine-tune starts: its last parts-phase
    epoch (the async trainer logs its whole parts phase as one history entry)."""
    if summary["schedule"] == "e2e" or not summary["finetune_epochs"]:
        return None
    return max(h["epoch"] for h in summary["history"] if h["phase"] == "parts")


def figure(ids: list[str], summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in zip(ids, summaries):
        xs = [c["epoch"] for c in s["curve"]]
        label = f"{i}: {s['schedule']}" + (f", {s['n_parts']} parts" if s["n_parts"] > 1 else "")
        (line,) = ax.plot(xs, [c["test_bpd"] for c in s["curve"]], marker=".", label=label)
        start = finetune_start(s)
        if start is not None:
            ax.axvline(start, color=line.get_color(), linestyle="--", alpha=0.6)
    ax.set_xlabel("epoch")
    shape = "x".join(map(str, summaries[0]["image_shape"]))
    ax.set_ylabel(f"test BPD ({summaries[0]['dataset']}, {shape})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output prefix for .md and .png")
    p.add_argument("--storage-path", default="runs/compare")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--seeds", help='run every config once per seed ("0,1,2" or "0-3") and compare paired')
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else [None]
        configs = [read_config_file(c) for c in args.configs]
        runs = [
            [run_config(path, values, args.storage_path, args.rerun, seed) for seed in seeds]
            for path, values in zip(args.configs, configs)
        ]
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = [(re.match(r"\d+", c.stem) or re.match(r".*", c.stem)).group(0) for c in args.configs]
    summaries = [r[0] for r in runs]  # the table and figure show the first seed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python scripts/compare.py {' '.join(map(str, args.configs))} --out {args.out}"
    if args.seeds:
        command += f" --seeds {args.seeds}"
    md = f"{table(ids, summaries, configs)}\n\n{analysis(ids, summaries)}\n\n"
    if args.seeds:
        md += f"{seeds_analysis(ids, runs, configs, seeds)}\n\n"
    md += f"Command: `{command}`\n"
    args.out.with_suffix(".md").write_text(md)
    figure(ids, summaries, args.out.with_suffix(".png"), args.out.name)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
