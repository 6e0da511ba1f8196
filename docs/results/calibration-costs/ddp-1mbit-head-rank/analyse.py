"""Which DDP rank ends its all-reduce later over the real 1 Mbit link under cubic (DECLARED.txt).

    python docs/results/calibration-costs/ddp-1mbit-head-rank/analyse.py

The directory holds seedS/ddp-1mbit-{real,emulated}.json.
"""

import json
import sys
from pathlib import Path

from raylocal.cluster.netns import Network
from raylocal.tools.calibrate import figures

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in HERE.glob("seed*"))
LAG, SHARE = "the head node's rank ended later by, ms", "steps the head node's rank ended later, %"
SKEW = "all-reduce skew ms, most - least worker"

print("| seed | the head node's rank | it ended later by, ms a step | in % of the steps after the first | skew ms |")
print("|---|---|---|---|---|")
rows = []
for s in SEEDS:
    cell = json.loads((HERE / f"seed{s}" / "ddp-1mbit-real.json").read_text())
    assert cell["congestion"] == "cubic" and cell["agent_report_ms"] is None, s
    shown = figures("ddp", cell)
    head = next(w["rank"] for w in cell["workers"] if cell["nodes"][w["node_id"]]["address"] == Network.address(0))
    rows.append(shown)
    print(f"| {s} | rank {head} | {shown[LAG]:+.0f} | {shown[SHARE]:.0f} | {shown[SKEW]:.0f} |")
if all(f[SHARE] >= 80 and f[LAG] >= 100 for f in rows):
    verdict = "the head node's rank ends later"
elif all(f[SHARE] <= 20 and f[LAG] <= -100 for f in rows):
    verdict = "the other rank ends later"
else:
    verdict = "no one rank"
print(f"\nBy the declared reading: {verdict}")
