"""Each rival tuned as its users would tune it, before the race: a small grid
per method and link, at one seed on a short budget. The race then runs each
method at each link with the setting that reached the lowest BPD there, on
training images held out from the sweep's training (``--sweep-validation``):
the race's test images never choose a setting.

One seed on a short budget is a coarse choice: two runs of one cell can differ
by about 0.1 BPD, so settings closer than that are a toss-up. The sweep's table
says which setting won, not that it is better.
"""

from __future__ import annotations

from typing import Any

from raylocal.bench.race import LABELS, Cell

# The settings a user of each method would try (cell_settings' keys); the first
# of each is the command line's default, what the race runs without a sweep.
SWEEP_GRID: dict[str, dict[str, dict[str, Any]]] = {
    "ddp": {
        "one-bucket": {"bucket_cap_mb": None, "ddp_compression": "none"},  # torch's default: 0.62 MB fit one
        "cap0.1MB": {"bucket_cap_mb": 0.1, "ddp_compression": "none"},  # several buckets: overlap with backward
        "cap0.1MB-bf16": {"bucket_cap_mb": 0.1, "ddp_compression": "bf16"},
        "cap0.1MB-powersgd": {"bucket_cap_mb": 0.1, "ddp_compression": "powersgd"},
    },
    "local-sgd": {
        **{f"H{h}": {"average_every": h, "outer_lr": None, "average_overlap": False} for h in (50, 10, 250, 1000)},
        # DiLoCo: its paper's outer LR (0.7), with more rounds in a short budget, and a gentler one
        "H250-diloco0.7": {"average_every": 250, "outer_lr": 0.7, "average_overlap": False},
        "H50-diloco0.7": {"average_every": 50, "outer_lr": 0.7, "average_overlap": False},
        "H250-diloco0.3": {"average_every": 250, "outer_lr": 0.3, "average_overlap": False},
        "H50-overlap": {"average_every": 50, "outer_lr": None, "average_overlap": True},
    },
    "parts": {
        "sync50-q1": {"sync_every": 50, "queue_size": 1},
        "sync500-q1": {"sync_every": 500, "queue_size": 1},
        "sync50-q4": {"sync_every": 50, "queue_size": 4},
    },
    "pipeline": {f"micro{m}": {"micro_batches": m} for m in (4, 2, 8)},
}


def tuned_at(link: str) -> str:
    """The link whose sweep tunes a condition: a link with outages or a straggler
    runs as it was tuned for the plain link (users tune for their link, not its faults)."""
    return link.split("+")[0]


def sweep_cells(links: list[str], seed: int, methods: list[str] | None = None) -> list[Cell]:
    """Every cell of the sweep, link by link (each plain link once), each method's
    grid in order (of ``methods`` alone when given)."""
    links = list(dict.fromkeys(tuned_at(link) for link in links))
    methods = methods or list(SWEEP_GRID)
    return [Cell(method, link, seed, variant) for link in links for method in methods for variant in SWEEP_GRID[method]]


def best_settings(
    results: dict[Cell, dict[str, Any]], links: list[str], methods: list[str] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per link and method (of ``methods`` alone when given), the grid setting with the lowest
    BPD (the first in the grid on a tie; a method none of whose cells finished keeps its first)."""
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for link in dict.fromkeys(tuned_at(link) for link in links):
        best[link] = {}
        for method in methods or SWEEP_GRID:
            grid = SWEEP_GRID[method]
            ran = [(results[c]["test_bpd"], i, c.variant) for i, c in enumerate(_cells(method, link, results))]
            ran = [r for r in ran if r[0] == r[0]]  # a NaN BPD never wins
            variant = min(ran)[2] if ran else next(iter(grid))
            best[link][method] = grid[variant] | {"variant": variant}
    return best


def _cells(method: str, link: str, results: dict[Cell, dict[str, Any]]) -> list[Cell]:
    return [c for v in SWEEP_GRID[method] for c in results if (c.method, c.link, c.variant) == (method, link, v)]


def race_settings(best: dict[str, dict[str, dict[str, Any]]], cell: Cell) -> dict[str, Any]:
    """The tuned settings a race cell runs with: its method's best at its link;
    the parts' fine-tune takes the parts' and DDP's (it may fine-tune on DDP).
    Without a sweep (no ``best``) the command line's settings stand."""
    at = best.get(tuned_at(cell.link))
    if not at:
        return {}
    if cell.method == "parts+ft":
        return at["parts"] | at["ddp"] | {"variant": f"{at['parts'].get('variant')}+{at['ddp'].get('variant')}"}
    return at.get(cell.method, {})


def sweep_table(
    results: dict[Cell, dict[str, Any]], links: list[str], methods: list[str] | None = None, scored: str = "test BPD"
) -> str:
    """One row per setting tried: its speed, traffic and BPD (``scored`` names the
    images: "held-out BPD" or "test BPD"), the winner marked."""
    best = best_settings(results, links, methods)
    links = list(best)
    rows = [
        f"| link | method | setting | images/s | bytes/step | idle % | {scored} | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for link in links:
        for method in best[link]:
            for c in _cells(method, link, results):
                r = results[c]
                chosen = "**yes**" if best[link][method]["variant"] == c.variant else ""
                if "failed" in r:
                    rows.append(f"| {link} | {LABELS[method]} | {c.variant} | failed: {r['failed']} |  |  |  |  |")
                    continue
                rows.append(
                    f"| {link} | {LABELS[method]} | {c.variant} | {r['images_per_s']:.0f} | "
                    f"{r['bytes_per_step'] / 1e3:.1f} kB | {100 * r['idle']:.1f} | {r['test_bpd']:.4f} | {chosen} |"
                )
    return "\n".join(rows)
