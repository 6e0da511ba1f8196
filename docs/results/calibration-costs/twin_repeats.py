"""A real cell's figure against its emulated twins, repeated. Each directory given holds
3 repeats (seedN/), each one calibration block of a real cell (at one rate or more) and its
twins (plain, costed, apart: on the real cell's two nodes, unshaped), in an order that rotates with the seed; its
DECLARED.txt says what was declared before the runs. Per repeat, real / twin - 1 of the
figure (``raylocal.tools.calibrate.figures``: by default s per step, for the parts a step of
the slower part), and where the twin apart ran, apart / plain twin - 1 (the two nodes' share;
real / apart - 1 is the shaped link's own); each comparison's mean decided by
raylocal.study.stats against a margin of ±0.10 (issue 34's 10%), Holm over the question's
comparisons (every pair at every rate).

    python docs/results/calibration-costs/twin_repeats.py ddp-1mbit-repeats   # one 0.62 MB float32 bucket, 1 Mbit
    python docs/results/calibration-costs/twin_repeats.py ddp-tuned-10mbit    # the race's tuned DDP, 10 Mbit
    python docs/results/calibration-costs/twin_repeats.py local-sgd-100mbit "averaging %"   # another figure
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import adjust_family, decide, verdict
from raylocal.tools.calibrate import figures

HERE = Path(__file__).parent / sys.argv[1]
FIGURE = sys.argv[2] if len(sys.argv) > 2 else "s per step"
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in HERE.glob("seed*"))
CELLS = sorted({p.name.removesuffix("-real.json") for p in HERE.glob("seed*/*-real.json")})  # as ddp-1mbit
METHOD = CELLS[0].rsplit("-", 1)[0]  # as ddp, local-sgd: one per directory
KINDS = [
    k for k in ("real", "emulated", "costed", "apart") if (HERE / f"seed{SEEDS[0]}" / f"{CELLS[0]}-{k}.json").exists()
]
# (what is divided, by what): real by each twin, and the twin apart by the one-node twin
PAIRS = [("real", k) for k in KINDS[1:]] + ([("apart", "emulated")] if "apart" in KINDS else [])


def figure(seed: int, cell: str, kind: str) -> float:
    stored = json.loads((HERE / f"seed{seed}" / f"{cell}-{kind}.json").read_text())
    return figures(METHOD, stored)[FIGURE]


WHAT = "step" if FIGURE == "s per step" else FIGURE.removesuffix(" %")
family = []  # one question: every pair at every rate the directory holds
for cell in CELLS:
    named = f"{cell}: " if len(CELLS) > 1 else ""
    for ours, twin in PAIRS:
        words = (f"{ours} {WHAT} shorter", f"{ours} {WHAT} longer")  # a ratio below 0, above 0
        ratios = [figure(s, cell, ours) / figure(s, cell, twin) - 1 for s in SEEDS]
        print(f"{named}{ours} / {twin} - 1 per seed: " + ", ".join(f"{r:+.3f}" for r in ratios))
        family.append(decide(ratios, 0.10, words) | {"pair": f"{named}{ours} / {twin}", "words": words})
adjust_family(family)  # Holm over every comparison of the question; each verdict then in its own words
for d in family:
    if "p_difference_holm" in d:
        d["adjusted"] = verdict(d["p_difference_holm"], d["p_equivalence_holm"], d["mean"], 0.10, d["words"])
for d in family:
    more = f"; about {d['seeds_to_decide']} repeats would decide it (80% power)" if d["seeds_to_decide"] else ""
    shown = f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.10: {d['verdict']}"
    print(f"{d['pair']}: {shown}, Holm {d['adjusted']}{more}")
for cell in CELLS:
    for s in SEEDS:
        print(f"{cell} seed {s}: {FIGURE} " + ", ".join(f"{k} {figure(s, cell, k):.3g}" for k in KINDS))
