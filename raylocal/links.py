"""Link models: when the connection from part k to part k+1 is up.

Used to simulate intermittent communication: while a link is down, the
downstream part trains on latents it computes itself with its last synced
(stale) copy of the upstream weights.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from raylocal.errors import ConfigError


@dataclass(frozen=True)
class LinkModel:
    """When the link from part k to part k+1 is up, as a function of the sender's step.

    Spec (one per boundary, separated by ``|``; a single spec applies to all):
      ``up``                      always up
      ``p=0.9``                   up with probability 0.9 at each step (seeded)
      ``outage=100:20,300:50``    down for steps 100-119 and 300-349
    """

    kind: str = "up"
    p: float = 1.0
    outages: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    @classmethod
    def parse(cls, text: str, boundary: int = 0, seed: int = 0) -> LinkModel:
        specs = [s.strip() for s in text.split("|")]
        spec = specs[0] if len(specs) == 1 else (specs[boundary] if boundary < len(specs) else None)
        if spec is None:
            raise ConfigError(f"link {text!r} has {len(specs)} boundaries, boundary {boundary + 1} has none")
        if spec == "up":
            return cls()
        m = re.fullmatch(r"p=([0-9.eE+-]+)", spec)
        if m:
            try:
                p = float(m.group(1))
            except ValueError:
                p = -1.0
            if not 0 < p <= 1:
                raise ConfigError(f"link {spec!r}: p must be in (0, 1]")
            return cls("random", p=p, seed=seed * 1_000_003 + boundary)
        m = re.fullmatch(r"outage=((?:\d+:\d+)(?:,\d+:\d+)*)", spec)
        if m:
            outages = tuple(tuple(int(v) for v in o.split(":")) for o in m.group(1).split(","))
            if any(length <= 0 or start <= 0 for start, length in outages):
                raise ConfigError(f"link {spec!r}: outages need a start >= 1 and a length >= 1")
            return cls("outage", outages=outages)  # type: ignore[arg-type]
        raise ConfigError(f"link {spec!r} is not 'up', 'p=<probability>' or 'outage=START:LEN,...'")

    def is_up(self, step: int) -> bool:
        if self.kind == "random":
            return random.Random(self.seed * 7_919 + step).random() < self.p
        if self.kind == "outage":
            return not any(start <= step < start + length for start, length in self.outages)
        return True


def check_links(text: str, n_parts: int) -> None:
    for b in range(max(n_parts - 1, 1)):
        LinkModel.parse(text, b)
    if "|" in text and len(text.split("|")) != n_parts - 1:
        raise ConfigError(f"link {text!r} names {len(text.split('|'))} boundaries, {n_parts} parts have {n_parts - 1}")
