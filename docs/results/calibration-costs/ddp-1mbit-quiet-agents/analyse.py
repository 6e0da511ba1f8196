"""DDP at 1 Mbit under cubic, Ray's dashboard agents at their default period and quiet (DECLARED.txt).

    python docs/results/calibration-costs/ddp-1mbit-quiet-agents/analyse.py [DIR CONGESTION]

The directory holds default/seedS/ and quiet/seedS/, each one calibration (ddp-1mbit-{real,emulated}.json).
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import decide, mean_interval
from raylocal.tools.calibrate import figures

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
CONGESTION = sys.argv[2] if len(sys.argv) > 2 else "cubic"  # (the same block under bbr: ddp-1mbit-quiet-agents-bbr)
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in (HERE / "quiet").glob("seed*"))
SKEW, EXPOSED = "all-reduce skew ms, most - least worker", "all-reduce exposed ms per step"
TERMS = ("skew: the late worker began later by, ms", "skew: its forward and backward took longer by, ms",
         "skew: the early worker's update ended later by, ms")  # fmt: skip


def cell(arm: str, seed: int, kind: str) -> dict:
    stored = json.loads((HERE / arm / f"seed{seed}" / f"ddp-1mbit-{kind}.json").read_text())
    assert kind != "real" or (stored["congestion"], stored["agent_report_ms"]) == (
        CONGESTION,
        600000 if arm == "quiet" else None,
    ), (arm, seed)
    return stored


def agent_bytes(stored: dict) -> int:
    """What the dashboard agents sent the GCS over the link during the cell (the ledger's rows)."""
    rows = stored["connections"]
    return sum(r["to_near"] for r in rows if r["far"] == "DashboardAgent" and r["near"] == "gcs_server")


def shown(arm: str, seed: int, kind: str = "real") -> dict[str, float]:
    return figures("ddp", cell(arm, seed, kind))


print("| arm | seed | agents' bytes to the GCS | skew ms | (a) | (b) | (c) | exposed ms | twin's | step s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for arm in ("default", "quiet"):
    for s in SEEDS:
        f, twin = shown(arm, s), shown(arm, s, "emulated")
        terms = " | ".join(f"{f[t]:+.0f}" for t in TERMS)
        print(f"| {arm} | {s} | {agent_bytes(cell(arm, s, 'real'))} | {f[SKEW]:.0f} | {terms} | {f[EXPOSED]:.0f} | "
              f"{twin[EXPOSED]:.0f} | {f['s per step']:.3f} |")  # fmt: skip

ratios = [shown("quiet", s)[SKEW] / shown("default", s)[SKEW] - 1 for s in SEEDS]
mean, lo, hi = mean_interval(ratios)
said = "the skew falls by more than half" if hi < -0.5 else "not shown to fall by more than half"
print(f"\nQuestion 1, skew quiet / default - 1 per seed: {', '.join(f'{r:+.3f}' for r in ratios)}")
print(f"  {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]: {said}")
for arm, question in (("quiet", "Question 2"), ("default", "descriptive")):
    excess = [shown(arm, s)[EXPOSED] / shown(arm, s, "emulated")[EXPOSED] - 1 for s in SEEDS]
    d = decide(excess, 0.10, ("shorter", "longer"))
    more = f"; about {d['seeds_to_decide']} repeats would decide it" if d["seeds_to_decide"] else ""
    print(f"{question}, exposed all-reduce real {arm} / its twin - 1: {', '.join(f'{r:+.3f}' for r in excess)}")
    print(f"  {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against +-0.10: {d['verdict']}{more}")
