"""DDP's 1 Mbit skew taken apart, under cubic and bbr (this directory's DECLARED.txt).

    python docs/results/calibration-costs/ddp-1mbit-skew-terms/analyse.py

The directory holds cubic/seedS/ and bbr/seedS/, each one calibration (the real cell and its plain
twin, ddp-1mbit-{real,emulated}.json). Per congestion control, seed and kind: the skew (ms a step),
its three terms (calibrate's skew_terms), whether they account for it (declared: within 20% of
the skew or 20 ms), and each term's share of it; then the declared reading for the real cells.
"""

import json
import sys
from pathlib import Path

from raylocal.tools.calibrate import figures

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
SKEW = "all-reduce skew ms, most - least worker"
TERMS = {
    "(a) late began later": "skew: the late worker began later by, ms",
    "(b) its compute longer": "skew: its forward and backward took longer by, ms",
    "(c) early ended later": "skew: the early worker's update ended later by, ms",
}


def shown(tcp: str, seed: int, kind: str) -> dict[str, float]:
    stored = json.loads((HERE / tcp / f"seed{seed}" / f"ddp-1mbit-{kind}.json").read_text())
    assert kind != "real" or stored.get("congestion") == tcp, (tcp, seed, stored.get("congestion"))
    return figures("ddp", stored)


def accounted(f: dict[str, float]) -> bool:
    residual = sum(f[t] for t in TERMS.values()) - f[SKEW]
    return abs(residual) <= max(0.2 * abs(f[SKEW]), 20.0)


print("| congestion | seed | cell | skew ms | " + " | ".join(TERMS) + " | sum | accounted |")
print("|---|---|---|---|" + "---|" * len(TERMS) + "---|---|")
for tcp in ("cubic", "bbr"):
    seeds = sorted(int(p.name.removeprefix("seed")) for p in (HERE / tcp).glob("seed*"))
    for seed in seeds:
        for kind in ("real", "emulated"):
            f = shown(tcp, seed, kind)
            terms = " | ".join(f"{f[t]:+.0f} ({f[t] / f[SKEW]:.0%})" for t in TERMS.values())
            total = sum(f[t] for t in TERMS.values())
            print(f"| {tcp} | {seed} | {kind} | {f[SKEW]:.0f} | {terms} | {total:+.0f} | {accounted(f)} |")
for tcp in ("cubic", "bbr"):
    seeds = sorted(int(p.name.removeprefix("seed")) for p in (HERE / tcp).glob("seed*"))
    real = [shown(tcp, s, "real") for s in seeds]
    if not real:
        continue
    valid = [f for f in real if accounted(f)]
    makers = [name for name, t in TERMS.items() if valid and all(f[t] >= 0.5 * f[SKEW] for f in valid)]
    means = ", ".join(f"{name} {sum(f[t] for f in real) / len(real):+.0f} ms" for name, t in TERMS.items())
    verdict = f"{' and '.join(makers)} makes the skew" if makers else "no one term makes the skew"
    print(f"\n{tcp}: the terms account for the skew in {len(valid)} of {len(real)} repeats; {verdict}")
    print(f"{tcp}: skew {sum(f[SKEW] for f in real) / len(real):.0f} ms at the mean; terms' means: {means}")
