"""Launching a run from its configuration: resuming, loading its data, and
choosing where it runs (this process, or Ray for the async schedule)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from raylocal.core.checkpoint import load_checkpoint
from raylocal.core.config import RIVAL_SCHEDULES, RaylocalConfig, data_source, load_config_file, validate_config
from raylocal.core.data import DataSource, ImageData
from raylocal.core.runlog import CHECKPOINT
from raylocal.errors import ConfigError
from raylocal.model.glow import Glow
from raylocal.run.run import Run
from raylocal.training.trainer import build_glow

# Options that may change when a run is resumed; any other must match the checkpoint.
RESUMABLE = {
    "epochs", "finetune_epochs", "time_budget", "progress", "eval_every", "log_every",
    "checkpoint_every", "threads", "device", "address", "resume", "storage_path", "run_name",
    "samples", "cache_dir", "data_root", "download", "max_rollbacks", "tf32", "deterministic", "images_from",
    "trace_packets",
}  # fmt: skip


def resume_config(config: RaylocalConfig, given: dict[str, Any]) -> RaylocalConfig:
    """The checkpoint's configuration, updated with the resumable options given now."""
    run_dir = Run.directory_of(config)
    recorded = run_dir / "config.json"
    schedule = load_config_file(recorded, recorded=True).schedule.name if recorded.is_file() else None
    if schedule in RIVAL_SCHEDULES:  # (it trains in one go: its checkpoint holds only its final model)
        raise ConfigError(f"--resume: {run_dir} is a {schedule} run, which does not resume; start it again")
    if (run_dir / CHECKPOINT).is_file():
        saved = RaylocalConfig.model_validate_json(load_checkpoint(run_dir / CHECKPOINT, kind="run")["config"])
    else:  # an async run that stopped in its parts phase: only part checkpoints exist
        saved = load_config_file(run_dir / "config.json")
    values, now = saved.flat(), config.flat()
    for key in given:
        if key == "config":
            continue
        new = now[key]
        if key in RESUMABLE:
            values[key] = new
        elif new != values[key]:
            raise ConfigError(
                f"--{key.replace('_', '-')} {new} differs from the checkpoint's {values[key]} "
                f"({run_dir}); a resumed run keeps its settings"
            )
    values.update(resume=True, run_name=run_dir.name)
    return validate_config(values)


# Images read already (a study reads its inputs before its first run), by data source
Loaded = dict[DataSource, ImageData]


def load_data(config: RaylocalConfig, loaded: Loaded | None = None) -> ImageData:
    """The config's images: from ``loaded`` when it holds them, else from their files."""
    source = data_source(config)
    data = (loaded or {}).get(source)
    return data if data is not None else source.load()


def finished_run(run_dir: Path) -> tuple[RaylocalConfig, ImageData, Glow]:
    """A finished run's config, images and trained model (in eval mode), from its directory."""
    for name in ("config.json", CHECKPOINT):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name} does not exist (a finished run's directory holds it)")
    config = load_config_file(run_dir / "config.json", recorded=True)
    data = load_data(config)
    glow = build_glow(config, data.shape)
    glow.load_state_dict(load_checkpoint(run_dir / CHECKPOINT, kind="run")["model"])
    glow.eval()
    return config, data, glow


def set_threads(config: RaylocalConfig) -> None:
    torch.set_num_threads(config.cluster.threads or len(os.sched_getaffinity(0)))


def run(config: RaylocalConfig, loaded: Loaded | None = None) -> dict[str, Any]:
    """Run ``config`` (its images from ``loaded`` when it holds them): in this
    process, or on Ray for the async schedule (see ``Run``)."""
    set_threads(config)
    return Run(config, load_data(config, loaded)).execute()
