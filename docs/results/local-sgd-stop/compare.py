"""Local SGD's plain twin at 100 Mbit before and after its stop without a meeting every step
(DECLARED.txt): per seed, after / before - 1 of images/s, decided against ±0.05.

    python docs/results/local-sgd-stop/compare.py docs/results/local-sgd-stop
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import decide

HERE = Path(sys.argv[1])
SEEDS = (1, 2, 3)


def cell(seed: int, version: str) -> dict:
    return json.loads((HERE / f"seed{seed}-{version}.json").read_text())


ratios = [cell(s, "after")["images_per_s"] / cell(s, "before")["images_per_s"] - 1 for s in SEEDS]
d = decide(ratios, 0.05, ("after slower", "after faster"))
more = f"; about {d['seeds_to_decide']} repeats would decide it (80% power)" if d["seeds_to_decide"] else ""
print("after / before - 1 of images/s per seed: " + ", ".join(f"{r:+.3f}" for r in ratios))
print(f"mean {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.05: {d['verdict']}{more}")
for s in SEEDS:
    for v in ("before", "after"):
        c = cell(s, v)
        print(
            f"seed {s} {v}: {c['images_per_s']:.0f} images/s, {c['steps']} steps in {c['seconds']:.1f} s; "
            f"waits at sync points {100 * c['sync']:.2f}%, rounds {100 * c['rounds']:.2f}% of the time"
        )
