"""A real cell under two TCP congestion controls, against its twin (the directory's DECLARED.txt).

    python docs/results/calibration-costs/congestion_repeats.py ddp-1mbit-congestion [FIGURE]
    python docs/results/calibration-costs/congestion_repeats.py parts-10mbit-congestion "s per step"

The directory holds cubic/seedN/ and bbr/seedN/, each one calibration of one method at one rate
(the real cell and its plain twin) run under that congestion control. Per seed: real / twin - 1
under each, and real cubic / real bbr - 1 (paired by seed). Question 1: the two real / twin
comparisons, against ±0.10, Holm over the two; question 2: cubic / bbr alone, against ±0.10.
FIGURE as in twin_repeats.py (default: "all-reduce exposed ms per step", DDP's most exposed
worker's).
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import adjust_family, decide
from raylocal.tools.calibrate import figures

HERE = Path(__file__).parent / sys.argv[1]
FIGURE = sys.argv[2] if len(sys.argv) > 2 else "all-reduce exposed ms per step"
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in (HERE / "cubic").glob("seed*"))
CELL = next((HERE / "cubic").glob("seed*/*-real.json")).name.removesuffix("-real.json")  # as ddp-1mbit
METHOD = CELL.rsplit("-", 1)[0]


def figure(tcp: str, seed: int, kind: str) -> float:
    stored = json.loads((HERE / tcp / f"seed{seed}" / f"{CELL}-{kind}.json").read_text())
    assert kind != "real" or stored.get("congestion") == tcp, (tcp, seed, stored.get("congestion"))
    return figures(METHOD, stored)[FIGURE]


def compared(name: str, ratios: list[float]) -> dict:
    print(f"{name} - 1 per seed: " + ", ".join(f"{r:+.3f}" for r in ratios))
    return decide(ratios, 0.10, ("shorter", "longer")) | {"pair": name}


def shown(d: dict) -> str:
    more = f"; about {d['seeds_to_decide']} repeats would decide it (80% power)" if d["seeds_to_decide"] else ""
    return f"{d['pair']}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.10, Holm {d['adjusted']}{more}"


first = [compared(f"real {tcp} / its twin", [figure(tcp, s, "real") / figure(tcp, s, "emulated") - 1 for s in SEEDS])
         for tcp in ("cubic", "bbr")]
adjust_family(first, ("shorter", "longer"))
second = [compared("real cubic / real bbr", [figure("cubic", s, "real") / figure("bbr", s, "real") - 1 for s in SEEDS])]
adjust_family(second, ("shorter", "longer"))
print(f"\n{FIGURE}, question 1 (Holm over two):")
print("\n".join(shown(d) for d in first))
print(f"{FIGURE}, question 2:")
print(shown(second[0]))
for s in SEEDS:
    print(f"seed {s}: " + ", ".join(f"{tcp} {k} {figure(tcp, s, k):.4g}" for tcp in ("cubic", "bbr")
                                    for k in ("real", "emulated")))
