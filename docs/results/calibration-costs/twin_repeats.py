"""A real cell's figure against its two emulated twins, repeated. Each directory given holds
3 repeats (seed1-3/), each one calibration block of a real cell, its plain twin and its
costed twin, in an order that rotates with the seed; its DECLARED.txt says what was declared
before the runs. Per repeat, real / twin - 1 of the figure (``raylocal.tools.calibrate.figures``:
by default s per step, for the parts a step of the slower part); each twin's mean decided by
raylocal.study.stats against a margin of ±0.10 (issue 34's 10%), Holm over the two twins.

    python docs/results/calibration-costs/twin_repeats.py ddp-1mbit-repeats   # one 0.62 MB float32 bucket, 1 Mbit
    python docs/results/calibration-costs/twin_repeats.py ddp-tuned-10mbit    # the race's tuned DDP, 10 Mbit
    python docs/results/calibration-costs/twin_repeats.py local-sgd-100mbit "averaging %"   # another figure
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import adjust_family, decide
from raylocal.tools.calibrate import figures

HERE = Path(__file__).parent / sys.argv[1]
FIGURE = sys.argv[2] if len(sys.argv) > 2 else "s per step"
SEEDS = (1, 2, 3)
(CELL,) = {p.name.removesuffix("-real.json") for p in HERE.glob("seed*/*-real.json")}  # as ddp-1mbit
METHOD = CELL.rsplit("-", 1)[0]  # as ddp, local-sgd


def figure(seed: int, kind: str) -> float:
    cell = json.loads((HERE / f"seed{seed}" / f"{CELL}-{kind}.json").read_text())
    return figures(METHOD, cell)[FIGURE]


WHAT = "step" if FIGURE == "s per step" else FIGURE.removesuffix(" %")
WORDS = (f"real {WHAT} shorter", f"real {WHAT} longer")  # a ratio below 0, above 0


family = []
for kind in ("emulated", "costed"):
    ratios = [figure(s, "real") / figure(s, kind) - 1 for s in SEEDS]
    print(f"{kind}: real / twin - 1 per seed: " + ", ".join(f"{r:+.3f}" for r in ratios))
    family.append(decide(ratios, 0.10, WORDS) | {"twin": kind})
adjust_family(family, WORDS)
for d in family:
    more = f"; about {d['seeds_to_decide']} repeats would decide it (80% power)" if d["seeds_to_decide"] else ""
    print(
        f"{d['twin']}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.10: {d['verdict']}, "
        f"Holm {d['adjusted']}{more}"
    )
for s in SEEDS:
    print(
        f"seed {s}: {FIGURE} real {figure(s, 'real'):.2f}, emulated {figure(s, 'emulated'):.2f}, "
        f"costed {figure(s, 'costed'):.2f}"
    )
