"""Paired comparisons over seeds, decided as a reviewer would decide them.

A comparison is the list of per-seed differences (arm − its pair, same seed).
It is reported as the mean with its two-sided 95% Student-t interval, and
decided by two tests at level 0.05: a two-sided t-test of "no difference"
(``better`` / ``worse``), and two one-sided tests (TOST) of "the difference
lies inside ±margin" (``within ±margin``). Neither: ``undecided``, with the
number of seeds that would decide it at 80% power if the spread and mean were
what these seeds show. Differences that are all exactly zero are ``identical``.

Every question a study asks is a family: ``adjust_family`` Holm-adjusts the
p-values of all its comparisons (each kind of test separately) and decides
again, so that a table can show the adjusted verdict beside the raw one.
scipy gives the t distribution, statsmodels the power analysis; Holm's
adjustment is computed here (``holm``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.power import TTestPower

EQUIVALENCE = 0.02  # BPD: a difference inside ±this is "the same"
ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t interval of the mean (nan bounds for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1)) * float(np.std(values, ddof=1))
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half


def difference_p(diffs: list[float]) -> float:
    """Two-sided p-value of a paired t-test of "no difference"."""
    if np.std(diffs) == 0:
        return 0.0 if np.mean(diffs) != 0 else 1.0
    return float(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)


def equivalence_p(diffs: list[float], margin: float = EQUIVALENCE) -> float:
    """p-value of TOST: the larger of the one-sided tests "mean > −margin" and "mean < +margin"."""
    if np.std(diffs) == 0:
        return 0.0 if abs(float(np.mean(diffs))) < margin else 1.0
    above = scipy_stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue
    below = scipy_stats.ttest_1samp(diffs, margin, alternative="less").pvalue
    return float(max(above, below))


def seeds_to_decide(mean: float, sd: float, margin: float = EQUIVALENCE) -> int | None:
    """Seeds at which a difference of ``mean`` with spread ``sd`` would be decided
    with 80% power: shown different from zero (two-sided t-test), or inside
    ±margin (the binding one-sided test of TOST), whichever needs fewer (at most
    ``MAX_SEEDS``). The smallest such n, by bisection on statsmodels' power."""
    if sd == 0:
        return None
    targets = [(abs(mean), "two-sided")] + ([(margin - abs(mean), "larger")] if abs(mean) < margin else [])
    needed = [_smallest_n(effect / sd, alternative) for effect, alternative in targets if effect > 0]
    return min(needed) if needed else MAX_SEEDS


def _smallest_n(effect: float, alternative: str) -> int:
    power = TTestPower()

    def enough(n: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reached = power.power(effect_size=effect, nobs=n, alpha=ALPHA, alternative=alternative)
        return not reached < POWER  # (statsmodels gives nan where the power is all but 1)

    if not enough(MAX_SEEDS):
        return MAX_SEEDS
    lo, hi = 1, MAX_SEEDS  # enough(hi); lo: not (a t-test needs 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return max(hi, 2)


# What a difference below 0 and one above it are called: for BPD, lower is better
BPD_WORDS = ("better", "worse")


def verdict(
    p_difference: float,
    p_equivalence: float,
    mean: float,
    margin: float = EQUIVALENCE,
    words: tuple[str, str] = BPD_WORDS,
) -> str:
    """What the two tests say at level 0.05, a decided difference in ``words``
    (below 0, above 0)."""
    within = p_equivalence < ALPHA
    if p_difference < ALPHA:
        return words[mean >= 0] + (f", by less than {margin:g}" if within else "")
    if within:
        return f"within ±{margin:g}"
    return "undecided"


def decide(diffs: list[float], margin: float = EQUIVALENCE, words: tuple[str, str] = BPD_WORDS) -> dict[str, Any]:
    """Mean, 95% interval, both tests' p-values and the verdict of paired
    differences (a decided one in ``words``: below 0, above 0)."""
    mean, lo, hi = mean_interval(diffs)
    out: dict[str, Any] = {"n": len(diffs), "mean": mean, "lo": lo, "hi": hi, "seeds_to_decide": None}
    out |= {"p_difference": math.nan, "p_equivalence": math.nan, "margin": margin}
    if len(diffs) >= 1 and all(d == 0 for d in diffs):
        out["verdict"] = "identical"
        return out
    if len(diffs) < 2:
        out["verdict"] = "one seed: no interval"
        return out
    out["p_difference"] = difference_p(diffs)
    out["p_equivalence"] = equivalence_p(diffs, margin)
    out["verdict"] = verdict(out["p_difference"], out["p_equivalence"], mean, margin, words)
    if out["verdict"] == "undecided":
        out["seeds_to_decide"] = seeds_to_decide(mean, float(np.std(diffs, ddof=1)), margin)
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, nan kept as nan: sorted ascending, the i-th (from
    0) of m times m - i, made non-decreasing, capped at 1. Computed here because
    statsmodels' ``multipletests``, which gives the same numbers, runs a full
    ``gc.collect()`` at every Holm call (slow in a process holding torch and Ray)."""
    known = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    order = sorted(known, key=lambda i: p_values[i])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def adjust_family(family: list[dict[str, Any]], words: tuple[str, str] = BPD_WORDS) -> None:
    """Holm within one question: each decided comparison of ``family`` (``decide``'s
    dicts) gains ``adjusted``, its verdict on the adjusted p-values (the tests of
    "no difference" adjusted together, and the equivalence tests together)."""
    tested = [d for d in family if not math.isnan(d["p_difference"])]
    for d in family:
        d["adjusted"] = d["verdict"]
    differences = holm([d["p_difference"] for d in tested])
    equivalences = holm([d["p_equivalence"] for d in tested])
    for d, p_difference, p_equivalence in zip(tested, differences, equivalences):
        d["p_difference_holm"], d["p_equivalence_holm"] = p_difference, p_equivalence
        d["adjusted"] = verdict(p_difference, p_equivalence, d["mean"], d["margin"], words)


def adjust_distinct(
    family: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable], words: tuple[str, str] = BPD_WORDS
) -> int:
    """Holm over the distinct hypotheses of ``family``: comparisons with the same
    ``key`` (the same two sets of runs, either way round) test one hypothesis,
    counted once, each read from its own side. Returns how many were counted."""
    first: dict[Hashable, dict[str, Any]] = {}
    for d in family:
        first.setdefault(key(d), d)
    adjust_family(list(first.values()), words)
    for d in family:
        twin = first[key(d)]
        if twin is d:
            continue
        d["adjusted"] = d["verdict"]
        if "p_difference_holm" in twin:
            d["p_difference_holm"], d["p_equivalence_holm"] = twin["p_difference_holm"], twin["p_equivalence_holm"]
            d["adjusted"] = verdict(d["p_difference_holm"], d["p_equivalence_holm"], d["mean"], d["margin"], words)
    return len(first)
