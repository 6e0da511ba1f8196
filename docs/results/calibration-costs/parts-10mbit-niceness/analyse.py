"""The parts at 10 Mbit with Ray's workers at nice 15 (Ray's default) and at nice 0 (DECLARED.txt).

    python docs/results/calibration-costs/parts-10mbit-niceness/analyse.py [DIR]

DIR holds nice15/seedS/ and nice0/seedS/, each one calibration (parts-10mbit-real.json and
parts-10mbit-emulated.json). The declared question: the gap, real / twin - 1 of "s per step",
at nice 0 less at nice 15, paired by seed, against ±0.05. Descriptive: each gap, the part
actors' CPU seconds over their training, and the host's nice share (whether nice 0 took).
"""

import json
import sys
from pathlib import Path

from raylocal.study.stats import decide
from raylocal.tools.calibrate import figures

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
SEEDS = sorted(int(p.name.removeprefix("seed")) for p in (HERE / "nice15").glob("seed*"))
MARGIN = 0.05
NICE = {"nice15": None, "nice0": 0}  # what each calibration recorded (None: Ray's default, 15)


def cell(nice: str, seed: int, kind: str) -> dict:
    stored = json.loads((HERE / nice / f"seed{seed}" / f"parts-10mbit-{kind}.json").read_text())
    assert stored.get("worker_niceness") == NICE[nice], (nice, seed, kind)
    return stored


def step(nice: str, seed: int, kind: str) -> float:
    return figures("parts", cell(nice, seed, kind))["s per step"]


def gap(nice: str, seed: int) -> float:
    return step(nice, seed, "real") / step(nice, seed, "emulated") - 1


def training_cpu(nice: str, seed: int, kind: str) -> tuple[float, float]:
    """The part actors' CPU seconds over their training, and the host's nice share of its busy time then."""
    cpu = cell(nice, seed, kind)["cpu_training"]
    busy = sum(v for k, v in cpu["kernel"].items() if k not in ("idle", "iowait"))
    return cpu["roles"].get("part actors", 0.0), cpu["kernel"]["nice"] / busy


def main() -> None:
    print("| seed | workers at | s per step, real / twin | real / twin - 1 | part actors' CPU s, real / twin "
          "| host's nice share of busy CPU, real / twin |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for seed in SEEDS:
        for nice in NICE:
            (pr, nr), (pt, nt) = training_cpu(nice, seed, "real"), training_cpu(nice, seed, "emulated")
            print(f"| {seed} | {nice.replace('nice', 'nice ')} | {step(nice, seed, 'real'):.4f} / "
                  f"{step(nice, seed, 'emulated'):.4f} | {gap(nice, seed):+.3f} | {pr:.1f} / {pt:.1f} | "
                  f"{nr:.2f} / {nt:.2f} |")  # fmt: skip
    change = decide([gap("nice0", s) - gap("nice15", s) for s in SEEDS], MARGIN, ("narrower", "wider"))
    n = change["seeds_to_decide"]
    more = f"; about {n} repeats would decide it (80% power)" if n else ""
    print(f"\nThe declared question: the gap at nice 0 less the gap at nice 15, paired by seed: {change['mean']:+.3f} "
          f"[{change['lo']:+.3f}, {change['hi']:+.3f}] against ±{MARGIN}: {change['verdict']}{more}")  # fmt: skip
    for nice in NICE:
        each = decide([gap(nice, s) for s in SEEDS], 0.10, ("shorter", "longer"))
        print(f"descriptive, real / twin - 1 at {nice}: {each['mean']:+.3f} [{each['lo']:+.3f}, {each['hi']:+.3f}]")
    for kind in ("real", "emulated"):
        ratios = [step("nice0", s, kind) / step("nice15", s, kind) - 1 for s in SEEDS]
        print(f"descriptive, {kind}: s per step at nice 0 / at nice 15 - 1 by seed: "
              + ", ".join(f"{r:+.3f}" for r in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
