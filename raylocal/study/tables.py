"""A study's comparisons: paired differences, time ratios, Holm within each question; its table and figure."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from raylocal.errors import ConfigError
from raylocal.study.compare import bpd_at_time, changed_settings
from raylocal.study.runner import bpd_at_epoch, bpd_at_epochs
from raylocal.study.spec import Study
from raylocal.study.stats import EQUIVALENCE, adjust_family, decide, mean_interval


def processes(run: dict[str, Any]) -> int:
    """How many processes computed a run at once: an async run's parts or a
    pipeline's stages, a data-parallel run's workers, else one."""
    values = run.get("values", {})
    if values.get("schedule") == "data-parallel":
        return int(values.get("workers", 2))
    if values.get("schedule") not in ("async", "pipeline"):
        return 1
    return values["part_spec"].count("|") + 1 if values.get("part_spec") else int(values.get("parts", 1))


def same_load(run: dict[str, Any], base: dict[str, Any]) -> bool:
    """Were the two runs' wall clocks measured under the same load on the host
    (processes and threads each)? Only then is "the same wall clock" a
    comparison; async parts on K processes against e2e on one is not."""
    threads = (run.get("values", {}).get("threads"), base.get("values", {}).get("threads"))
    return processes(run) == processes(base) and threads[0] == threads[1]


def time_ratios(per_seed: dict[int, dict], base: dict[int, dict], seeds: list[int]) -> dict[str, list[float]]:
    """Per seed, the arm's time over its baseline's: wall clock (only under the
    same load) and CPU seconds (where both runs recorded them)."""
    wall = [per_seed[s]["wall_time"] / base[s]["wall_time"] for s in seeds if same_load(per_seed[s], base[s])]
    cpu = [
        per_seed[s]["cpu_time"] / base[s]["cpu_time"]
        for s in seeds
        if per_seed[s].get("cpu_time") and base[s].get("cpu_time")
    ]
    return {"wall": wall, "cpu": cpu}


def _ratio_cell(ratios: dict[str, list[float]]) -> str:
    cells = []
    for key in ("wall", "cpu"):
        values = ratios.get(key) or []
        if values:
            mean, lo, hi = mean_interval(values)
            cells.append(f"{key} {mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if len(values) > 1 else ""))
    return "; ".join(cells)


def analyse(study: Study, runs: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """Per arm: its numbers per seed, and each comparison with its baseline. A
    comparison that needs the baseline's test curve (after the parts phase, at
    the same wall clock, in parallel) leaves out a seed whose baseline record has
    none (runs published before results.json kept curves)."""
    base = runs.get(study.baseline, {})
    rows = []
    for arm in [a for a in study.arms if a in runs]:  # the study's order, whichever seed finished first
        per_seed = runs[arm]
        seeds = sorted(set(per_seed) & set(base))
        if not seeds:  # --finished-only: no pair with the baseline yet
            continue
        config = study.arms[arm]
        row: dict[str, Any] = {"arm": arm, "config": config, "seeds": seeds}
        for key in ("after_parts", "wall_time", "parallel_epochs", "rollbacks", "part_lrs"):
            row[key] = [per_seed[s][key] for s in seeds]
        row["final"] = [per_seed[s]["test_bpd"] for s in seeds]
        row["staleness"] = [v for v in (per_seed[s]["staleness"] for s in seeds) if v is not None]
        row["time_ratio"] = time_ratios(per_seed, base, seeds)
        if arm != study.baseline:
            row["vs_baseline"] = versus_baseline(study, config, per_seed, base, seeds)
        contrast = versus_contrast(per_seed, runs, study.contrasts.get(arm))
        if contrast is not None:
            row["vs_contrast"] = contrast
        rows.append(row)
    adjust_family(family(rows))
    return rows


def versus_baseline(
    study: Study, config: dict[str, Any], per_seed: dict[int, dict], base: dict[int, dict], seeds: list[int]
) -> dict[str, dict[str, Any]]:
    """An arm against the study's baseline, paired by seed: at the same epochs (at
    the end, and after the parts phase), the same wall clock and the same parallel time."""
    parts_epochs = config.get("epochs", study.base.get("epochs", 1))
    curved = [s for s in seeds if base[s]["curve"]]
    compared = {
        "final_same_epochs": [per_seed[s]["test_bpd"] - base[s]["test_bpd"] for s in seeds],
        "after_parts_same_epochs": [
            per_seed[s]["after_parts"] - bpd_at_epoch(base[s], parts_epochs)
            for s in curved
            if config.get("schedule") != "e2e"  # (an e2e arm has no parts phase)
        ],
        "final_same_wall_clock": [
            per_seed[s]["test_bpd"] - at_time
            for s in curved
            if same_load(per_seed[s], base[s])
            and (at_time := bpd_at_time(base[s], per_seed[s]["wall_time"])) is not None
        ],
        "final_same_parallel_time": [
            per_seed[s]["test_bpd"] - bpd_at_epochs(base[s], per_seed[s]["parallel_epochs"])
            for s in curved
            # against a baseline that trains as one model (e2e), not against another set of parts
            if per_seed[s]["parallel_epochs"] is not None and base[s]["parallel_epochs"] is None
        ],
    }
    decided = {key: decide(diffs) for key, diffs in compared.items() if diffs}
    if study.tight_margin and compared["final_same_epochs"]:
        decided["final_same_epochs_tight"] = decide(compared["final_same_epochs"], study.tight_margin)
    return decided


def versus_contrast(per_seed: dict[int, dict], runs: dict[str, dict[int, dict]], other: str | None) -> dict | None:
    """An arm against its contrast arm, paired by seed (None without one, or without a common seed)."""
    if other is None or not set(per_seed) & set(runs.get(other, {})):
        return None
    pairs = sorted(set(per_seed) & set(runs[other]))
    diffs = {
        key: [per_seed[s][field] - runs[other][s][field] for s in pairs]
        for key, field in (("final", "test_bpd"), ("after_parts", "after_parts"))
    }
    # seed by seed as well: Q4's figure plots each run's difference at its own staleness
    return {
        "arm": other, "seeds": pairs, "per_seed": diffs, "staleness": [per_seed[s]["staleness"] for s in pairs]
    } | {key: decide(values) for key, values in diffs.items()}  # fmt: skip


def family(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every decided comparison of a study: its question's family, for Holm."""
    found = [d for r in rows for d in r.get("vs_baseline", {}).values()]
    found += [r["vs_contrast"][k] for r in rows if "vs_contrast" in r for k in ("final", "after_parts")]
    return found


def _mean_or_blank(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.2f}" if known else ""


def _cell(d: dict[str, Any]) -> str:
    text = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] {d['verdict']}"
    text += f" (~{d['seeds_to_decide']} seeds)" if d["seeds_to_decide"] else ""
    adjusted = d.get("adjusted", d["verdict"])
    return text + (f"; Holm: {adjusted}" if adjusted != d["verdict"] else "")


STALENESS = "staleness (mean upstream steps behind, per seed)"


def _per_seed(values: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def _capped(study: Study) -> str:
    cap = study.base.get("eval_cap")
    return f"; each image at most {cap:g} bits/dim" if cap else ""


def table(study: Study, rows: list[dict[str, Any]]) -> str:
    stale = study.x == "staleness"
    done = sorted({s for r in rows for s in r["seeds"]})
    seeds = ", ".join(map(str, done))
    extra = [s for s in done if s not in study.seeds]
    if extra:
        seeds += f" (**{', '.join(map(str, extra))} beyond the {len(study.seeds)} seeds the study declared**)"
    elif done != sorted(study.seeds):
        seeds += f" finished (of {', '.join(map(str, study.seeds))})"
    lines = [
        f"**{study.question}** Seeds {seeds}; every difference is paired by seed "
        f"with `{study.baseline}`: mean [95% interval] and the verdict at level 0.05 (better or worse: a paired "
        f"t-test; within ±{EQUIVALENCE} BPD: two one-sided tests; identical: every seed's difference is 0; else "
        "undecided, with about how many seeds would decide it at 80% power), then, where it differs, the verdict "
        "after Holm's adjustment over all of this table's comparisons.",
        "",
        f"| arm | seeds | test BPD (mean{_capped(study)}) | after the parts phase (mean) | wall time (s) | "
        "in parallel (epochs) | "
        "rollbacks | − baseline, same epochs | parts phase − baseline, same epochs | − baseline, same wall clock | "
        "− baseline, same time with the parts in parallel | time / baseline (mean [95%]) |"
        + (f" {STALENESS} |" if stale else "")
        + (f" − baseline, same epochs, against ±{study.tight_margin:g} |" if study.tight_margin else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if stale else "")
        + ("---|" if study.tight_margin else ""),
    ]
    for r in rows:
        cells = [
            r["arm"],
            ",".join(map(str, r["seeds"])),
            f"{sum(r['final']) / len(r['final']):.4f}",
            f"{sum(r['after_parts']) / len(r['after_parts']):.4f}",
            f"{sum(r['wall_time']) / len(r['wall_time']):.0f}",
            _mean_or_blank(r["parallel_epochs"]),
            "; ".join(",".join(map(str, rb)) for rb in r["rollbacks"]),
        ]
        vs = r.get("vs_baseline")
        keys = ("final_same_epochs", "after_parts_same_epochs", "final_same_wall_clock")
        keys += ("final_same_parallel_time",)
        cells += [_cell(vs[k]) if vs and k in vs else "" for k in keys]
        cells += [_ratio_cell(r.get("time_ratio", {})) if vs else ""]
        cells += [_per_seed(r["staleness"])] if stale else []
        if study.tight_margin:
            cells += [_cell(vs["final_same_epochs_tight"]) if vs and "final_same_epochs_tight" in vs else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _contrast_lines(rows, stale))


def _contrast_lines(rows: list[dict[str, Any]], stale: bool) -> list[str]:
    """The table of arms paired with another arm than the baseline (none: no lines)."""
    contrasted = [r for r in rows if "vs_contrast" in r]
    if not contrasted:
        return []
    # the last column says what tells the paired arms apart: their staleness, or
    # their part LRs where some run gave its parts different LRs (else it is blank)
    lrs_differ = any(len(set(v)) > 1 for r in contrasted for v in r["part_lrs"] if v)
    last = STALENESS if stale else "its part LRs (seed by seed)" if lrs_differ else ""
    lines = [
        "",
        "Paired by seed with another arm:",
        "",
        "| arm | − arm | at the end | after the parts phase |" + (f" {last} |" if last else ""),
        "|---|---|---|---|" + ("---|" if last else ""),
    ]
    for r in contrasted:
        c = r["vs_contrast"]
        cells = [r["arm"], c["arm"], _cell(c["final"]), _cell(c["after_parts"])]
        if stale:  # of the seeds paired here (the row's are those paired with the baseline)
            cells.append(_per_seed([v for v in c["staleness"] if v is not None]))
        elif lrs_differ:
            cells.append("; ".join(",".join(f"{x:.3g}" for x in v) for v in r["part_lrs"] if v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def figure(study: Study, rows: list[dict[str, Any]], path: Path) -> None:
    """Test BPD minus the baseline's, per arm, with 95% intervals: after the parts
    phase and at the end (same epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if study.x == "staleness":
        _staleness_figure(study, rows, ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    compared = [r for r in rows if "vs_baseline" in r]
    series = [(-0.15, "after_parts_same_epochs", "after the parts phase"), (0.15, "final_same_epochs", "at the end")]
    for offset, key, label in series:
        shown = [(i, r["vs_baseline"][key]) for i, r in enumerate(compared) if key in r["vs_baseline"]]
        xs = [i + offset for i, _ in shown]
        ds = [d for _, d in shown]
        means = [d["mean"] for d in ds]
        errs = [[d["mean"] - d["lo"] for d in ds], [d["hi"] - d["mean"] for d in ds]]
        errs = [[0 if math.isnan(e) else e for e in side] for side in errs]
        ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhspan(-EQUIVALENCE, EQUIVALENCE, color="grey", alpha=0.15, label=f"±{EQUIVALENCE} BPD")
    ax.set_xticks(range(len(compared)), [r["arm"] for r in compared], rotation=30, ha="right")
    ax.set_ylabel(f"test BPD − {study.baseline} (paired by seed)")
    ax.set_title(study.question)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def staleness_points(rows: list[dict[str, Any]]) -> list[tuple[int, str, float, float]]:
    """Q4's figure, point by point: (K, "after_parts" or "final", the run's
    measured staleness, its test BPD minus the same parts' on an up link, same
    seed) for every async run of an arm contrasted with its up link."""
    points = []
    for r in rows:
        contrast = r.get("vs_contrast")
        if contrast is None:
            continue
        for key in ("after_parts", "final"):
            for stale, diff in zip(contrast["staleness"], contrast["per_seed"][key]):
                if stale is not None:
                    points.append((r["config"]["parts"], key, stale, diff))
    return points


def _staleness_figure(study: Study, rows: list[dict[str, Any]], ax: Any) -> None:
    """Q4's figure: every outage run against its parts on an up link (what
    staleness alone costs; the intervals are in the tables), one colour per K."""
    points = staleness_points(rows)
    for i, k in enumerate(sorted({p[0] for p in points})):
        for key, label, marker, face in [
            ("after_parts", "after the parts phase", "o", "none"),
            ("final", "after the fine-tune", "s", f"C{i}"),
        ]:
            mine = [p for p in points if p[0] == k and p[1] == key]
            ax.scatter([p[2] for p in mine], [p[3] for p in mine], marker=marker, facecolors=face,
                       edgecolors=f"C{i}", label=f"{k} parts, {label}")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhspan(-EQUIVALENCE, EQUIVALENCE, color="grey", alpha=0.15, label=f"±{EQUIVALENCE} BPD")
    ax.set_xscale("symlog", linthresh=1.0)  # log beyond one step
    ax.set_xlim(0, 1.5 * max((p[2] for p in points), default=1.0))
    ax.set_xlabel("measured staleness: mean upstream steps behind")
    ax.set_ylabel("test BPD − the same parts on an up link (same seed)")
    ax.set_title(study.question)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _pooled_settings(result: dict[str, Any], arm: str) -> dict[str, Any]:
    study = result["study"]
    return json.loads(json.dumps(study.get("base", {}) | study.get("arms", {}).get(arm, {})))


def pooled_contrasts(results: list[dict[str, Any]]) -> str:
    """Each contrast (an arm against another arm) over several studies'
    results.json at once, for the same question asked on several machines. A
    seed run on more than one machine is one pair, not several: its differences
    are averaged over the machines first (each difference still a pair made on
    one machine, at one commit), then the per-seed means decide, Holm-adjusted
    over the contrasts of the table. Refused: a study given twice, and an arm
    that ran with other settings in one of them. A markdown table."""
    names = [r["study"]["name"] for r in results]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ConfigError(f"--pool: study {twice!r} is given twice")
    pooled: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = {}
    settings: dict[str, tuple[str, dict[str, Any]]] = {}
    for result in results:
        for r in result["rows"]:
            c = r.get("vs_contrast")
            if c is None:
                continue
            for arm in (r["arm"], c["arm"]):
                mine = _pooled_settings(result, arm)
                first = settings.setdefault(arm, (result["study"]["name"], mine))
                changed = changed_settings(first[1], mine)
                if changed:
                    raise ConfigError(f"--pool: {arm} ran with other settings in {first[0]} than in "
                                      f"{result['study']['name']} ({changed})")  # fmt: skip
            per_seed = pooled.setdefault((r["arm"], c["arm"]), {})
            for k, seed in enumerate(c["seeds"]):
                per_seed.setdefault(int(seed), []).append((c["per_seed"]["final"][k], c["per_seed"]["after_parts"][k]))
    rows = []
    for (arm, other), per_seed in pooled.items():
        seeds = sorted(per_seed)
        final = [float(np.mean([d[0] for d in per_seed[s]])) for s in seeds]
        after = [float(np.mean([d[1] for d in per_seed[s]])) for s in seeds]
        machines = sum(len(per_seed[s]) for s in seeds)
        rows.append((arm, other, f"{len(seeds)} ({machines} pairs)", decide(final), decide(after)))
    adjust_family([d for row in rows for d in row[3:]])
    lines = [
        f"Pooled over {', '.join(names)} (each seed's differences averaged over the machines that ran it):",
        "",
        "| arm | − arm | seeds (pairs) | at the end | after the parts phase |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join([arm, other, n, _cell(end), _cell(parts)]) + " |" for arm, other, n, end, parts in rows]
    return "\n".join(lines)


def write_outputs(
    study: Study, runs: dict[str, dict[int, dict]], rows: list[dict[str, Any]], out: Path, command: str
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = f"{table(study, rows)}\n\nCommand: `{command}`\n"
    (out / "table.md").write_text(md)
    kept = {arm: {str(seed): runs[arm][seed] for seed in sorted(runs[arm])} for arm in runs}
    results = {"study": asdict(study), "rows": rows, "runs": kept}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figure(study, rows, out / "figure.png")
    return md
