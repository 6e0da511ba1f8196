"""The TCP probe's table: per rate, two ways at once against one way.

    python docs/results/tcp-both-ways/analyse.py docs/results/tcp-both-ways/out.txt
"""

import re
import statistics
import sys

from raylocal.study.stats import mean_interval

rows: dict[str, list[tuple[float, float, float]]] = {}
for line in open(sys.argv[1]):
    m = re.match(r"\| (\w+) \| [\d,]+ \| [\d.]+ Mbit/s \| ([\d.]+)% \| .* \| ([\d.]+)% / ([\d.]+)% \|", line)
    if m:
        rows.setdefault(m.group(1), []).append(tuple(float(m.group(k)) / 100 for k in (2, 3, 4)))
print("| rate | one way, of the rate | both ways, each direction, of the rate | both ÷ one way (mean of the two directions) | mean [95% interval] | the slower direction's time ÷ the rate's |")
print("|---|---|---|---|---|---|")
for rate, repeats in rows.items():
    ratios = [(a + b) / 2 / one for one, a, b in repeats]
    mean, low, high = mean_interval(ratios)
    slower = [1 / min(a, b) for _, a, b in repeats]
    print(
        f"| {rate} | {', '.join(f'{one:.1%}' for one, _, _ in repeats)} "
        f"| {', '.join(f'{a:.1%} / {b:.1%}' for _, a, b in repeats)} | {', '.join(f'{r:.3f}' for r in ratios)} "
        f"| {mean:.3f} [{low:.3f}, {high:.3f}] | {', '.join(f'{s:.2f}' for s in slower)} (mean {statistics.fmean(slower):.2f}) |"
    )
