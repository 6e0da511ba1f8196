"""The weak-link race as a study: blocks run side by side, seeds paired, the
verdicts decided by the studies' own statistics (``raylocal.study.stats``).

A **block** is one link and one seed: every contestant, one device included,
back to back, so that every comparison inside it sees the same host speed. The
order rotates by one place from block to block (no method always runs first,
or last); the parts' fine-tune runs last, since it starts from the block's
parts weights and chooses between the block's one-device and DDP cells.

Across seeds, each method is compared at each link with the best other method
there (the lowest mean test BPD): paired by seed, the mean difference with its
95% interval, a t-test and TOST against ±0.02, Holm-adjusted within the link.
Speeds are compared as per-block ratios (parts over DDP, over one device), so
a slow hour of the host cancels.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylocal.study.stats import adjust_distinct, adjust_family, decide, mean_interval

CONTESTANTS = ("one-device", "ddp", "local-sgd", "pipeline", "parts")
AFTER_ALL = "parts+ft"  # needs the block's parts weights and its one-device and DDP speeds
METHODS = CONTESTANTS + (AFTER_ALL,)
# each contestant's run (local SGD is DDP's): what its messages are, and so what a real link charges it
SCHEDULES = {"one-device": "e2e", "ddp": "data-parallel", "local-sgd": "data-parallel", "pipeline": "pipeline",
             "parts": "async"}  # fmt: skip
LABELS = {
    "one-device": "one device", "ddp": "2 DDP workers", "local-sgd": "2 local-SGD workers",
    "pipeline": "2-stage pipeline (1F1B)", "parts": "2 parts", AFTER_ALL: "2 parts + fine-tune",
}  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One contestant in one block (or, with a ``variant``, one setting of the sweep before the race)."""

    method: str
    link: str
    seed: int
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-{self.link}-s{self.seed}" + (f"-{self.variant}" if self.variant else "")


def block_order(block: int, methods: tuple[str, ...] = METHODS) -> list[str]:
    """The raced ``methods`` of the ``block``-th block in the order they run."""
    raced = [m for m in CONTESTANTS if m in methods]
    shift = block % len(raced)
    return raced[shift:] + raced[:shift] + ([AFTER_ALL] if AFTER_ALL in methods else [])


def race_cells(links: list[str], seeds: list[int], methods: tuple[str, ...] = METHODS) -> list[Cell]:
    """Every cell of the race, in the order it runs: block by block, per seed
    every link (so that an interrupted race has whole seeds first). Each link's
    order moves one place from seed to seed, however many links and methods."""
    return [
        Cell(m, link, seed)
        for i, seed in enumerate(seeds)
        for j, link in enumerate(links)
        for m in block_order(i + j, methods)
    ]


def check_methods(methods: tuple[str, ...]) -> None:
    """A race of some methods only: two at least, and the fine-tune with what it starts from and chooses between."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"{bad[0]!r} is not one of {', '.join(METHODS)}")
    if len(set(methods)) < 2:
        raise ValueError(f"{','.join(methods)}: a race needs two methods at least")
    if AFTER_ALL in methods:
        missing = [m for m in ("parts", "one-device", "ddp") if m not in methods]
        if missing:
            raise ValueError(f"{AFTER_ALL} needs {missing[0]} too (it starts from the block's parts weights "
                             "and chooses between its one-device and DDP cells)")  # fmt: skip


def _ranked(bpd: float) -> float:
    """A mean BPD as ``min`` ranks it: a failed method's NaN is never the best."""
    return math.inf if math.isnan(bpd) else bpd


def _bpd(result: dict[str, Any]) -> float:
    return float(result["test_bpd"])


def _raced(results: dict[Cell, dict[str, Any]], method: str, link: str, seeds: list[int]) -> bool:
    return all(Cell(method, link, s) in results for s in seeds)


def compare_at_link(results: dict[Cell, dict[str, Any]], link: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Each method against the best other method at ``link`` (lowest mean test
    BPD over the seeds), paired by seed; one Holm family of the distinct pairs."""
    methods = [m for m in METHODS if _raced(results, m, link, seeds)]
    means = {m: statistics.fmean(_bpd(results[Cell(m, link, s)]) for s in seeds) for m in methods}
    rows = []
    for m in methods:
        others = [o for o in methods if o != m]
        if not others:
            continue
        best = min(others, key=lambda o: _ranked(means[o]))
        diffs = [_bpd(results[Cell(m, link, s)]) - _bpd(results[Cell(best, link, s)]) for s in seeds]
        rows.append({"link": link, "method": m, "mean_bpd": means[m], "against": best} | decide(diffs))
    adjust_distinct(rows, lambda row: frozenset((row["method"], row["against"])))
    return rows


def block_ratio(results: dict[Cell, dict[str, Any]], link: str, seeds: list[int], top: str, bottom: str) -> list[float]:
    """``top``'s images/s over ``bottom``'s, block by block."""
    return [results[Cell(top, link, s)]["images_per_s"] / results[Cell(bottom, link, s)]["images_per_s"] for s in seeds]


def _interval(values: list[float], digits: int = 2) -> str:
    mean, lo, hi = mean_interval(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def results_table(results: dict[Cell, dict[str, Any]], links: list[str], seeds: list[int]) -> str:
    """Per link and method: means over the seeds, and the paired verdict against
    the best other method there (raw, and Holm-adjusted within the link)."""
    rows = [
        f"| link | method | images/s (mean of {len(seeds)}) | slower than one device | bytes/step | idle % | "
        "test BPD (mean [95% interval]) | − best other (95% interval) | verdict | Holm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for link in links:
        for c in compare_at_link(results, link, seeds):
            cells = [results[Cell(c["method"], link, s)] for s in seeds]
            speed = bytes_ = idle = slower = ""
            if c["method"] != AFTER_ALL:
                speed = f"{statistics.fmean(r['images_per_s'] for r in cells):.0f}"
                if _raced(results, "one-device", link, seeds):
                    ones = [results[Cell("one-device", link, s)]["images_per_s"] for s in seeds]
                    slower = f"{sum(r['images_per_s'] < o for r, o in zip(cells, ones))} of {len(seeds)} blocks"
                bytes_ = _mb(statistics.fmean(r["bytes_per_step"] for r in cells))
                idle = f"{100 * statistics.fmean(r['idle'] for r in cells):.1f}"
            interval = "" if math.isnan(c["lo"]) else f" [{c['lo']:+.3f}, {c['hi']:+.3f}]"
            diff = f"{c['mean']:+.3f}{interval} vs {c['against']}"
            mean, lo, hi = mean_interval([_bpd(r) for r in cells])
            bpd = f"{mean:.4f}" + ("" if len(seeds) < 2 else f" [{lo:.2f}, {hi:.2f}]")
            rows.append(
                f"| {link} | {LABELS[c['method']]} | {speed} | {slower} | {bytes_} | {idle} | {bpd} | "
                f"{diff} | {c['verdict']} | {c['adjusted']} |"
            )
    return "\n".join(rows)


def twins_table(
    real: dict[Cell, dict[str, Any]], emulated: dict[Cell, dict[str, Any]], links: list[str], seeds: list[int]
) -> str:
    """Each method over real links against its emulated twin (the same settings,
    in blocks of its own), paired by seed: its images/s over its own block's one
    device, real against emulated, and its test BPD, real minus emulated, with
    the verdict raw and Holm-adjusted within the link."""
    rows = [
        "| link | method | images/s ÷ its block's one device: real / emulated | real ÷ emulated (95% interval) | "
        "test BPD: real / emulated (mean) | real − emulated (95% interval) | verdict | Holm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for link in links:
        methods = [m for m in METHODS if all(Cell(m, link, s) in real and Cell(m, link, s) in emulated for s in seeds)]
        family = []
        for m in methods:
            diffs = [_bpd(real[Cell(m, link, s)]) - _bpd(emulated[Cell(m, link, s)]) for s in seeds]
            family.append({"method": m} | decide(diffs))
        adjust_family(family)
        for d in family:
            m, speed, ratio = d["method"], "", ""
            floor = all(_raced(r, "one-device", link, seeds) for r in (real, emulated))
            if m not in (AFTER_ALL, "one-device") and floor:
                ours, theirs = (block_ratio(r, link, seeds, m, "one-device") for r in (real, emulated))
                speed = f"{statistics.fmean(ours):.2f} / {statistics.fmean(theirs):.2f}"
                ratio = _interval([a / b for a, b in zip(ours, theirs)])
            bpd = " / ".join(
                f"{statistics.fmean(_bpd(r[Cell(m, link, s)]) for s in seeds):.4f}" for r in (real, emulated)
            )
            interval = "" if math.isnan(d["lo"]) else f" [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            rows.append(
                f"| {link} | {LABELS[m]} | {speed} | {ratio} | {bpd} | {d['mean']:+.3f}{interval} | {d['verdict']} | "
                f"{d['adjusted']} |"
            )
    return "\n".join(rows)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3g} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.3g} kB"


def check_targets(results: dict[Cell, dict[str, Any]], links: list[str], seeds: list[int]) -> list[str]:
    """The issue's targets, each from per-block ratios or paired differences
    (those whose methods a race of some methods left out are not shown)."""

    def raced(*methods: str) -> bool:
        return all(_raced(results, m, link, seeds) for m in methods for link in links)

    lines = []
    if "10Mbit" in links and raced("parts", "ddp"):
        ratio = block_ratio(results, "10Mbit", seeds, "parts", "ddp")
        lines.append(f"10 Mbit: parts / DDP images/s = {_interval(ratio)} (target >= 1.5x): "
                     f"{_met(statistics.fmean(ratio) >= 1.5)}")  # fmt: skip
    for link in ("10Mbit", "1Mbit"):
        if link in links and raced("parts") and any(raced(r) for r in RIVALS):
            lines.append(parts_against_rivals(results, link, seeds))
    if not raced("parts", "one-device"):
        return lines
    if "10Mbit" in links and "10Mbit+outages" in links:
        # each link's parts speed over its own block's one device: the host's drift cancels
        down = block_ratio(results, "10Mbit+outages", seeds, "parts", "one-device")
        up = block_ratio(results, "10Mbit", seeds, "parts", "one-device")
        kept = [d / u for d, u in zip(down, up)]
        lines.append(f"10 Mbit with outages: parts keep {_interval([100 * k for k in kept], 0)}% of their images/s "
                     f"(target >= 90%): {_met(statistics.fmean(kept) >= 0.9)}")  # fmt: skip
    if "10Mbit" in links and "10Mbit+straggler" in links:
        lines += straggler_lines(results, seeds)
    if "inf" in links:
        idle = [results[Cell("parts", "inf", s)]["idle"] for s in seeds]
        speedup = block_ratio(results, "inf", seeds, "parts", "one-device")
        lines.append(f"inf: parts idle {_interval([100 * i for i in idle], 1)}% (target < 2%): "
                     f"{_met(statistics.fmean(idle) < 0.02)}")  # fmt: skip
        each = ", ".join(f"{r:.2f}" for r in speedup)
        lines.append(
            f"inf: parts / one device = {statistics.median(speedup):.2f}x median of {len(seeds)} blocks ({each}; "
            f"mean {_interval(speedup)}; target >= 1.75x): {_met(statistics.median(speedup) >= 1.75)}"
        )
    return lines


RIVALS = ("ddp", "local-sgd", "pipeline")


def parts_against_rivals(results: dict[Cell, dict[str, Any]], link: str, seeds: list[int]) -> str:
    """The target at a weak link: the parts (with their fine-tune, if its mean is
    lower) against the best-tuned rival there (the lowest mean test BPD),
    paired by seed. Both choices are made on the means, never seed by seed."""

    def mean(method: str) -> float:
        return _ranked(statistics.fmean(_bpd(results[Cell(method, link, s)]) for s in seeds))

    parts = min((m for m in ("parts", AFTER_ALL) if _raced(results, m, link, seeds)), key=mean)
    rival = min((m for m in RIVALS if _raced(results, m, link, seeds)), key=mean)
    d = decide([_bpd(results[Cell(parts, link, s)]) - _bpd(results[Cell(rival, link, s)]) for s in seeds])
    more = f"; about {d['seeds_to_decide']} seeds would decide it" if d["seeds_to_decide"] else ""
    return (
        f"{link}: {LABELS[parts]} − the best rival ({LABELS[rival]}), test BPD {d['mean']:+.3f} "
        f"[{d['lo']:+.3f}, {d['hi']:+.3f}] (target: lower, decided): {_met(d['verdict'].startswith('better'))} "
        f"({d['verdict']}{more})"
    )


def straggler_lines(results: dict[Cell, dict[str, Any]], seeds: list[int]) -> list[str]:
    """What each method keeps of its 10 Mbit images/s when its second worker,
    part or stage runs 2x slower: per block over its own one device, then
    straggler over plain. The parts' images/s is their slowest part's; the
    first part's own rate is shown beside it (it never waits for the second)."""

    def kept(method: str, rate: Any = None) -> list[float]:
        def speed(link: str, s: int) -> float:  # over the block's own one device: the host's drift cancels
            r = results[Cell(method, link, s)]
            return (rate(r) if rate else r["images_per_s"]) / results[Cell("one-device", link, s)]["images_per_s"]

        return [100 * speed("10Mbit+straggler", s) / speed("10Mbit", s) for s in seeds]

    parts = kept("parts")
    lines = [f"10 Mbit with a 2x straggler: parts keep {_percent(parts)} of their images/s (target >= 90%): "
             f"{_met(statistics.fmean(parts) >= 90)}"]  # fmt: skip
    if all("part_images_per_s" in results[Cell("parts", link, s)] for link in ("10Mbit", "10Mbit+straggler")
           for s in seeds):  # fmt: skip
        first = kept("parts", lambda r: r["part_images_per_s"][0])
        lines.append(f"10 Mbit with a 2x straggler: the parts' first part keeps {_percent(first)} of its own")
    others = ", ".join(
        f"{m} {_percent(kept(m))}"
        for m in RIVALS
        if all(_raced(results, m, link, seeds) for link in ("10Mbit", "10Mbit+straggler"))
    )
    if others:
        lines.append(f"10 Mbit with a 2x straggler, the rivals keep: {others}")
    return lines


def _percent(values: list[float]) -> str:
    mean, lo, hi = mean_interval(values)
    return f"{mean:.0f}%" if len(values) < 2 else f"{mean:.0f}% [{lo:.0f}, {hi:.0f}]"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


SPEEDS = {"inf": 1e10, "100Mbit": 1e8, "10Mbit": 1e7, "1Mbit": 1e6}  # bits/s, for the figure's x axis


def by_bandwidth(links: list[str]) -> list[str]:
    """The links without outages, slowest first (the order --links gave them in is the cells' order)."""
    return sorted((link for link in links if link in SPEEDS), key=SPEEDS.__getitem__)


def plot(results: dict[Cell, dict[str, Any]], links: list[str], seeds: list[int], path: Path) -> None:
    """Mean test BPD at the budget against bandwidth, with 95% intervals over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = by_bandwidth(links)  # each line drawn left to right
    straggler = "10Mbit+straggler" in links and "10Mbit" in links
    fig, axes = plt.subplots(1, 2 if straggler else 1, figsize=(11.5 if straggler else 6.4, 4.2), squeeze=False)
    ax = axes[0][0]
    for method in METHODS:
        if not plain or any(Cell(method, link, s) not in results for link in plain for s in seeds):
            continue
        stats = [mean_interval([_bpd(results[Cell(method, link, s)]) for s in seeds]) for link in plain]
        ys = [m for m, _, _ in stats]
        errors = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
        xs = [SPEEDS[link] for link in plain]
        line = ax.errorbar(xs, ys, yerr=errors if len(seeds) > 1 else None, marker="o", capsize=3,
                           label=LABELS[method])[0]  # fmt: skip
        if "10Mbit+outages" in links:
            y = statistics.fmean(_bpd(results[Cell(method, "10Mbit+outages", s)]) for s in seeds)
            ax.plot([1e7], [y], marker="x", markersize=9, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xticks([SPEEDS[link] for link in plain], [link.replace("inf", "∞") for link in plain])
    ax.set_xlabel("link bandwidth (20 ms latency; x: 10 Mbit with outages)")
    ax.set_ylabel(f"test BPD at the same wall-clock budget (mean of {len(seeds)} seeds)")
    if plain:
        ax.legend(fontsize=8)
    if straggler:
        _straggler_panel(axes[0][1], results, seeds)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _straggler_panel(ax: Any, results: dict[Cell, dict[str, Any]], seeds: list[int]) -> None:
    """Each method's mean test BPD at 10 Mbit, without and with a 2x straggler (95% intervals)."""
    links = ("10Mbit", "10Mbit+straggler")
    methods = [m for m in METHODS if all(Cell(m, k, s) in results for k in links for s in seeds)]
    for offset, (link, marker) in enumerate(zip(links, "os")):
        stats = [mean_interval([_bpd(results[Cell(m, link, s)]) for s in seeds]) for m in methods]
        xs = [i + 0.15 * (2 * offset - 1) for i in range(len(methods))]
        errors = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
        ax.errorbar(xs, [m for m, _, _ in stats], yerr=errors if len(seeds) > 1 else None, marker=marker,
                    linestyle="none", capsize=3, label="no straggler" if offset == 0 else "a 2x straggler")  # fmt: skip
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test BPD at the budget, 10 Mbit")
    ax.legend(fontsize=8)
