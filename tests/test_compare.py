"""scripts/compare.py: the Table 1 rows and the same-wall-clock comparison."""

from __future__ import annotations

import math

import pytest

from raylocal.errors import ConfigError
from raylocal.study import compare


def _summary(schedule, parts, bpd, wall, finetune=0):
    return {
        "schedule": schedule, "finetune_epochs": finetune, "epochs": 6 if finetune else 9,
        "parts": parts, "n_parts": parts.count("|") + 1, "test_bpd": bpd, "wall_time": wall,
    }  # fmt: skip


def test_table_names_lr_schedule_and_fine_tune_lr_and_escapes_the_spec():
    summaries = [
        _summary("e2e", "1,2", 1.91554, 339.4),
        _summary("simultaneous", "1[:5]|1[5:],2", 1.9382, 422.0, 3),
        _summary("alternating", "1|2", 2.0, 250.0, 3),
    ]
    configs = [{"lr": [1e-3], "lr_schedule": "cosine"}, {"lr": [1e-3], "finetune_lr": 5e-4}, {"alternate_every": 50}]
    rows = compare.table(["1", "6", "41"], summaries, configs).splitlines()
    assert rows[2] == "| 1 | e2e | 1 | 1,2 | 0.001 (cosine) | 9 | 1.9155 | 339 |"
    assert rows[3] == (
        "| 6 | simultaneous + fine-tune | 2 | 1[:5]\\|1[5:],2 | 0.001, fine-tune 0.0005 | 6 + 3 | 1.9382 | 422 |"
    )
    assert rows[4] == "| 41 | alternating every 50 batches + fine-tune | 2 | 1\\|2 | 0.001 | 6 + 3 | 2.0000 | 250 |"


def test_fine_tune_line_sits_after_the_last_parts_epoch():

    def history(parts, finetune):
        return [{"phase": "parts", "epoch": e} for e in parts] + [{"phase": "finetune", "epoch": e} for e in finetune]

    alternating = {"schedule": "alternating", "finetune_epochs": 2, "history": history([1, 2, 3], [4, 5])}
    # the async trainer logs its parts phase as one entry, at its last epoch
    async_run = {"schedule": "async", "finetune_epochs": 10, "history": history([20], range(21, 31))}
    e2e = {"schedule": "e2e", "finetune_epochs": 0, "history": [{"phase": "e2e", "epoch": 1}]}
    assert compare.finetune_start(alternating) == 3
    assert compare.finetune_start(async_run) == 20
    assert compare.finetune_start(e2e) is None


def test_bpd_at_a_wall_time_interpolates_between_evaluations():
    run = {"curve": [{"elapsed": 10.0, "test_bpd": 4.0}, {"elapsed": 30.0, "test_bpd": 3.0}]}
    assert compare.bpd_at_time(run, 25.0) == pytest.approx(3.25)
    # outside its evaluations: no value (it never trained that long), never its last one
    assert compare.bpd_at_time(run, 100.0) is None and compare.bpd_at_time(run, 5.0) is None
    # an async run's live evaluation on a subset of the test set is not one of them
    run["curve"].insert(1, {"elapsed": 20.0, "test_bpd": 9.0, "live_images": 16})
    assert compare.bpd_at_time(run, 25.0) == pytest.approx(3.25)


def test_mean_interval_by_hand():
    mean, lo, hi = compare.mean_interval([1.0, 2.0, 3.0])  # std 1, se 1/sqrt(3), t(0.975, 2) = 4.3027
    half = 4.302653 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    mean, lo, hi = compare.mean_interval([1.5])
    assert mean == 1.5 and math.isnan(lo) and math.isnan(hi)


def test_seeds_are_parsed_and_named():
    assert compare.parse_seeds("0-3") == [0, 1, 2, 3]
    assert compare.parse_seeds("0, 2,5") == [0, 2, 5]
    for bad in ("a", "3-1", "0,0", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            compare.parse_seeds(bad)
    values = {"run_name": "r", "seed": 1}
    assert compare.seeded(values, 1) == values  # a config's own seed keeps its run
    assert compare.seeded(values, 2) == {"run_name": "r-seed2", "seed": 2}
    assert compare.seeded({"run_name": "r"}, 0)["run_name"] == "r"


def _seeded_run(schedule, bpd, wall):
    curve = [{"elapsed": 0.0, "test_bpd": bpd + 1.0}, {"elapsed": 100.0, "test_bpd": bpd}]
    return {"schedule": schedule, "finetune_epochs": 3, "test_bpd": bpd, "wall_time": wall, "curve": curve}


def test_seed_table_pairs_runs_by_seed_and_decides_with_the_interval():
    e2e = [_seeded_run("e2e", b, 100.0) for b in (2.0, 2.2, 1.9)]
    close = [_seeded_run("simultaneous", b + d, 100.0) for b, d in zip((2.0, 2.2, 1.9), (0.010, 0.012, 0.011))]
    noisy = [_seeded_run("async", b + d, 50.0) for b, d in zip((2.0, 2.2, 1.9), (0.1, -0.1, 0.05))]
    behind = [_seeded_run("alternating", b + d, 100.0) for b, d in zip((2.0, 2.2, 1.9), (0.05, 0.06, 0.055))]
    rows = compare.seeds_analysis(["1", "6", "9", "4"], [e2e, close, noisy, behind], [{}] * 4, [0, 1, 2]).splitlines()
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[4:]]
    assert cells[0][:4] == ["1", "e2e", "2.0000, 2.2000, 1.9000", "2.0333 ± 0.1528"]
    assert cells[1][1] == "simultaneous + fine-tune"
    assert cells[1][4] == "+0.0100, +0.0120, +0.0110"  # paired with the e2e run of the same seed
    assert cells[1][5].startswith("+0.0110 [") and cells[1][6] == "**met**"
    assert cells[2][6] == "undecided"
    assert cells[3][6] == "not met"
    # at half the wall time, e2e stood 0.5 BPD higher (linear curve): the async run is ahead
    assert cells[2][7] == "-0.4000, -0.6000, -0.4500" and cells[2][9] == "**met**"
    assert cells[1][9] == "not met"  # same wall time, a little behind on every seed
