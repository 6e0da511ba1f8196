"""The declared readings of docs/results/gloo-congestion (DECLARED.md), from its runs' --gloo tables.

    python docs/results/gloo-congestion/analyse.py docs/results/gloo-congestion/out.txt

Each run's table starts with the line "TCP congestion control: NAME; fenced: ...". Per run at
1 Mbit (all-reduces 2-8): the mean size of the ranks' ends apart, the mean all-reduce time as a
multiple of its bytes' time at the rate, and the segments both ranks' senders retransmitted per
all-reduce. Question A by the declared rule; question B as the paired ratio cubic ÷ bbr of the
mean all-reduce time, runs paired in the order they ran, with a 95% t interval.
"""

import re
import statistics
import sys
from pathlib import Path

from raylocal.study.stats import mean_interval

BYTES, RATE_BITS, FAR_MS = 617_728, 1e6, 100.0
BYTES_S = BYTES * 8 / RATE_BITS  # each rank sends and receives its gradient's bytes once in a two-rank ring
ROW = re.compile(r"^\| 1mbit \| \d+ \| ([+-]\d+) \| (\d+) / (\d+) / (\d+) \| (\d+) / (\d+) / (\d+) \| ([\d.]+) \|$", re.M)


def runs(text: str) -> list[tuple[str, list[tuple[float, int, float]]]]:
    """Per run in file order: its congestion control and, per 1 Mbit all-reduce, (apart ms,
    segments both senders retransmitted, seconds)."""
    found = []
    for chunk in re.split(r"^TCP congestion control: ", text, flags=re.M)[1:]:
        name = chunk.split(";")[0].split()[0]
        rows = [(float(m[0]), int(m[1]) + int(m[4]), float(m[7])) for m in ROW.findall(chunk)]
        found.append((name, rows))
    return found


def main() -> None:
    table = runs(Path(sys.argv[1]).read_text())
    by_name: dict[str, list[float]] = {"bbr": [], "cubic": []}
    means: dict[str, list[float]] = {"bbr": [], "cubic": []}
    print("| run | congestion control | mean size of the ends apart, ms | all-reduce ÷ its bytes' time, mean (range) "
          "| segments retransmitted per all-reduce, median (range) |")
    print("|---|---|---|---|---|")
    for i, (name, rows) in enumerate(table, start=1):
        apart = statistics.fmean(abs(a) for a, _, _ in rows)
        ratios = [s / BYTES_S for _, _, s in rows]
        resent = [r for _, r, _ in rows]
        by_name[name].append(statistics.fmean(s for _, _, s in rows))
        means[name].append(apart)
        print(f"| {i} | {name} | {apart:.0f} | {statistics.fmean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
              f"| {statistics.median(resent):g} ({min(resent)}-{max(resent)}) |")
    cubic_close = all(m <= FAR_MS for m in means["cubic"]) and all(m >= FAR_MS for m in means["bbr"])
    reading = ("the ends apart are BBR's" if cubic_close else "not BBR's alone" if all(m >= FAR_MS for m in means["cubic"])
               else "undecided")
    print(f"\nA (declared): cubic's mean sizes {[round(m) for m in means['cubic']]} ms, bbr's "
          f"{[round(m) for m in means['bbr']]} ms: {reading}")
    ratios = [c / b for b, c in zip(by_name["bbr"], by_name["cubic"])]
    mean, low, high = mean_interval(ratios)
    side = "cubic's shorter" if high < 1 else "cubic's longer" if low > 1 else "undecided"
    print(f"B (declared): all-reduce time cubic ÷ bbr, paired in run order: {mean:.3f} [{low:.3f}, {high:.3f}]: {side}")
    for name, seconds in by_name.items():
        print(f"  {name}: mean all-reduce {statistics.fmean(seconds):.3f} s = {statistics.fmean(seconds) / BYTES_S:.3f}x "
              f"its bytes' {BYTES_S:.3f} s (runs {', '.join(f'{s / BYTES_S:.3f}' for s in seconds)})")


if __name__ == "__main__":
    main()
