"""DDP's first broadcast over the real 1 Mbit link under cubic: where its time falls (DECLARED.txt).

    python docs/results/calibration-costs/ddp-1mbit-wrap/analyse.py [DIR]

DIR holds seedS/ (one calibration each: ddp-1mbit-real.json and ddp-1mbit-emulated.json).
"""

import json
import sys
from pathlib import Path

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in HERE.glob("seed*"))
BROADCAST_S = 2.5  # half the model's 625,840 bytes at 1 Mbit: what rank 0's real wrap must hold at least


def figures(cell: dict) -> dict[str, float]:
    """Each rank's wrap, the start spread and each rank's first step (began to its update's end), s."""
    zero, one = (w for w in sorted(cell["workers"], key=lambda w: w["rank"]))
    return {
        "wrap 0": zero["wrapped"][1] - zero["wrapped"][0],
        "wrap 1": one["wrapped"][1] - one["wrapped"][0],
        "spread": one["steps"][0][0] - zero["steps"][0][0],
        "first step 0": zero["steps"][0][1] - zero["steps"][0][0],
        "first step 1": one["steps"][0][1] - one["steps"][0][0],
        "start bytes": cell["start_bytes"],
    }


print("| seed | link | rank 0's wrap, s | rank 1's wrap, s | rank 1 began later by, s | first step, rank 0 / 1, s |")
print("|---|---|---|---|---|---|")
holds = []
for seed in SEEDS:
    for kind in ("real", "emulated"):
        cell = json.loads((HERE / f"seed{seed}" / f"ddp-1mbit-{kind}.json").read_text())
        if kind == "real":
            assert cell["congestion"] == "cubic", seed
        f = figures(cell)
        print(f"| {seed} | {kind} | {f['wrap 0']:.2f} | {f['wrap 1']:.2f} | {f['spread']:.2f} | "
              f"{f['first step 0']:.2f} / {f['first step 1']:.2f} |")  # fmt: skip
        if kind == "real":
            holds.append(f["wrap 0"] >= BROADCAST_S)
        else:
            holds.append(f["wrap 0"] < 0.5 and f["wrap 1"] >= 4.5)
said = "holds" if all(holds) else "does not hold"
print(f"\nThe declared reading (every real rank 0's wrap >= {BROADCAST_S} s; every twin's rank 0 < 0.5 s,")
print(f"rank 1 >= 4.5 s): {said} ({sum(holds)} of {len(holds)} cells)")
