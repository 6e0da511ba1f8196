"""A run's records: what it writes in its directory and how it judges its model.

One ``RunRecords`` per process that trains or ends a run, opened on the run's
directory: the ``Run`` opens it for a single-process run and hands it to the
training session; the model service and the Ray Train worker that end an async
run open theirs on the same directory. It holds the TensorBoard curves and the
status line, the test-BPD evaluation (the same images, batch and cap for every
phase), the sample grids and where the checkpoint lives. Training state
(weights, optimizers, the stream) stays with the session that owns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raylocal.core.config import RaylocalConfig
from raylocal.core.runlog import Progress, RunLog
from raylocal.model.glow import Glow
from raylocal.model.objectives import sample_images
from raylocal.training.trainer import PartTrainer, StepResult, configured_bpd


class RunRecords:
    """A run's directory as one process writes it (see the module doc)."""

    def __init__(self, config: RaylocalConfig, test_images: Tensor, run_dir: Path) -> None:
        self.config, self.test_images = config, test_images
        self.log = RunLog(run_dir)
        self.progress = Progress(config.run.progress)

    @property
    def dir(self) -> Path:
        return self.log.dir

    @property
    def checkpoint_path(self) -> Path:
        return self.log.checkpoint_path

    def evaluate(self, glow: Glow, device: torch.device) -> float:
        """The model's test BPD (``--eval-batch-size``, at most ``--eval-cap`` images)."""
        return configured_bpd(self.config, glow, self.test_images, device)

    def evaluation(self, bpd: float, curve: list[dict[str, Any]], point: dict[str, Any]) -> float:
        """An evaluation made at ``point`` (its epoch, step and elapsed seconds), on the curve and in TensorBoard."""
        curve.append(point | {"test_bpd": bpd})
        self.log.scalar("model/test_bpd", bpd, int(point["step"]))
        return bpd

    def step(self, name: str, result: StepResult, trainer: PartTrainer, step: int) -> None:
        """One trainer's figures after a step (``name``: part1.., finetune)."""
        self.log.scalar(f"{name}/local_loss", result.loss, step)
        self.log.scalar(f"{name}/lr", trainer.lr, step)
        self.log.scalar(f"{name}/rollbacks", trainer.rollbacks, step)
        self.log.scalar(f"{name}/skipped_batches", trainer.skipped, step)
        if result.grad_norm == result.grad_norm:  # none (NaN) when the step was skipped
            self.log.scalar(f"{name}/grad_norm", result.grad_norm, step)

    def epoch(self, epoch: int, seconds: float, part_time: list[float]) -> None:
        """An epoch's wall time and each part's compute time so far."""
        self.log.scalar("epoch/wall_time", seconds, epoch)
        for k, t in enumerate(part_time):
            self.log.scalar(f"part{k + 1}/time_total", t, epoch)

    def samples(self, glow: Glow, step: int) -> Path | None:
        """A grid of ``--samples`` images at ``--temperature`` (none when it is 0): its path."""
        n, temperature = self.config.run.samples, self.config.run.temperature
        images = sample_images(glow, n, temperature) if n > 0 else None
        return self.log.samples(images, step, f"samples/T={temperature}")

    def paths(self, samples: Path | None) -> dict[str, str | None]:
        """Where the summary says the run's files are."""
        return {
            "run_dir": str(self.dir),
            "checkpoint": str(self.checkpoint_path),
            "samples": str(samples) if samples else None,
            "tensorboard": str(self.dir / "tensorboard"),
        }

    def close(self) -> None:
        self.log.close()
