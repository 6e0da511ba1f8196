"""The queue's placement at 10 Mbit, A/B: A = 8791ba19 with the queue actor left wherever
Ray puts it (the placement before fd096263, reverted in a worktree), B = 8791ba19 as is (the
queue in part 2's bundle). Three pairs, declared before the runs, order A B, B A, A B; one
calibration cell (real and twin) each. Paired by pair, decided by raylocal.study.stats.

    python docs/results/calibration-ledger/queue-place-ab/analyse.py
"""

import json
from pathlib import Path

from raylocal.study.stats import decide

HERE = Path(__file__).parent


def cell(arm: str, k: int, kind: str) -> dict:
    return json.loads((HERE / f"{arm}-{k}" / f"parts-10mbit-{kind}.json").read_text())


rows = {}
for k in (1, 2, 3):
    for arm in "AB":
        real, twin = cell(arm, k, "real"), cell(arm, k, "emulated")
        at_reader = real["queue_nodes"][0] == real["actor_nodes"][1]
        rows[(arm, k)] = (real["images_per_s"], twin["images_per_s"], real["images_per_s"] / twin["images_per_s"])
        print(f"{arm}{k}: real {rows[(arm, k)][0]:.0f} images/s, twin {rows[(arm, k)][1]:.0f}, "
              f"real/twin {rows[(arm, k)][2]:.3f}, queue on part 2's node: {at_reader}")  # fmt: skip
for name, index, margin in (("real/twin images/s", 2, 0.05), ("real images/s", 0, 25.0)):
    d = decide([rows[("B", k)][index] - rows[("A", k)][index] for k in (1, 2, 3)], margin)
    print(f"{name}, B - A: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}], margin ±{margin:g}: {d['verdict']}"
          f"; about {d['seeds_to_decide']} pairs would decide it (80% power)")  # fmt: skip
