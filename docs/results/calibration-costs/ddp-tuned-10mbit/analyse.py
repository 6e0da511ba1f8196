"""The race's tuned DDP (cap0.1MB-bf16) at 10 Mbit, its real step against its two emulated
twins, repeated. Declared before the runs (DECLARED.txt, committed before the first cell):
3 repeats (seeds 1, 2, 3), 30 s cells, each repeat one calibration block of a real cell,
its plain twin and its costed twin, in an order that rotates with the seed. Per repeat,
s per step real / twin - 1; each twin's mean decided by raylocal.study.stats against a
margin of ±0.10, Holm over the two twins.

    python docs/results/calibration-costs/ddp-tuned-10mbit/analyse.py
"""

import json
from pathlib import Path

from raylocal.study.stats import adjust_family, decide

HERE = Path(__file__).parent
SEEDS = (1, 2, 3)


def step_s(seed: int, kind: str) -> float:
    cell = json.loads((HERE / f"seed{seed}" / f"ddp-10mbit-{kind}.json").read_text())
    return cell["seconds"] / max(cell["steps"], 1)


family = []
for kind in ("emulated", "costed"):
    ratios = [step_s(s, "real") / step_s(s, kind) - 1 for s in SEEDS]
    print(f"{kind}: real / twin - 1 per seed: " + ", ".join(f"{r:+.3f}" for r in ratios))
    family.append(decide(ratios, 0.10) | {"twin": kind})
adjust_family(family)


def said(verdict: str) -> str:
    """decide's words are for BPD (lower is better): here lower is a shorter real step."""
    return verdict.replace("better", "real step shorter").replace("worse", "real step longer")


for d in family:
    more = f"; about {d['seeds_to_decide']} repeats would decide it (80% power)" if d["seeds_to_decide"] else ""
    print(
        f"{d['twin']}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.10: {said(d['verdict'])}, "
        f"Holm {said(d['adjusted'])}{more}"
    )
for s in SEEDS:
    print(
        f"seed {s}: s per step real {step_s(s, 'real'):.2f}, emulated {step_s(s, 'emulated'):.2f}, "
        f"costed {step_s(s, 'costed'):.2f}"
    )
