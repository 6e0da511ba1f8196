"""Studies published before their runs' records were kept (the parts, boundary,
finetune, lr and wire studies keep only their per-seed values): their
same-epoch comparisons recomputed from those values, Holm-adjusted within the
study, as the tables of later studies show them. Only the test BPD at the
end is rechecked: the comparisons after the parts phase (against e2e at that
epoch) and at the same wall clock need the runs' test curves, which those
studies did not keep (and the same-wall-clock ones proved biased)."""

from __future__ import annotations

from typing import Any

from raylocal.study.stats import adjust_distinct, decide


def _by_seed(row: dict[str, Any], key: str) -> dict[int, float]:
    return dict(zip(row["seeds"], row[key]))


def recheck(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every arm against the baseline, and every declared contrast: the test BPD
    at the end of the same epochs, paired by seed (``decide``'s dicts with
    ``arm``, ``vs`` and ``runs``, the two arms' per-seed values; not yet adjusted)."""
    study, rows = results["study"], {r["arm"]: r for r in results["rows"]}
    pairs = [(arm, study["baseline"]) for arm in rows if arm != study["baseline"]]
    pairs += [(arm, other) for arm, other in study.get("contrasts", {}).items() if arm in rows and other in rows]
    found = []
    for arm, other in pairs:
        mine, theirs = _by_seed(rows[arm], "final"), _by_seed(rows[other], "final")
        seeds = [s for s in sorted(mine) if s in theirs]
        if seeds:
            runs = tuple(sorted((tuple(mine[s] for s in seeds), tuple(theirs[s] for s in seeds))))
            found.append(decide([mine[s] - theirs[s] for s in seeds]) | {"arm": arm, "vs": other, "runs": runs})
    return found


def recheck_tables(question: list[dict[str, Any]]) -> str:
    """The studies that answer one question (its family, for Holm), each as a
    markdown table of ``recheck``'s comparisons with their adjusted verdicts."""
    found = [recheck(results) for results in question]
    comparisons = [d for study in found for d in study]
    # an arm two studies share (the same runs, read back) is compared once, not once per study
    n = adjust_distinct(comparisons, lambda d: d["runs"])
    counted = (
        f"{n} comparisons"
        if n == len(comparisons)
        else (f"{n} distinct comparisons (of {len(comparisons)}: the same runs are compared once)")
    )
    tables = []
    for results, comparisons in zip(question, found):
        study = results["study"]
        lines = [
            f"**{study['name']}**: {study['question']} Test BPD at the end, paired by seed at the same epochs: the "
            f"verdict at level 0.05, then after Holm's adjustment over the question's {counted}.",
            "",
            "| arm | − arm | seeds | mean [95% interval] | verdict | after Holm |",
            "|---|---|---|---|---|---|",
        ]
        for d in comparisons:
            interval = f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["n"] > 1 else f"{d['mean']:+.3f}"
            lines.append(f"| {d['arm']} | {d['vs']} | {d['n']} | {interval} | {d['verdict']} | {d['adjusted']} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
