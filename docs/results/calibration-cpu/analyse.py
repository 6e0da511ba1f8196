"""The parts at 100 Mbit: where the host's CPU went, over a real link against the emulated
twin (raylocal.tools.cpu_account). Three blocks, each declared before it ran (DECLARED.txt
beside its cells): 3 repeats (seeds 1, 2, 3) of 30 s cells, a real cell and its emulated twin
per repeat in an order that rotates with the seed. Per repeat, real minus emulated; mean and
95% interval over the repeats (raylocal.study.stats.mean_interval); the parts' rate, real /
emulated - 1, decided against ±0.10 (raylocal.study.stats.decide).

- the first block (seed1-3 here): over each cell's whole process, in the unit declared
  (cores used on average) and in CPU seconds;
- idle-instruments/: the same, with the instruments at SCHED_IDLE;
- training-window/: also over the parts' training alone (the cells' ``cpu_training``).

    python docs/results/calibration-cpu/analyse.py
    python docs/results/calibration-cpu/analyse.py idle-instruments
    python docs/results/calibration-cpu/analyse.py training-window
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import decide, mean_interval

HERE = Path(__file__).parent / (sys.argv[1] if len(sys.argv) > 1 else "")
SEEDS = (1, 2, 3)
RAY_OWN = ("raylet", "gcs_server", "queue actors", "other Ray workers", "Ray's helpers")
NICE_0 = ("raylet", "gcs_server", "cell driver", "Ray's helpers", "this process")  # above the niced Ray workers


def cell(seed: int, kind: str) -> dict:
    return json.loads((HERE / f"seed{seed}" / f"parts-100mbit-{kind}.json").read_text())


def figures(c: dict, over: str, per_second: bool) -> dict[str, float]:
    """One cell's figures ``over`` its process ("cpu") or its training ("cpu_training")."""
    cpu = c[over]
    wall = cpu["wall_s"] if per_second else 1.0
    roles = {role: seconds / wall for role, seconds in cpu["roles"].items()}
    # the ledger's ss processes are counted once per cell: prorated to the training by its share of the ledger's time
    ledger = c["cpu"].get("ledger_s", 0.0)  # (none in an emulated cell)
    ledger *= cpu["wall_s"] / c["ledger_seconds"] if over == "cpu_training" and ledger else 1.0
    out = {"part actors": roles.get("part actors", 0.0)}
    out["Ray's own processes"] = sum(roles.get(r, 0.0) for r in RAY_OWN)
    out |= {f"  of which {r}": roles.get(r, 0.0) for r in RAY_OWN}
    out["cell driver"] = roles.get("cell driver", 0.0)
    out["this process (sampling, the ledger's parsing)"] = roles.get("this process", 0.0)
    out["the ledger's ss processes (real cells)"] = (ledger if "ledger_seconds" in c else 0.0) / wall
    out["nice 0: raylets, GCS, driver, helpers, this process, ss"] = (
        sum(roles.get(r, 0.0) for r in NICE_0) + out["the ledger's ss processes (real cells)"]
    )
    out |= {f"host: {s}": cpu["kernel"][s] / wall for s in ("user", "nice", "system", "softirq", "idle")}
    out["host: system + softirq"] = out["host: system"] + out["host: softirq"]
    out["seconds of the window"] = cpu["wall_s"]
    return out


def table(over: str, per_second: bool) -> None:
    unit = "cores used on average" if per_second else "CPU seconds"
    span = "the training" if over == "cpu_training" else "the cell's process"
    print(f"\n| {unit} over {span} | real (mean of 3) | emulated (mean of 3) | real − emulated, seeds 1, 2, 3 | "
          "mean (95% interval) |")  # fmt: skip
    print("|---|---|---|---|---|")
    rows = {
        s: (figures(cell(s, "real"), over, per_second), figures(cell(s, "emulated"), over, per_second)) for s in SEEDS
    }
    for name in rows[SEEDS[0]][0]:
        real, twin = [rows[s][0][name] for s in SEEDS], [rows[s][1][name] for s in SEEDS]
        diffs = [a - b for a, b in zip(real, twin)]
        mean, lo, hi = mean_interval(diffs)
        print(
            f"| {name} | {sum(real) / 3:.3f} | {sum(twin) / 3:.3f} | "
            + ", ".join(f"{d:+.3f}" for d in diffs)
            + f" | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )


for over in ("cpu", "cpu_training") if "cpu_training" in cell(1, "real") else ("cpu",):
    for per_second in (True, False):
        table(over, per_second)
rates = [cell(s, "real")["images_per_s"] / cell(s, "emulated")["images_per_s"] - 1 for s in SEEDS]


def per_1000_images(c: dict) -> float:
    return 1000 * c["cpu"]["roles"]["part actors"] / (c["images_per_s"] * c["seconds"])


per_image = [[per_1000_images(cell(s, k)) for s in SEEDS] for k in ("real", "emulated")]
d = decide(rates, 0.10, words=("real slower", "real faster"))  # a rate below 0: the real link is slower
said = d["verdict"]
print(
    "\nimages/s real / emulated - 1, seeds 1, 2, 3: "
    + ", ".join(f"{r:+.3f}" for r in rates)
    + f"; {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] against ±0.10: {said}"
    + (f"; about {d['seeds_to_decide']} seeds would decide it (80% power)" if d["seeds_to_decide"] else "")
)
mean, lo, hi = mean_interval([a - b for a, b in zip(*per_image)])
print(f"part actors' CPU seconds (whole process) per 1000 images, real - emulated: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
