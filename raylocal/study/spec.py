"""A study: arms that differ from a shared base, run over declared seeds and paired with a baseline arm."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylocal.errors import ConfigError


@dataclass
class Study:
    """Arms (overrides of ``base``) over seeds, each paired with its baseline arm."""

    name: str
    question: str
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    x: str = ""  # the figure's x axis: an override key every arm sets, or "staleness" (measured)
    contrasts: dict[str, str] = field(default_factory=dict)  # arm -> another arm it is also paired with
    tight_margin: float | None = None  # a second equivalence margin for the end-of-run comparison (TOST)

    def check(self) -> None:
        if self.baseline not in self.arms:
            raise ConfigError(f"study {self.name!r}: baseline {self.baseline!r} is not one of its arms")
        for arm, other in self.contrasts.items():
            if arm not in self.arms or other not in self.arms:
                raise ConfigError(f"study {self.name!r}: contrast {arm!r} - {other!r} names an arm it does not have")
        if self.x and self.x != "staleness" and any(self.x not in a for a in self.arms.values()):
            raise ConfigError(f"study {self.name!r}: x {self.x!r} is not set by every arm")
        names = list(self.arms)
        for arm, values in self.arms.items():
            other = values.get(EQUAL_TIME_OF)
            if other is not None and (other not in names[: names.index(arm)] or self.baseline == arm):
                raise ConfigError(
                    f"study {self.name!r}: {arm} is planned for the time of {other!r}, which must be an arm "
                    "listed before it (and it cannot be the baseline, whose epoch time plans it)"
                )

    def run_name(self, arm: str, seed: int) -> str:
        return f"{arm}-seed{seed}"


# An arm {"equal_time_of": ARM}: e2e planned from the start for the time ARM took
# (its own epochs, so its own warmup and decay), at the seed's e2e epoch time.
EQUAL_TIME_OF = "equal_time_of"


def keep_arms(study: Study, names: list[str]) -> None:
    """Narrow a study to some of its arms (and its baseline): more seeds for one
    comparison, without rerunning the rest."""
    unknown = [n for n in names if n not in study.arms]
    if unknown:
        raise ConfigError(f"--arms: {unknown[0]!r} is not an arm of study {study.name!r} ({', '.join(study.arms)})")
    study.arms = {a: o for a, o in study.arms.items() if a in names or a == study.baseline}
    study.contrasts = {a: o for a, o in study.contrasts.items() if a in study.arms and o in study.arms}


def rebase_lr(study: Study, lr: float) -> None:
    """The study at another base LR, under a name of its own (its runs are other
    runs: they are stored, and tabled, apart). Arms that set their LR keep it."""
    if not lr > 0:
        raise ConfigError(f"--base-lr: {lr:g} is not a positive LR")
    study.base = study.base | {"lr": [lr]}
    study.name += f"-lr{lr:g}"


def load_study(path: Path) -> Study:
    try:
        study = Study(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"--spec {path}: not a study ({str(e).splitlines()[0]})") from None
    study.check()
    return study
