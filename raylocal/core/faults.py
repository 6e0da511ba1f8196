"""Fault injection, so that reliability is tested by really breaking things.

``--inject`` takes comma-separated faults, parts 1-based:
  ray-kill:2@30   the driver kills part 2's actor with ``ray.kill`` once it passed step 30
  sigkill:2@30    part 2's process sends itself SIGKILL after step 30 (first life only);
                  part K+1 is the fine-tune (once per run directory)
  nan:2@30        part 2's weights are overwritten with NaN after step 30 (once)
  slow:2@0.05     part 2 sleeps 0.05 s after every step (a deliberately slow part)
  straggle:2@2    part 2 (or DDP worker 2, or pipeline stage 2) runs 2x slower than its
                  hardware: after each piece of compute it waits once more as long
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from raylocal.errors import ConfigError


@dataclass(frozen=True)
class Fault:
    kind: str
    part: int  # 0-based
    at: float  # step, or seconds for "slow"


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(ray-kill|sigkill|nan|slow|straggle):(\d+)@([0-9.]+)", item)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(
                f"inject {item!r} is not KIND:PART@STEP with KIND ray-kill, sigkill, nan, slow or straggle"
            )
        if m.group(1) == "straggle" and float(m.group(3)) < 1:
            raise ConfigError(f"inject {item!r}: a straggler's factor is at least 1 (2: twice as slow)")
        faults.append(Fault(m.group(1), int(m.group(2)) - 1, float(m.group(3))))
    return faults


class Straggler:
    """Worker, part or stage ``index`` (0-based) made ``factor`` times slower
    than its hardware, as a ``straggle`` fault says (factor 1: no straggler).
    After each piece of compute it waits ``factor - 1`` times as long; the
    caller times the compute alone, so a slow link is not slowed again."""

    def __init__(self, faults: list[Fault], index: int, sleep: Callable[[float], None] = time.sleep) -> None:
        self.factor = next((f.at for f in faults if f.kind == "straggle" and f.part == index), 1.0)
        self.sleep = sleep
        self.waited_s = 0.0

    def after(self, compute_s: float) -> None:
        wait = (self.factor - 1.0) * max(compute_s, 0.0)
        if wait > 0:
            self.sleep(wait)
            self.waited_s += wait


def apply_worker_faults(faults: list[Fault], worker, first_life: bool) -> None:  # noqa: ANN001
    """Called after each step of a part (in its own process)."""
    for f in faults:
        if f.part != worker.index:
            continue
        if f.kind == "slow" and worker.step > 0:
            time.sleep(f.at)
        elif f.kind == "nan" and worker.step == int(f.at) and first_life:
            with torch.no_grad():
                next(worker.part.parameters()).fill_(float("nan"))
        elif f.kind == "sigkill" and worker.step == int(f.at) and first_life:
            os.kill(os.getpid(), signal.SIGKILL)


def apply_finetune_faults(faults: list[Fault], index: int, step: int, run_dir: Path) -> None:
    """Called after each fine-tune step (the fine-tune is part ``index`` = K,
    0-based). A sigkill fires once per run directory: the process that resumes
    the run after it (a restarted Ray Train worker) goes on past that step."""
    for f in faults:
        if f.kind == "sigkill" and f.part == index and step == int(f.at):
            marker = run_dir / f".fault-sigkill-{f.part + 1}@{int(f.at)}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
