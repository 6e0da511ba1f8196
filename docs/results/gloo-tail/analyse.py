"""The declared reading of docs/results/gloo-tail (DECLARED.md), from the --gloo tables in a file.

    python docs/results/gloo-tail/analyse.py docs/results/gloo-tail/out.txt [RATE]

Per all-reduce after the first at RATE (default 1mbit): the early rank (the one that ended first)
and whether its sender had a retransmission timeout or a tail-loss probe in that all-reduce;
the share of such all-reduces among those that ended at least 100 ms apart and among the
others; and, descriptively, the retransmitted segments of the early and the late rank's sender.
"""

import re
import statistics
import sys
from pathlib import Path

FAR_MS = 100.0


def rows(text: str, rate: str) -> list[tuple[float, list[int], list[int]]]:
    """(rank 1's end - rank 0's in ms, rank 0's counters, rank 1's) per all-reduce row at ``rate``."""
    found = []
    for m in re.finditer(rf"^\| {re.escape(rate)} \| \d+ \| ([+-]\d+) \| ([\d / ]+) \| ([\d / ]+) \|(?: [\d.]+ \|)?$", text, re.M):
        counters = [[int(v) for v in m.group(g).split(" / ")] for g in (2, 3)]
        found.append((float(m.group(1)), *counters))
    return found


def main() -> None:
    path, rate = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "1mbit"
    far, near, early_resent, late_resent = [], [], [], []
    for apart, zero, one in rows(path.read_text(), rate):
        early, late = (zero, one) if apart > 0 else (one, zero)  # rank 1 ended later: rank 0 was early
        recovered = early[1] + early[2] > 0  # a retransmission timeout or a tail-loss probe
        (far if abs(apart) >= FAR_MS else near).append(recovered)
        early_resent.append(early[0])
        late_resent.append(late[0])
    n = len(far) + len(near)
    print(f"{rate}: {n} all-reduces, {len(far)} at least {FAR_MS:g} ms apart, {len(near)} under")
    share_far = sum(far) / len(far) if far else float("nan")
    share_near = sum(near) / len(near) if near else float("nan")
    print(f"early rank's sender timed out or probed: {sum(far)}/{len(far)} far apart ({share_far:.0%}), "
          f"{sum(near)}/{len(near)} under ({share_near:.0%})")
    if far and share_far >= 0.8 and (not near or share_near <= 0.2):
        reading = "shown: the ends apart follow TCP's recovery by timeout or probe"
    elif far and share_far <= 0.5:
        reading = "not shown to be the cause"
    else:
        reading = "undecided"
    print(f"declared reading: {reading}")
    if early_resent:
        print(f"descriptive: segments the early rank's sender retransmitted, median {statistics.median(early_resent):g} "
              f"(range {min(early_resent)}-{max(early_resent)}); the late rank's, median "
              f"{statistics.median(late_resent):g} (range {min(late_resent)}-{max(late_resent)})")


if __name__ == "__main__":
    main()
