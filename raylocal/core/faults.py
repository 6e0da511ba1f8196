"""Fault injection, so that reliability is tested by really breaking things.

``--inject`` takes comma-separated faults, parts 1-based:
  ray-kill:2@30   the driver kills part 2's actor with ``ray.kill`` once it passed step 30
  sigkill:2@30    part 2's process sends itself SIGKILL after step 30 (first life only);
                  part K+1 is the fine-tune (once per run directory)
  nan:2@30        part 2's weights are overwritten with NaN after step 30 (once)
  slow:2@0.05     part 2 sleeps 0.05 s after every step (a deliberately slow part)
"""

from __future__ import annotations

import os
import re
import signal
import time
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
        m = re.fullmatch(r"(ray-kill|sigkill|nan|slow):(\d+)@([0-9.]+)", item)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(f"inject {item!r} is not KIND:PART@STEP with KIND ray-kill, sigkill, nan or slow")
        faults.append(Fault(m.group(1), int(m.group(2)) - 1, float(m.group(3))))
    return faults


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
