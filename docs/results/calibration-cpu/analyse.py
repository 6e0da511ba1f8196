"""The parts at 100 Mbit: where the host's CPU went, over a real link against the
emulated twin. Declared before the runs: 3 repeats (seeds 1, 2, 3), 30 s cells, each
repeat one calibration block of a real cell and its emulated twin in an order that
rotates with the seed; each cell's CPU accounted by process role and by the host's
kernel states (raylocal.tools.cpu_account). Per repeat, real minus emulated, in CPU
seconds over the cell's process (both train for the same 30 s; the emulated cell's
process also starts its own Ray, the real one joins the namespaced cluster); mean and
95% interval over the repeats (raylocal.study.stats.mean_interval). No margin and no
verdict: this asks where, not whether.

    python docs/results/calibration-cpu/analyse.py                     # the first block (seed1-3 here)
    python docs/results/calibration-cpu/analyse.py idle-instruments    # the rerun, instruments at SCHED_IDLE
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import decide, mean_interval

HERE = Path(__file__).parent / (sys.argv[1] if len(sys.argv) > 1 else "")
SEEDS = (1, 2, 3)
RAY_OWN = ("raylet", "gcs_server", "queue actors", "other Ray workers", "Ray's helpers")


def cell(seed: int, kind: str) -> dict:
    return json.loads((HERE / f"seed{seed}" / f"parts-100mbit-{kind}.json").read_text())


def seconds(c: dict) -> dict[str, float]:
    cpu, wall = c["cpu"], 1.0  # CPU seconds, not shares of the window
    roles = dict(cpu["roles"])
    out = {"part actors": roles.get("part actors", 0.0), "cell driver": roles.get("cell driver", 0.0)}
    out["Ray's own processes"] = sum(roles.get(r, 0.0) for r in RAY_OWN)
    out |= {f"  of which {r}": roles.get(r, 0.0) for r in RAY_OWN}
    out["this process (sampling, the ledger's parsing)"] = roles.get("this process", 0.0)
    out["the ledger's ss processes (real cells)"] = cpu.get("ledger_s", 0.0) / wall
    out |= {f"host: {s}": cpu["kernel"][s] / wall for s in ("user", "nice", "system", "softirq", "idle")}
    out["images/s"] = c["images_per_s"]
    out["seconds of the cell's process"] = cpu["wall_s"]
    out["part actors' CPU seconds per 1000 images"] = 1000 * out["part actors"] / (c["images_per_s"] * c["seconds"])
    return out


rows = {s: (seconds(cell(s, "real")), seconds(cell(s, "emulated"))) for s in SEEDS}
print(
    "| CPU seconds (unless named) | real (mean of 3) | emulated (mean of 3) | "
    "real − emulated, seeds 1, 2, 3 | mean (95% interval) |"
)
print("|---|---|---|---|---|")
for name in rows[SEEDS[0]][0]:
    real = [rows[s][0][name] for s in SEEDS]
    twin = [rows[s][1][name] for s in SEEDS]
    diffs = [a - b for a, b in zip(real, twin)]
    mean, lo, hi = mean_interval(diffs)
    print(
        f"| {name} | {sum(real) / 3:.3f} | {sum(twin) / 3:.3f} | "
        + ", ".join(f"{d:+.3f}" for d in diffs)
        + f" | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
    )
ratios = [rows[s][0]["images/s"] / rows[s][1]["images/s"] - 1 for s in SEEDS]
d = decide(ratios, 0.10)
# (decide's words are for BPD, where lower is better: here "better" is "the real link is slower")
said = d["verdict"].replace("better", "real slower").replace("worse", "real faster")
print(
    "\nimages/s real / emulated - 1, seeds 1, 2, 3: "
    + ", ".join(f"{r:+.3f}" for r in ratios)
    + f"; {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.10: {said}"
    + (f"; about {d['seeds_to_decide']} seeds would decide it (80% power)" if d["seeds_to_decide"] else "")
)
