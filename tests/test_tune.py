"""Ray Tune over per-part learning rates: a tiny study, and its best config round-trips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_options

from raylocal.cli import main as run_main
from raylocal.errors import ConfigError
from raylocal.tuning import load_space, trial_lrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_spaces_are_validated_against_the_part_count():
    grid = load_space(ROOT / "tune_spaces" / "grid.py", 2)
    assert trial_lrs(grid, {"lrs": [1e-3, 5e-4]}, 2) == [1e-3, 5e-4]
    with pytest.raises(ConfigError, match="tune space 'grid' defines \\[2, 3\\] parts, not 5"):
        load_space(ROOT / "tune_spaces" / "grid.py", 5)
    with pytest.raises(ConfigError, match="gave learning rates"):
        trial_lrs(grid, {"lrs": [1e-3]}, 2)
    shared = load_space(ROOT / "tune_spaces" / "shared_multiplier.py", 3)
    assert trial_lrs(shared, {"lr": 1e-3, "mult_2": 0.5, "mult_3": 0.25}, 3) == [1e-3, 5e-4, 2.5e-4]
    with pytest.raises(ConfigError, match="tune space does not exist"):
        load_space(ROOT / "tune_spaces" / "nope.py", 2)


SPACE = """
from ray import tune

GRID = True


def space(parts):
    return {"lrs": tune.grid_search([[2e-3, 5e-4], [1e-3, 1e-3], [50.0, 50.0]])}


def lrs(params, parts):
    return params["lrs"]
"""


def test_tiny_study_survives_divergence_ranks_and_best_config_round_trips(
    mnist_dir, tmp_path, monkeypatch, ray_session, capsys
):
    import tune_lr

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.py"
    space.write_text(SPACE)
    storage = tmp_path / "studies"
    opts = tiny_options(
        mnist_dir, storage, parts=2, part_spec="1|2", epochs=2, progress=False, max_rollbacks=1, warmup_steps=0
    )
    argv = ["--space", str(space), "--report-every", "4", "--study", "s", *opts]
    assert tune_lr.main(argv) == 0
    out = capsys.readouterr().out
    study = storage / "s"
    ranking = (study / "ranking.md").read_text().splitlines()
    assert len(ranking) == 2 + 3  # header + 3 grid points
    cells = [[c.strip() for c in line.split("|")] for line in ranking[2:]]
    bpds = [float(c[4]) for c in cells]
    assert bpds == sorted(bpds)
    assert cells[-1][2:4] == ["50", "50"] and cells[-1][5] == "yes"  # the diverged trial: reported, last
    assert [c[5] for c in cells[:2]] == ["no", "no"]
    best = json.loads((study / "best.json").read_text())
    assert best["schedule"] == "async" and best["lr"] in ([2e-3, 5e-4], [1e-3, 1e-3])
    assert "best: LRs" in out
    # Tune's own logs are there, one directory per trial
    assert len([p for p in study.iterdir() if p.is_dir() and p.name.startswith("run_trial")]) == 3
    # --resume restores the (finished) study instead of starting a new one
    assert tune_lr.main([*argv, "--resume"]) == 0
    assert (study / "ranking.md").read_text().splitlines() == ranking
    # the best config runs unchanged
    assert run_main(["--config", str(study / "best.json"), "--run-name", "best"]) == 0
    assert (storage / "best" / "summary.json").is_file()  # the study's storage path is kept
