"""DDP's first broadcast at 1 Mbit under cubic, the twin holding the sender too (DECLARED.txt).

    python docs/results/calibration-costs/ddp-1mbit-wrap-sender/analyse.py [DIR [CONGESTION]]
    python docs/results/calibration-costs/ddp-1mbit-wrap-sender/analyse.py \
        docs/results/calibration-costs/ddp-1mbit-wrap-sender-bbr bbr

DIR holds seedS/ (one calibration each: ddp-1mbit-real.json and ddp-1mbit-emulated.json), its real
cells run under TCP's CONGESTION control (default cubic).
"""

import json
import sys
from pathlib import Path

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
CONGESTION = sys.argv[2] if len(sys.argv) > 2 else "cubic"
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in HERE.glob("seed*"))
WRAP_APART_S = 1.5  # declared: the twin's rank 0 wrap within this of the real one's, every seed
THROUGH_FIRST = 0.15  # declared: the twin's rank 0 wrap plus first step within 15% of the real one's


def figures(cell: dict) -> dict[str, float]:
    """Each rank's wrap, the start spread, rank 0's first step (began to its update's end), its wrap
    plus that step, and the seconds per step over all steps and after the first, s."""
    zero, one = (w for w in sorted(cell["workers"], key=lambda w: w["rank"]))
    rows = zero["steps"]
    wrap0 = zero["wrapped"][1] - zero["wrapped"][0]
    first0 = rows[0][1] - rows[0][0]
    return {
        "wrap 0": wrap0,
        "wrap 1": one["wrapped"][1] - one["wrapped"][0],
        "spread": one["steps"][0][0] - rows[0][0],
        "first step 0": first0,
        "through first 0": wrap0 + first0,
        "per step": cell["seconds"] / cell["steps"],
        "per step after first": (rows[-1][2] - rows[1][0]) / (len(rows) - 1),
    }


def main() -> None:
    print("| seed | link | rank 0's wrap, s | rank 1's wrap, s | rank 1 began later by, s | rank 0's first step, s "
          "| rank 0's wrap and first step, s | s per step | s per step after the first |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    apart, through, ratios = [], [], []
    for seed in SEEDS:
        f = {}
        for kind in ("real", "emulated"):
            cell = json.loads((HERE / f"seed{seed}" / f"ddp-1mbit-{kind}.json").read_text())
            if kind == "real":
                assert cell["congestion"] == CONGESTION, seed
            f[kind] = figures(cell)
            g = f[kind]
            print(f"| {seed} | {kind} | {g['wrap 0']:.2f} | {g['wrap 1']:.2f} | {g['spread']:.2f} | "
                  f"{g['first step 0']:.2f} | {g['through first 0']:.2f} | {g['per step']:.2f} | "
                  f"{g['per step after first']:.2f} |")  # fmt: skip
        real, twin = f["real"], f["emulated"]
        apart.append(abs(twin["wrap 0"] - real["wrap 0"]))
        through.append(twin["through first 0"] / real["through first 0"] - 1)
        after = real["per step after first"] / twin["per step after first"]
        ratios.append((real["per step"] / twin["per step"], after))
    one = all(a <= WRAP_APART_S for a in apart)
    two = all(abs(t) <= THROUGH_FIRST for t in through)
    print(f"\n1. the twin's rank 0 wrap within {WRAP_APART_S} s of the real one's, every seed: "
          f"{'holds' if one else 'does not hold'} (apart by {', '.join(f'{a:.2f}' for a in apart)} s)")
    print(f"2. the twin's rank 0 wrap and first step within {THROUGH_FIRST:.0%} of the real one's, every seed: "
          f"{'holds' if two else 'does not hold'} ({', '.join(f'{t:+.1%}' for t in through)}, twin against real)")
    print("descriptive, real / twin by seed: s per step " + ", ".join(f"{a:.3f}" for a, _ in ratios)
          + "; after the first " + ", ".join(f"{b:.3f}" for _, b in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
