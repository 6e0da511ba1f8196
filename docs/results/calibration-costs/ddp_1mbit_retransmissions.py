"""DDP's real 1 Mbit cells, read again (nothing run): gloo's connection's resent bytes against the excess.

    python docs/results/calibration-costs/ddp_1mbit_retransmissions.py

Every stored DDP 1 Mbit block whose real cells carry the connection ledger (skew-terms, quiet-agents,
head-rank, quiet-agents-bbr): for each real cell, its congestion control, the payload delivered on the
connections between the two Ray Train workers (gloo's, both ways), the bytes its senders retransmitted (most
of them dropped by tbf before the wire: they are not in the kernel's interface count), and the most exposed
worker's all-reduce over its own twin's. A post hoc reading of cells run for other questions: descriptive.
"""

import json
from pathlib import Path

from raylocal.tools.calibrate import figures

HERE = Path(__file__).parent
BLOCKS = ("ddp-1mbit-skew-terms", "ddp-1mbit-quiet-agents", "ddp-1mbit-head-rank", "ddp-1mbit-quiet-agents-bbr")
EXPOSED = "all-reduce exposed ms per step"


def between_workers(cell: dict) -> tuple[int, int]:
    """Payload delivered both ways and bytes resent, over every connection between the two workers (gloo's)."""
    ends = ("RayTrainWorker", "?")  # (an end the ledger did not name: in one cell, gloo's 14 MB)
    rows = [
        r
        for r in cell["connections"]
        if {r["far"], r["near"]} <= set(ends) and "RayTrainWorker" in (r["far"], r["near"])
    ]
    return sum(r["to_near"] + r["to_far"] for r in rows), sum(r["retransmitted"] for r in rows)


rows: dict[str, list[tuple[float, float]]] = {}
print("| block | cell | congestion | agents | steps | gloo's payload, MB | resent ÷ payload", end=" ")
print("| exposed all-reduce, real ÷ twin − 1 |")
print("|---|---|---|---|---|---|---|---|")
for block in BLOCKS:
    for path in sorted((HERE / block).rglob("ddp-1mbit-real.json")):
        real = json.loads(path.read_text())
        twin = json.loads(path.with_name("ddp-1mbit-emulated.json").read_text())
        payload, resent_bytes = between_workers(real)
        excess = figures("ddp", real)[EXPOSED] / figures("ddp", twin)[EXPOSED] - 1
        resent = resent_bytes / payload
        agents = "quiet" if real.get("agent_report_ms") else "default"
        rows.setdefault(f"{real['congestion']}, agents {agents}", []).append((resent, excess))
        cell = str(path.parent.relative_to(HERE / block))
        print(f"| {block} | {cell} | {real['congestion']} | {agents} | {real['steps']} | {payload / 1e6:.2f} | "
              f"{resent:.2f} | {excess:+.3f} |")  # fmt: skip
print()
for arm, pairs in sorted(rows.items()):
    resent, excess = zip(*pairs)
    print(f"{arm}: {len(pairs)} cells, resent ÷ payload {min(resent):.2f}-{max(resent):.2f}, "
          f"excess {min(excess):+.3f} to {max(excess):+.3f}")  # fmt: skip
