"""``raylocal train`` (scripts/train.py): parse, validate at the edge, run, print a summary.

User errors (``RaylocalError``) become one line ``error: ...`` on stderr and
exit status 2; nothing half-written is left behind because every file a run
writes goes through an atomic rename.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from raylocal.core.config import RIVAL_SCHEDULES, RaylocalConfig, build_parser, config_from_args
from raylocal.errors import RaylocalError
from raylocal.run.launch import resume_config, run


def _capped(summary: dict[str, Any]) -> str:
    cap = summary.get("eval_cap")
    return f"; each image at most {cap:g} bits/dim" if cap else ""


def format_summary(summary: dict[str, Any]) -> str:
    shape = "x".join(map(str, summary["image_shape"]))
    rows = [
        ("test BPD", f"{summary['test_bpd']:.4f} ({summary['dataset']}, {shape}{_capped(summary)})"),
        ("schedule", f"{summary['schedule']}, parts {summary['parts']}"),
        ("wall time", f"{summary['wall_time']:.1f}s ({summary['images_per_s']:.0f} images/s)"),
        ("rollbacks", ", ".join(map(str, summary["rollbacks"]))),
    ]
    for key, label in [
        ("part_images_per_s", "images/s per part"),
        ("bytes_forward", "bytes forward per boundary"),
        ("bytes_backward", "bytes backward"),
        ("bytes_weight_sync", "bytes of weights synced"),
        ("stale_steps", "steps on stale inputs, parts 2.."),
        ("dropped_latents", "latents dropped (queue full)"),
        ("superseded_latents", "latents superseded on arrival"),
        ("outage_latents", "latents lost to outages"),
        ("idle_s", "idle seconds per part"),
        ("restarts", "actor restarts"),
    ]:
        if key in summary:
            value = summary[key]
            rows.append((label, ", ".join(map(_fmt, value)) if isinstance(value, list) else _fmt(value)))
    rows += rival_rows(summary)
    for key, label in [("behind_steps", "upstream steps behind"), ("behind_s", "seconds behind upstream")]:
        if summary.get(key):
            per_part = [_fmt([b["mean"], b["p50"], b["p95"], b["max"]]) for b in summary[key]]
            rows.append((f"{label} (mean/p50/p95/max)", ", ".join(per_part)))
    where = summary.get("where")
    if where:  # the async run: which process did what (the driver only coordinated)
        parts = ", ".join(f"{p['pid']} ({p['device']})" for p in where.get("parts", []))
        service, finished = where.get("service", {}), where.get("finished", {})
        rows.append(("processes", f"driver {where['driver']['pid']}; parts {parts}"))
        rows.append(
            (
                "live evaluations",
                f"{service.get('evaluations', 0)} in {service.get('pid')} ({service.get('device')}), "
                f"{service.get('evaluation_s', 0.0):.1f}s",
            )
        )
        rows.append(("finished in", f"{finished.get('pid')} ({finished.get('device')}, {finished.get('phase')})"))
    if summary.get("stopped_early"):
        rows.append(("stopped early", summary["stopped_early"]))
    rows += [
        ("tensorboard", summary["tensorboard"]),
        ("checkpoint", summary["checkpoint"]),
        ("samples", str(summary["samples"])),
        ("summary", summary["run_dir"] + "/summary.json"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def rival_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """A rival run's own figures: the data-parallel workers', or each pipeline stage's."""
    rows = []
    rival = summary.get("data_parallel") or {}
    if rival:
        rows.append(("data-parallel", f"{summary['workers']} workers, {_fmt(rival['bytes_per_step'])} bytes/step "
                     f"per worker, idle {_fmt(rival['idle_s'])}s (the most idle worker)"))  # fmt: skip
    for stage, figures in enumerate((summary.get("pipeline") or {}).get("per_stage", [])):
        stats = figures["stats"]
        waited = stats["wait_s"] + stats.get("send_s", 0.0)  # for messages to arrive, and for the link to take its own
        rows.append((f"pipeline stage {stage + 1}", f"{stats['steps']} batches, waited {_fmt(waited)}s, "
                     f"sent {_fmt(stats['bytes_forward'] + stats['bytes_backward'])} bytes"))  # fmt: skip
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return "/".join(_fmt(v) for v in value)
    return str(value)


def main(
    argv: list[str] | None = None,
    description: str = "Train a Glow, end to end or in parts.",
    defaults: dict[str, Any] | None = None,
    runner: Callable[[RaylocalConfig], dict[str, Any]] = run,
    epilogue: Callable[[RaylocalConfig, dict[str, Any]], str | None] | None = None,
) -> int:
    """The command line: parse, validate, run, print the summary (and
    ``epilogue(config, summary)``'s line, when it has one)."""
    config = None
    try:
        args = build_parser(description, defaults).parse_args(argv)
        config = config_from_args(args, defaults)
        if config.run.resume:
            config = resume_config(config, {k: v for k, v in vars(args).items() if k != "config"})
        summary = runner(config)
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if config is not None and config.schedule.name in RIVAL_SCHEDULES:  # it checkpoints only at its end
            print(f"interrupted: a {config.schedule.name} run does not resume; start it again", file=sys.stderr)
        else:
            print("interrupted: the last checkpoint is kept; rerun with --resume", file=sys.stderr)
        return 130
    print(format_summary(summary))
    note = epilogue(config, summary) if epilogue else None
    if note:
        print(note)
    return 0
