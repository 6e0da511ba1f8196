"""The suite-time block's table: each run's wall time (pytest's summary line), its
counts, and its per-test seconds split into the tests both suites hold
(kept_tests.txt, by file and function name), the tests only its own suite holds,
and the rest of its wall time (start-up, collection, fixtures' Ray session beyond
the first test's setup, times under 5 ms).

    python docs/results/suite-time/analyse.py docs/results/suite-time
"""

import re
import statistics
import sys
from pathlib import Path

where = Path(sys.argv[1])
kept = set((where / "kept_tests.txt").read_text().split())
rows = {"old": [], "new": []}
print("| run | commit | started-ended (UTC) | tests | wall s | in shared tests s | in its own other tests s | rest s |")
print("|---|---|---|---|---|---|---|---|")
for line in (where / "times.txt").read_text().splitlines():
    label, commit, span = line.split()[:3]
    log = where / f"{label}-{span.split('-')[0]}.txt"
    text = log.read_text()
    summary = text.strip().splitlines()[-1]
    wall = float(re.search(r"in ([\d.]+)s", summary).group(1))
    counts = re.sub(r"=+|in [\d.]+s.*", "", summary).strip()
    shared = other = 0.0
    for seconds, node in re.findall(r"^([\d.]+)s (?:setup|call|teardown)\s+(\S+)", text, re.M):
        function = node.split("[")[0]
        if function in kept:
            shared += float(seconds)
        else:
            other += float(seconds)
    rows[label].append((wall, shared, other))
    rest = wall - shared - other
    print(f"| {label} | {commit} | {span} | {counts} | {wall:.1f} | {shared:.1f} | {other:.1f} | {rest:.1f} |")
mean = {k: [statistics.fmean(col) for col in zip(*v)] for k, v in rows.items() if v}
if len(mean) == 2:
    names = ("wall", "in shared tests", "in its own other tests")
    ratios = [f"{n} {mean['new'][i] / mean['old'][i]:.3f}" for i, n in enumerate(names) if mean["old"][i]]
    print("\nnew ÷ old of the means: " + ", ".join(ratios))
