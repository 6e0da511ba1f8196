"""The statistics every study decides with, against hand computations."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from raylocal.study.stats import adjust_family, decide, equivalence_p, holm, mean_interval, seeds_to_decide


def _t3_upper_tail(t: float) -> float:
    """P(T > t) for Student's t with 3 degrees of freedom, in closed form."""
    x = t / math.sqrt(3)
    return 0.5 - (x / (1 + x * x) + math.atan(x)) / math.pi


def _four(mean: float, sd: float) -> list[float]:
    """Four values with exactly this mean and sample standard deviation."""
    unit = [-1.5, -0.5, 0.5, 1.5]
    scale = sd / statistics.stdev(unit)
    return [mean + scale * u for u in unit]


def test_tost_by_hand():
    diffs = _four(0.005, 0.01)  # se 0.005: t against -0.02 is 5, against +0.02 is -3
    assert equivalence_p(diffs, 0.02) == pytest.approx(max(_t3_upper_tail(5.0), _t3_upper_tail(3.0)), rel=1e-6)
    assert _t3_upper_tail(3.0) == pytest.approx(0.028834, abs=1e-6)  # the closed form itself, from a t table
    d = decide(diffs)
    assert d["verdict"] == "within ±0.02" and d["p_equivalence"] < 0.05
    # the same spread around 0.012: t against +0.02 is -1.6, no longer inside at 0.05
    assert decide(_four(0.012, 0.01))["verdict"] == "undecided"


def test_the_interval_and_the_difference_test_by_hand():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])  # sd 1, se 1/sqrt(3), t(0.975, 2) = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    worse = decide(_four(0.05, 0.01))  # t = 10: p = 2 P(T3 > 10)
    assert worse["p_difference"] == pytest.approx(2 * _t3_upper_tail(10.0), rel=1e-6)
    assert worse["verdict"] == "worse"
    assert decide(_four(-0.012, 0.002))["verdict"] == "better, by less than 0.02"


def test_a_quantity_other_than_bpd_is_decided_in_its_own_words():
    words = ("real faster", "real slower")  # a time ratio - 1: below 0, the real step is faster
    assert decide(_four(-0.05, 0.01), 0.10, words)["verdict"] == "real faster, by less than 0.1"
    slower = decide(_four(0.05, 0.02), 0.5, words)
    assert slower["verdict"] == "real slower, by less than 0.5"
    family = [decide(_four(0.2, 0.01), 0.1, words), decide(_four(0.2, 0.01), 0.1, words)]
    adjust_family(family, words)
    assert [d["adjusted"] for d in family] == ["real slower", "real slower"]


def test_zero_spread_says_identical_and_one_seed_has_no_interval():
    assert decide([0.0, 0.0, 0.0])["verdict"] == "identical"
    one = decide([0.01])
    assert one["verdict"] == "one seed: no interval" and math.isnan(one["lo"])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> kept monotone: 0.03, 0.06, 0.06
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert math.isnan(holm([math.nan, 0.02])[0]) and holm([math.nan, 0.02])[1] == pytest.approx(0.02)


def test_holm_agrees_with_statsmodels_on_random_families_with_ties_and_nan(monkeypatch):
    import gc

    from statsmodels.stats.multitest import multipletests

    # multipletests runs gc.collect() at every call: 0.36 s each in the suite's process (torch and
    # Ray loaded), 36 s for these 100 families. The p-values do not depend on it.
    monkeypatch.setattr(gc, "collect", lambda *_: 0)
    rng = random.Random(0)
    for m in (1, 2, 3, 5, 12):
        for _ in range(20):
            p = [rng.choice([rng.random(), rng.random() ** 4, 0.01, 0.3]) for _ in range(m)]  # ties among them
            assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), rel=1e-12)
            with_nan = p[:1] + [math.nan] + p[1:]
            assert math.isnan(holm(with_nan)[1]) and holm(with_nan)[:1] + holm(with_nan)[2:] == holm(p)


def test_a_family_can_undo_a_verdict_that_stands_alone():
    alone = decide(_four(0.05, 0.02))  # t = 5, p = 2 P(T3 > 5) = 0.0154: worse on its own
    assert alone["verdict"] == "worse"
    family = [alone] + [decide(_four(0.0, 0.05)) for _ in range(4)]  # four comparisons that decide nothing
    adjust_family(family)
    assert alone["p_difference_holm"] == pytest.approx(5 * alone["p_difference"])
    assert alone["adjusted"] == "undecided" and alone["verdict"] == "worse"


def test_seeds_to_decide_is_for_80_percent_power():
    # a mean of one standard deviation: the normal approximation says ((1.96 + 0.84) / 1)^2 = 7.8,
    # the t-test needs a little more
    n = seeds_to_decide(0.05, 0.05, margin=0.02)
    assert 8 <= n <= 11
    assert seeds_to_decide(0.0, 0.0) is None
