#!/usr/bin/env python
"""Run a set of configs one after another and compare them like the reference
work's Table 1 and Figure 2.

    python scripts/compare.py configs/mnist/*.json --out docs/results/mnist

Writes ``<out>.md`` (ID, approach, parts, spec, LR, test BPD, wall time, plus
epoch-time ratios and the same-wall-clock comparison) and ``<out>.png`` (test
BPD against epoch, one line per run, a dashed line where fine-tuning starts).
A config's ID is the number its file name starts with (``3-alt-2p.json`` -> 3).
Runs already finished under --storage-path are reused unless --rerun is given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from raylocal.cli import run, set_threads  # noqa: E402
from raylocal.config import read_config_file, validate_config  # noqa: E402
from raylocal.errors import RaylocalError  # noqa: E402


def run_config(path: Path, storage: str, rerun: bool) -> dict:
    values = read_config_file(path)
    values.setdefault("run_name", path.stem)
    values["storage_path"] = storage
    config = validate_config(values, str(path))
    summary_path = Path(storage) / config.run_name / "summary.json"
    if summary_path.is_file() and not rerun:
        print(f"reusing {summary_path}", flush=True)
        return json.loads(summary_path.read_text())
    set_threads(config)
    print(f"running {path} ...", flush=True)
    summary = run(config)
    print(f"  test BPD {summary['test_bpd']:.4f} in {summary['wall_time']:.0f}s", flush=True)
    return summary


def epoch_times(summary: dict, phase: str) -> list[float]:
    return [h["epoch_time"] for h in summary["history"] if h["phase"] == phase]


def bpd_at_time(summary: dict, seconds: float) -> float:
    """The run's test BPD at a wall-clock time (linear between evaluations)."""
    curve = summary["curve"]
    times = [c["elapsed"] for c in curve]
    return float(np.interp(seconds, times, [c["test_bpd"] for c in curve]))


def table(ids: list[str], summaries: list[dict], configs: list[dict]) -> str:
    rows = [
        "| ID | approach | parts | spec | LR | epochs (+fine-tune) | test BPD | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s, c in zip(ids, summaries, configs):
        approach = s["schedule"]
        if c.get("alternate_every"):
            approach += f" every {c['alternate_every']} batches"
        approach += " + fine-tune" if s["finetune_epochs"] and s["schedule"] != "e2e" else ""
        lr = ",".join(f"{v:g}" for v in c.get("lr", [1e-3]))
        if c.get("lr_schedule", "constant") != "constant":
            lr += f" ({c['lr_schedule']})"
        if c.get("finetune_lr"):
            lr += f", fine-tune {c['finetune_lr']:g}"
        epochs = f"{s['epochs']}" + (f" + {s['finetune_epochs']}" if s["finetune_epochs"] else "")
        spec = s["parts"].replace("|", "\\|")  # a literal | would end the table cell
        rows.append(
            f"| {i} | {approach} | {s['n_parts']} | {spec} | {lr} | {epochs} | "
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
        lines.append(
            f"| {i} | {ratio:.3f} | {s['test_bpd'] - best['test_bpd']:+.4f} | {same_time:.4f} "
            f"| {s['test_bpd'] - same_time:+.4f} |"
        )
    return "\n".join(lines)


def figure(ids: list[str], summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in zip(ids, summaries):
        xs = [c["epoch"] for c in s["curve"]]
        label = f"{i}: {s['schedule']}" + (f", {s['n_parts']} parts" if s["n_parts"] > 1 else "")
        (line,) = ax.plot(xs, [c["test_bpd"] for c in s["curve"]], marker=".", label=label)
        if s["schedule"] != "e2e" and s["finetune_epochs"]:
            start = len([h for h in s["history"] if h["phase"] == "parts"])
            ax.axvline(start, color=line.get_color(), linestyle="--", alpha=0.6)
    ax.set_xlabel("epoch")
    shape = "x".join(map(str, summaries[0]["image_shape"]))
    ax.set_ylabel(f"test BPD ({summaries[0]['dataset']}, {shape})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output prefix for .md and .png")
    p.add_argument("--storage-path", default="runs/compare")
    p.add_argument("--rerun", action="store_true")
    args = p.parse_args()
    try:
        configs = [read_config_file(c) for c in args.configs]
        summaries = [run_config(c, args.storage_path, args.rerun) for c in args.configs]
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = [(re.match(r"\d+", c.stem) or re.match(r".*", c.stem)).group(0) for c in args.configs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = (
        f"{table(ids, summaries, configs)}\n\n{analysis(ids, summaries)}\n\n"
        f"Command: `python scripts/compare.py {' '.join(map(str, args.configs))} --out {args.out}`\n"
    )
    args.out.with_suffix(".md").write_text(md)
    figure(ids, summaries, args.out.with_suffix(".png"), args.out.name)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
