"""A run's directory and what is written there: TensorBoard curves, sample grids,
checkpoints, the summary; and a small progress bar with live BPD."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from raylocal.core.checkpoint import atomic_write
from raylocal.errors import CheckpointError, ConfigError

CHECKPOINT = "checkpoint.pt"


def _storage_root(storage_path: str) -> Path:
    root = Path(storage_path).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage_path {str(root)!r} is not writable ({e.strerror or e})") from None
    return root


def has_checkpoint(run_dir: Path) -> bool:
    """A run that can be resumed: a run checkpoint, or (async) part checkpoints."""
    return (run_dir / CHECKPOINT).is_file() or any((run_dir / "parts").glob("part*.pt"))


def resolve_run_dir(storage_path: str, run_name: str | None, resume: bool, fresh_prefix: str) -> Path:
    """storage_path/run_name. With ``resume`` and no ``run_name``: the newest run
    under storage_path that has a checkpoint; a fresh run with no name gets
    ``fresh_prefix`` and the time it starts."""
    root = _storage_root(storage_path)
    if run_name:
        run_dir = root / run_name
        if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
            raise ConfigError(f"run_name {run_name!r}: {run_dir} is not a directory (a file or a broken link)")
        if resume and not has_checkpoint(run_dir):
            raise CheckpointError(f"--resume: no checkpoint at {run_dir / CHECKPOINT}")
        return run_dir
    if resume:
        runs = sorted((d for d in root.iterdir() if d.is_dir() and has_checkpoint(d)), key=lambda d: d.stat().st_mtime)
        if not runs:
            raise CheckpointError(f"--resume: no run with a checkpoint under {root}")
        return runs[-1]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{fresh_prefix}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{fresh_prefix}-{stamp}-{suffix}"
    return run_dir


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=float) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class Progress:
    """One status line, redrawn in place on a terminal and printed every
    ``every`` seconds otherwise (logs stay readable under Ray and CI)."""

    def __init__(self, enabled: bool = True, every: float = 15.0, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._start = time.perf_counter()

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = time.strftime("%M:%S", time.gmtime(now - self._start))
        line = f"[{elapsed}] {text}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(100))
            if force:
                self.stream.write("\n")
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last = now


class RunLog:
    """TensorBoard writer plus the files of a run directory."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / CHECKPOINT

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def samples(self, images: torch.Tensor | None, step: int, tag: str) -> Path | None:
        """A grid of ``images`` (in [0, 1]; None draws none): to TensorBoard as ``tag`` and samples.png."""
        if images is None:
            return None
        from torchvision.utils import make_grid, save_image

        grid = make_grid(images, nrow=int(len(images) ** 0.5) or 1)
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)
        path = self.dir / "samples.png"
        atomic_write(path, lambda f: save_image(grid, f, format="png"))
        return path

    def link_report(self, report: dict[str, Any], step: int) -> None:
        """A parts phase's link figures (its pipeline report), per part: 2.. for
        what a part received, 1.. for what it sent or waited."""
        for k, idle in enumerate(report.get("idle_s", [])):
            self.scalar(f"part{k + 1}/idle_s", idle, step)
        for k in range(len(report.get("fresh_steps", []))):
            tag = f"part{k + 2}"
            self.scalar(f"{tag}/fresh_steps", report["fresh_steps"][k], step)
            self.scalar(f"{tag}/stale_input_steps", report["stale_steps"][k], step)
            for q in ("mean", "p50", "p95", "max"):
                self.scalar(f"{tag}/upstream_steps_behind_{q}", report["behind_steps"][k][q], step)
                self.scalar(f"{tag}/seconds_behind_upstream_{q}", report["behind_s"][k][q], step)
        for k in range(len(report.get("dropped_latents", []))):
            self.scalar(f"part{k + 1}/latents_dropped_queue_full", report["dropped_latents"][k], step)
            self.scalar(f"part{k + 1}/latents_lost_to_outages", report["outage_latents"][k], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
