"""Command-line entry points: parse, validate at the edge, run, print a summary.

User errors (``RaylocalError``) become one line ``error: ...`` on stderr and
exit status 2; nothing half-written is left behind because every file a run
writes goes through an atomic rename.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from raylocal.checkpoint import load_checkpoint
from raylocal.config import RunConfig, build_parser, config_from_args, read_config_file, validate_config
from raylocal.data import ImageData, load_dataset
from raylocal.errors import ConfigError, RaylocalError
from raylocal.runlog import CHECKPOINT, resolve_run_dir

# Options that may change when a run is resumed; any other must match the checkpoint.
RESUMABLE = {
    "epochs", "finetune_epochs", "time_budget", "progress", "eval_every", "log_every",
    "checkpoint_every", "threads", "device", "address", "resume", "storage_path", "run_name",
    "samples", "cache_dir", "data_root", "download", "max_rollbacks", "tf32", "deterministic",
}  # fmt: skip


def resume_config(config: RunConfig, given: dict[str, Any]) -> RunConfig:
    """The checkpoint's configuration, updated with the resumable options given now."""
    run_dir = resolve_run_dir(config)
    if (run_dir / CHECKPOINT).is_file():
        saved = RunConfig.model_validate_json(load_checkpoint(run_dir / CHECKPOINT)["config"])
    else:  # an async run that stopped in its parts phase: only part checkpoints exist
        saved = validate_config(read_config_file(run_dir / "config.json"), str(run_dir / "config.json"))
    values = saved.model_dump()
    for key in given:
        if key == "config":
            continue
        new = getattr(config, key)
        if key in RESUMABLE:
            values[key] = new
        elif new != values[key]:
            raise ConfigError(
                f"--{key.replace('_', '-')} {new} differs from the checkpoint's {values[key]} "
                f"({run_dir}); a resumed run keeps its settings"
            )
    values.update(resume=True, run_name=run_dir.name)
    return validate_config(values)


def load_data(config: RunConfig) -> ImageData:
    data = load_dataset(config.dataset, config.data_root, config.download, config.cache_dir)
    if config.validation:
        data = data.held_out(config.validation)
    return data.subset(config.train_subset, config.test_subset)


def set_threads(config: RunConfig) -> None:
    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))


def run(config: RunConfig) -> dict[str, Any]:
    """Run ``config`` in this process (or, for the async schedule, on Ray)."""
    set_threads(config)
    data = load_data(config)
    if config.schedule == "async":
        from raylocal.ray_run import run_async

        return run_async(config, data)
    from raylocal.schedules import SingleProcessRun

    run_dir = resolve_run_dir(config)
    return SingleProcessRun(config, data, run_dir).run()


def format_summary(summary: dict[str, Any]) -> str:
    shape = "x".join(map(str, summary["image_shape"]))
    rows = [
        ("test BPD", f"{summary['test_bpd']:.4f} ({summary['dataset']}, {shape})"),
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
    runner: Callable[[RunConfig], dict[str, Any]] = run,
    epilogue: Callable[[RunConfig, dict[str, Any]], str | None] | None = None,
) -> int:
    """The command line: parse, validate, run, print the summary (and
    ``epilogue(config, summary)``'s line, when it has one)."""
    try:
        args = build_parser(description, defaults).parse_args(argv)
        config = config_from_args(args, defaults)
        if config.resume:
            config = resume_config(config, {k: v for k, v in vars(args).items() if k != "config"})
        summary = runner(config)
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume", file=sys.stderr)
        return 130
    print(format_summary(summary))
    note = epilogue(config, summary) if epilogue else None
    if note:
        print(note)
    return 0
