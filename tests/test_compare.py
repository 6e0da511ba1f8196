"""scripts/compare.py: the Table 1 rows and the same-wall-clock comparison."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(schedule, parts, bpd, wall, finetune=0):
    return {
        "schedule": schedule, "finetune_epochs": finetune, "epochs": 6 if finetune else 9,
        "parts": parts, "n_parts": parts.count("|") + 1, "test_bpd": bpd, "wall_time": wall,
    }  # fmt: skip


def test_table_names_lr_schedule_and_fine_tune_lr_and_escapes_the_spec():
    compare = _compare()
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


def test_bpd_at_a_wall_time_interpolates_between_evaluations():
    compare = _compare()
    run = {"curve": [{"elapsed": 10.0, "test_bpd": 4.0}, {"elapsed": 30.0, "test_bpd": 3.0}]}
    assert compare.bpd_at_time(run, 25.0) == pytest.approx(3.25)
    assert compare.bpd_at_time(run, 100.0) == pytest.approx(3.0)  # after the last evaluation: the last value
