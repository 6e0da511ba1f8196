"""scripts/study.py: paired statistics that decide, a study that resumes, a tiny study end to end."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from raylocal import errors
from raylocal.core.config import load_config_file
from raylocal.run.launch import load_data
from raylocal.study import catalog, compare, runner, spec, stats, tables
from raylocal.study import studies as study

ROOT = Path(__file__).resolve().parent.parent


def _summary(final: float, curve: list[tuple[float, float, float]], parts_bpd: float | None = None) -> dict:
    """A run's summary as the trainer writes it: (epoch, elapsed, test BPD) evaluations."""
    history = [{"phase": "parts", "test_bpd": parts_bpd}] if parts_bpd is not None else []
    return {
        "test_bpd": final, "wall_time": curve[-1][1], "rollbacks": [0], "history": history, "run_dir": "r",
        "curve": [{"epoch": e, "elapsed": t, "test_bpd": b} for e, t, b in curve],
    }  # fmt: skip


def _records(runs: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """What a study keeps of each run (its results.json), as analyse reads them."""
    return {
        arm: {seed: runner.record(summary, {}) for seed, summary in per_seed.items()} for arm, per_seed in runs.items()
    }


def test_paired_differences_decide_as_their_interval_says():
    worse = stats.decide([0.051, 0.049, 0.050, 0.052])
    assert worse["verdict"] == "worse" and worse["mean"] == pytest.approx(0.0505)
    # the interval by hand: t(0.975, 3 dof) = 3.182446
    half = 3.182446 * statistics.stdev([0.051, 0.049, 0.050, 0.052]) / 2
    assert (worse["lo"], worse["hi"]) == pytest.approx((0.0505 - half, 0.0505 + half), abs=1e-6)
    assert stats.decide([0.004, -0.003, 0.001])["verdict"] == "within ±0.02"
    assert stats.decide([-0.030, -0.031, -0.029])["verdict"] == "better"
    assert stats.decide([0.010, 0.012, 0.011])["verdict"] == "worse, by less than 0.02"
    noisy = stats.decide([0.05, -0.03, 0.04])
    assert noisy["verdict"] == "undecided" and noisy["seeds_to_decide"] > 3
    assert stats.decide([0.01])["verdict"] == "one seed: no interval" and math.isnan(stats.decide([0.01])["lo"])


def test_arms_are_paired_with_the_baseline_of_the_same_seed():
    s = spec.Study(
        name="t", question="q", base={}, baseline="e2e", seeds=[0, 1],
        arms={"e2e": {"epochs": 3}, "parts": {"epochs": 2, "finetune_epochs": 1}},
    )  # fmt: skip
    runs = {
        "e2e": {0: _summary(3.0, [(1, 10, 5.0), (2, 20, 4.0), (3, 30, 3.0)]),
                1: _summary(2.0, [(1, 10, 4.0), (2, 20, 3.0), (3, 30, 2.0)])},
        "parts": {0: _summary(3.1, [(2, 10, 4.5), (3, 15, 3.1)], parts_bpd=4.5),
                  1: _summary(2.2, [(2, 10, 3.4), (3, 15, 2.2)], parts_bpd=3.4)},
    }  # fmt: skip
    row = tables.analyse(s, _records(runs))[1]
    vs = row["vs_baseline"]
    assert vs["final_same_epochs"]["mean"] == pytest.approx((0.1 + 0.2) / 2)
    assert vs["after_parts_same_epochs"]["mean"] == pytest.approx((0.5 + 0.4) / 2)  # against e2e's epoch 2
    # at the same wall clock (15 s): e2e stood at 4.5 (seed 0) and 3.5 (seed 1)
    assert vs["final_same_wall_clock"]["mean"] == pytest.approx((3.1 - 4.5 + 2.2 - 3.5) / 2)
    # with its two parts in parallel: 2 parts-phase epochs x the slowest part's 6 s of 9, then 1 of fine-tune:
    # 2.333 epochs, where e2e stood at 4.0 - 1/3 = 3.667 (seed 0) and 2.667 (seed 1)
    for summary in runs["parts"].values():
        summary |= {"schedule": "simultaneous", "part_time": [6.0, 3.0], "epochs": 2, "finetune_epochs": 1}
    vs = tables.analyse(s, _records(runs))[1]["vs_baseline"]
    assert vs["final_same_parallel_time"]["mean"] == pytest.approx((3.1 - 11 / 3 + 2.2 - 8 / 3) / 2)
    assert vs["final_same_wall_clock"]["mean"] == pytest.approx((3.1 - 4.5 + 2.2 - 3.5) / 2)  # (unchanged)
    assert "final_same_parallel_time" not in tables.analyse(s, _records(runs))[0].get("vs_baseline", {})
    # parts against parts (the wire study's baseline is a simultaneous run too): no such comparison
    for summary in runs["e2e"].values():
        summary |= {"schedule": "simultaneous", "part_time": [1.0, 1.0], "epochs": 3, "finetune_epochs": 0}
    assert "final_same_parallel_time" not in tables.analyse(s, _records(runs))[1]["vs_baseline"]
    # an arm contrasted with another arm (Q3: the LR rule against one LR) is also paired with it
    s.arms["rule"], s.contrasts = {"epochs": 2, "finetune_epochs": 1}, {"rule": "parts"}
    runs["rule"] = {0: _summary(3.0, [(2, 10, 4.4), (3, 15, 3.0)], parts_bpd=4.4),
                    1: _summary(2.3, [(2, 10, 3.6), (3, 15, 2.3)], parts_bpd=3.6)}  # fmt: skip
    rule = tables.analyse(s, _records(runs))[2]["vs_contrast"]
    assert rule["arm"] == "parts" and rule["final"]["mean"] == pytest.approx((-0.1 + 0.1) / 2)
    assert rule["after_parts"]["mean"] == pytest.approx((-0.1 + 0.2) / 2)
    assert "| rule | parts |" in tables.table(s, tables.analyse(s, _records(runs)))
    # its last column shows part LRs only where some run gave its parts different ones (Q3, not Q2)
    for summary in runs["rule"].values():
        summary["part_lrs"] = [0.01, 0.01]
    contrast_header = tables.table(s, tables.analyse(s, _records(runs))).splitlines()[-3]
    assert contrast_header == "| arm | − arm | at the end | after the parts phase |"
    runs["rule"][1]["part_lrs"] = [0.01, 0.002]
    text = tables.table(s, tables.analyse(s, _records(runs))).splitlines()
    assert text[-3].endswith("| its part LRs (seed by seed) |") and text[-1].endswith("| 0.01,0.01; 0.01,0.002 |")
    assert text[-3].count("|") == text[-2].count("|") == text[-1].count("|")
    assert "| test BPD (mean) |" in text[2]
    s.base["eval_cap"] = 8.0  # every evaluation capped each image (--eval-cap): the header says so
    assert "| test BPD (mean; each image at most 8 bits/dim) |" in tables.table(s, tables.analyse(s, _records(runs)))


def test_staleness_arms_are_paired_with_their_parts_on_an_up_link_and_tabled_with_their_staleness():
    s = catalog.staleness_study(quick=False)
    outage_arms = [a for a, o in s.arms.items() if o.get("link", "up") != "up"]
    assert len(outage_arms) == 18 and s.contrasts == {a: f"{s.arms[a]['parts']}p-up" for a in outage_arms}
    # the outage at the end: down for the last 60% of the parts phase's steps, up before (the others end earlier)
    from raylocal.core.links import LinkSpec

    n_steps = 8 * (10000 // 64)  # 8 epochs of 64-image batches
    at_end = [LinkSpec.parse(s.arms["2p-down60-len749-at-end"]["link"]).up_at_step(i) for i in range(n_steps)]
    assert at_end == [True] * (n_steps - 749) + [False] * 749 and n_steps - 749 == round(0.4 * n_steps)
    assert LinkSpec.parse(s.arms["2p-down60-len749"]["link"]).up_at_step(n_steps - 1)
    # Q2 likewise: each fine-tune against none, the boundary scope against the whole model's
    assert catalog.finetune_study(quick=False).contrasts == {
        "2-parts-ft10": "2-parts-ft0", "2-parts-ft25": "2-parts-ft0", "2-parts-ft33": "2-parts-ft0",
        "2-parts-ft33-boundary": "2-parts-ft33", "4-parts-ft10": "4-parts-ft0", "4-parts-ft25": "4-parts-ft0",
        "4-parts-ft33": "4-parts-ft0", "4-parts-ft33-boundary": "4-parts-ft33",
    }  # fmt: skip
    s.seeds, s.arms = [0, 1], {a: s.arms[a] for a in ("e2e", "2p-up", "2p-down30-len53")}
    s.contrasts = {"2p-down30-len53": "2p-up"}
    curve = [(8, 10, 3.0), (10, 15, 2.0)]
    runs = {
        "e2e": {seed: _summary(2.0, curve) for seed in (0, 1)},
        "2p-up": {seed: _summary(2.1, curve, 3.1) | {"behind_steps": [{"mean": 1.0}]} for seed in (0, 1)},
        "2p-down30-len53": {
            0: _summary(2.3, curve, 3.4) | {"behind_steps": [{"mean": 20.0}]},
            1: _summary(2.2, curve, 3.2) | {"behind_steps": [{"mean": 30.0}]},
        },
    }
    rows = tables.analyse(s, _records(runs))
    assert rows[2]["vs_contrast"]["final"]["mean"] == pytest.approx((0.2 + 0.1) / 2)
    assert rows[2]["vs_contrast"]["after_parts"]["mean"] == pytest.approx((0.3 + 0.1) / 2)
    text = tables.table(s, rows)
    assert "| 2p-down30-len53 | 2p-up |" in text and text.count("| 20.0, 30.0 |") == 2  # both tables
    # the figure's points: each outage run against the up link of its seed, at its own staleness
    points = sorted(tables.staleness_points(rows))
    assert [p[:3] for p in points] == [(2, "after_parts", 20.0), (2, "after_parts", 30.0), (2, "final", 20.0),
                                       (2, "final", 30.0)]  # fmt: skip
    assert [p[3] for p in points] == pytest.approx([3.4 - 3.1, 3.2 - 3.1, 2.3 - 2.1, 2.2 - 2.1])
    # a seed whose e2e run has not finished: no pair with e2e, but a point of the figure all the same
    runs["2p-up"][2] = runs["2p-up"][0]
    runs["2p-down30-len53"][2] = _summary(2.5, curve, 3.6) | {"behind_steps": [{"mean": 40.0}, {"mean": 50.0}]}
    rows = tables.analyse(s, _records(runs))
    assert rows[2]["seeds"] == [0, 1] and rows[2]["vs_contrast"]["seeds"] == [0, 1, 2]
    points = sorted(tables.staleness_points(rows))
    assert [p[2] for p in points] == [20.0, 30.0, 45.0] * 2  # its staleness: the mean of its two boundaries
    # each table lists the staleness of the seeds it pairs
    lines = tables.table(s, rows).splitlines()
    assert [x for x in lines if x.startswith("| 2p-down30-len53 |")][0].endswith("| 20.0, 30.0 |")
    assert [x for x in lines if x.startswith("| 2p-down30-len53 | 2p-up |")][0].endswith("| 20.0, 30.0, 45.0 |")
    assert [p[3] for p in points] == pytest.approx([0.3, 0.1, 0.5, 0.2, 0.1, 0.4])
    assert text.splitlines()[2].count("|") == text.splitlines()[3].count("|")  # header and rule agree


def _tiny_base(mnist_dir) -> dict:
    """A study base that trains in seconds on the tiny dataset."""
    return {
        "data_root": str(mnist_dir), "n_levels": 2, "depth": 2, "hidden": 8, "batch_size": 16,
        "init_batch_size": 64, "eval_batch_size": 32, "warmup_steps": 2, "threads": 1, "samples": 0,
        "progress": False,
    }  # fmt: skip


def test_a_tiny_study_runs_end_to_end_and_a_rerun_trains_nothing(mnist_dir, tmp_path, monkeypatch, capsys):
    spec = {
        "name": "tiny", "question": "Do two parts match e2e?", "baseline": "e2e", "seeds": [0, 1],
        "base": _tiny_base(mnist_dir),
        "arms": {
            "e2e": {"schedule": "e2e", "epochs": 2},
            "2-parts": {"schedule": "simultaneous", "parts": 2, "part_spec": "1|2", "epochs": 1, "finetune_epochs": 1},
        },
    }  # fmt: skip
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec))
    trained = []
    real_run = compare.run
    monkeypatch.setattr(
        compare, "run", lambda config, data=None: trained.append(config.run.run_name) or real_run(config, data)
    )
    argv = ["--spec", str(path), "--out", str(tmp_path / "out"), "--storage-path", str(tmp_path / "runs")]
    assert study.main(argv) == 0
    assert sorted(trained) == ["2-parts-seed0", "2-parts-seed1", "e2e-seed0", "e2e-seed1"]
    results = json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())
    parts = results["rows"][1]
    assert parts["arm"] == "2-parts" and parts["seeds"] == [0, 1]
    assert parts["vs_baseline"]["final_same_epochs"]["n"] == 2
    assert (tmp_path / "out" / "tiny" / "figure.png").stat().st_size > 0
    assert "| 2-parts |" in (tmp_path / "out" / "tiny" / "table.md").read_text()
    assert results["runs"]["e2e"]["1"]["values"] == spec["base"] | spec["arms"]["e2e"] | {"seed": 1}
    trained.clear()
    assert study.main(argv) == 0  # resumed: every run was finished
    assert trained == []
    # --finished-only: the tables of what has finished, nothing trained
    fresh = ["--spec", str(path), "--out", str(tmp_path / "out2"), "--storage-path", str(tmp_path / "runs")]
    (tmp_path / "runs" / "tiny" / "2-parts-seed1" / "summary.json").unlink()
    assert study.main([*fresh, "--finished-only"]) == 0 and trained == []
    assert json.loads((tmp_path / "out2" / "tiny" / "results.json").read_text())["rows"][1]["seeds"] == [0]
    # its results.json holds every run: from it alone (the run directories gone) the same tables, nothing trained
    moved = ["--spec", str(path), "--out", str(tmp_path / "out"), "--storage-path", str(tmp_path / "elsewhere")]
    assert study.main(moved) == 0 and trained == []
    assert json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())["rows"] == results["rows"]
    # narrowed to one new run: that run is trained, and the outputs still hold every run and every arm
    assert study.main([*moved, "--arms", "e2e", "--seeds", "2"]) == 0 and trained == ["e2e-seed2"]
    again = json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())
    assert {arm: sorted(r) for arm, r in again["runs"].items()} == {"e2e": ["0", "1", "2"], "2-parts": ["0", "1"]}
    assert again["rows"][1] == results["rows"][1]
    # a changed study is not answered with the old runs, stored or published: one line, nothing trained
    spec["base"]["hidden"] = 16
    path.write_text(json.dumps(spec))
    trained.clear()
    assert study.main(argv) == 2 and study.main(moved) == 2
    assert trained == []
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: tiny/e2e-seed0 was published with other settings (hidden 8 -> 16); give another --out"
    )


def test_a_run_on_the_device_auto_chose_is_read_back_for_auto(tmp_path):
    from raylocal.core.config import RaylocalConfig
    from raylocal.errors import ConfigError

    # an async run stores the device its driver resolved "auto" to (staleness's runs: "cpu")
    (tmp_path / "config.json").write_text(json.dumps(RaylocalConfig(device="cpu").sectioned()))  # as runs write it
    compare._check_same_settings(tmp_path, RaylocalConfig(device="auto"))
    compare._check_same_settings(tmp_path, RaylocalConfig(device="cpu"))
    with pytest.raises(ConfigError, match="device 'cpu' -> 'cuda'"):
        compare._check_same_settings(tmp_path, RaylocalConfig(device="cuda"))
    with pytest.raises(ConfigError, match="hidden 64 -> 16"):  # "auto" excuses the device only
        compare._check_same_settings(tmp_path, RaylocalConfig(device="auto", hidden=16))


def test_arms_narrow_a_study_and_keep_its_baseline(capsys):
    assert study.main(["lr", "--arms", "rule-1e-2", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown["arms"]) == ["e2e", "rule-1e-2"] and shown["contrasts"] == {}  # its contrast arm left out
    assert study.main(["lr", "--arms", "rule-1e-2,one-lr-1e-2", "--show"]) == 0
    assert json.loads(capsys.readouterr().out)["contrasts"] == {"rule-1e-2": "one-lr-1e-2"}
    assert study.main(["parts", "--arms", "5-parts"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --arms: '5-parts' is not an arm of study 'parts' (e2e, 2-parts, 3-parts, 4-parts, 6-parts, 8-parts)"
    )


def test_base_lr_moves_the_arms_without_an_lr_of_their_own_to_a_study_of_its_own(capsys):
    assert study.main(["lr", "--base-lr", "3e-3", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "lr-lr0.003" and shown["base"]["lr"] == [3e-3]
    default = catalog.lr_study(False)
    assert shown["arms"] == default.arms and default.base["lr"] != [3e-3]  # every lr arm sets its own
    assert study.main(["parts", "--quick", "--base-lr", "1e-3", "--show"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "parts-quick-lr0.001"
    assert study.main(["parts", "--base-lr", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --base-lr: -1 is not a positive LR"


def test_a_bad_study_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "b", "question": "q", "base": {}, "arms": {"a": {}}, "baseline": "e2e"}))
    assert study.main(["--spec", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: study 'b': baseline 'e2e' is not one of its arms"


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("name", sorted(catalog.STUDIES))
def test_every_arm_of_the_built_in_studies_is_a_valid_run(name, quick):
    from raylocal.core.config import validate_config
    from raylocal.model.parts import parse_part_spec
    from raylocal.training.trainer import build_glow

    s = catalog.STUDIES[name](quick)
    s.check()
    for arm, overrides in s.arms.items():
        # the tuned LRs and the planned epochs come later
        values = s.base | {k: v for k, v in overrides.items() if k not in ("tune_lr", spec.EQUAL_TIME_OF)}
        config = validate_config(values, f"{name} {arm}")  # unknown keys and bad values raise
        assert {k: config.flat()[k] for k in values} == values, arm  # nothing was silently changed
        if config.parts.part_spec:  # a spec that does not fit the model would only fail when its run starts
            assert (
                len(parse_part_spec(config.parts.part_spec, build_glow(config, (1, 28, 28))).bounds)
                == config.parts.count
            )


@pytest.mark.parametrize("n_steps,down,length", [(1250, 0.3, 50), (1250, 0.6, 500), (92, 0.3, 50), (1000, 0.1, 50)])
def test_outage_links_are_down_for_the_share_asked(n_steps, down, length):
    from raylocal.core.links import parse_link

    spec, each = catalog.outage_link(n_steps, down, length)
    parse_link(spec)  # a valid link
    outages = [tuple(map(int, item.split(":"))) for item in spec.removeprefix("outage=").split(",")]
    steps = [s for start, n in outages for s in range(start, start + n)]
    assert len(steps) == len(set(steps)) and max(steps) < n_steps  # no overlap, inside the run
    assert abs(len(steps) - down * n_steps) <= len(outages)  # the share, to a step per outage
    assert all(n == each for _, n in outages)
    assert catalog.outage_link(100, 0.0, 50) == ("up", 0)


def test_a_tuned_arm_takes_the_lrs_of_its_own_tune_study_once(mnist_dir, tmp_path, monkeypatch):
    from raylocal.tune import cli as tune_lr

    tune = {"space": "tune_spaces/independent.py", "trials": 3, "seed": 100, "validation": 16, "report_every": 2}
    spec = {
        "name": "t", "question": "q", "baseline": "e2e", "seeds": [0],
        "base": _tiny_base(mnist_dir),
        "arms": {
            "e2e": {"schedule": "e2e", "epochs": 1},
            "tuned": {"schedule": "simultaneous", "parts": 2, "part_spec": "1|2", "epochs": 1, "tune_lr": tune},
        },
    }  # fmt: skip
    path = tmp_path / "t.json"
    path.write_text(json.dumps(spec))
    studies = []

    def fake_tune(argv, loaded):  # what scripts/tune_lr.py is asked, and the best.json it would leave
        args = dict(zip(argv[::2], argv[1::2]))
        trial = json.loads(open(args["--config"]).read())
        studies.append((trial, args))
        out = tmp_path / "runs" / "t" / args["--study"]
        out.mkdir(parents=True)
        (out / "best.json").write_text(json.dumps({**trial, "lr": [2e-3, 5e-4]}))
        return 0

    monkeypatch.setattr(tune_lr, "main", fake_tune)
    argv = ["--spec", str(path), "--out", str(tmp_path / "out"), "--storage-path", str(tmp_path / "runs")]
    assert study.main(argv) == 0
    [(trial, args)] = studies
    # the trials: the lockstep async twin of the arm, no fine-tune, their own seed, held-out images
    assert trial["schedule"] == "async" and trial["queue_size"] == 1 and trial["finetune_epochs"] == 0
    assert trial["seed"] == 100 and trial["validation"] == 16 and args["--trials"] == "3"
    ran = load_config_file(tmp_path / "runs" / "t" / "tuned-seed0" / "config.json")
    assert ran.schedule.lr == [2e-3, 5e-4] and ran.schedule.name == "simultaneous" and ran.data.validation is None
    assert study.main(argv) == 0 and len(studies) == 1  # read back, not tuned again


def test_contrasts_pool_each_seed_once_averaged_over_the_studies_that_ran_it(tmp_path, capsys):
    def results(name: str, seeds: list[int], final: list[float], parts: list[float], lr: float = 0.01) -> dict:
        contrast = {"arm": "up", "seeds": seeds, "per_seed": {"final": final, "after_parts": parts}}
        spec = {"name": name, "base": {"lr": [lr]}, "arms": {"up": {"link": "up"}, "down": {"link": "p=0.5"}}}
        return {"study": spec, "rows": [{"arm": "up"}, {"arm": "down", "vs_contrast": contrast}]}

    paths = []
    for name, seeds, final, parts in [
        ("a", [0, 1, 2], [0.05, 0.07, 0.03], [0.2, 0.1, 0.1]),
        ("b", [0, 1], [0.05, 0.03], [0.1, 0.0]),
    ]:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(results(name, seeds, final, parts)))
    assert study.main(["--pool", *map(str, paths)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Pooled over a, b")
    # three seeds, each once: seed 0 (0.05 + 0.05) / 2, seed 1 (0.07 + 0.03) / 2, seed 2 0.03
    diffs = [0.05, 0.05, 0.03]
    half = 4.302653 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, 2 dof)
    mean = sum(diffs) / 3
    assert out[-1].startswith(f"| down | up | 3 (5 pairs) | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ")
    assert "| +0.1000 [" in out[-1]  # after the parts phase: seeds 0.15, 0.05, 0.1
    # a study given twice, and an arm that ran with other settings, are refused
    assert study.main(["--pool", str(paths[0]), str(paths[0])]) == 2
    assert capsys.readouterr().err.strip() == "error: --pool: study 'a' is given twice"
    other = tmp_path / "c.json"
    other.write_text(json.dumps(results("c", [3], [0.01], [0.01], lr=0.001)))
    assert study.main(["--pool", str(paths[0]), str(other)]) == 2
    assert "--pool: down ran with other settings in a than in c (lr [0.01] -> [0.001])" in capsys.readouterr().err
    paths[0].write_text("[]")
    assert study.main(["--pool", *map(str, paths)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {paths[0]}: not a study's results.json")


def test_the_same_wall_clock_compares_runs_of_one_load_within_the_baselines_run():
    s = spec.Study(
        name="t", question="q", base={"threads": 1}, baseline="e2e", seeds=[0, 1],
        arms={"e2e": {"schedule": "e2e"}, "sim": {"schedule": "simultaneous", "parts": 2},
              "async": {"schedule": "async", "parts": 2}},
    )  # fmt: skip
    e2e = {seed: _summary(3.0, [(1, 10, 5.0), (2, 20, 4.0), (3, 30, 3.0)]) for seed in (0, 1)}
    sim = {0: _summary(3.1, [(3, 15, 3.1)]), 1: _summary(3.2, [(3, 45, 3.2)])}  # seed 1 outlasted e2e's 30 s
    records = {
        arm: {seed: runner.record(summary, s.base | s.arms[arm] | {"seed": seed}) for seed, summary in runs.items()}
        for arm, runs in (("e2e", e2e), ("sim", sim), ("async", sim))
    }
    rows = {r["arm"]: r for r in tables.analyse(s, records)}
    same_time = rows["sim"]["vs_baseline"]["final_same_wall_clock"]
    assert same_time["n"] == 1 and same_time["mean"] == pytest.approx(3.1 - 4.5)  # seed 0 only: never clamped
    # two processes against one: the wall clocks were not measured under one load
    assert "final_same_wall_clock" not in rows["async"]["vs_baseline"]


def test_an_arm_planned_for_another_arms_time_gets_the_epochs_e2e_trains_in_it():
    s = catalog.reference_study(quick=True)
    runs = {
        "e2e": {0: {"wall_time": 60.0, "values": {"epochs": 6}}},  # 10 s an epoch
        "2p-across": {0: {"wall_time": 43.0, "values": {}}},
    }
    assert runner.planned(s, "e2e-equal-time", 0, runs)["epochs"] == 4  # 43 s: 4 of e2e's epochs
    assert runner.planned(s, "e2e-equal-time", 1, runs) is None  # seed 1's runs are not there yet
    assert runner.planned(s, "e2e", 0, runs) == s.arms["e2e"]
    s.arms = {"late": {"schedule": "e2e", spec.EQUAL_TIME_OF: "e2e"}} | s.arms  # planned before its referent
    with pytest.raises(errors.ConfigError, match="late is planned for the time of 'e2e', which must be an arm"):
        s.check()


def test_each_seed_runs_its_arms_in_a_rotated_order_with_timed_arms_last():
    s = catalog.reference_study(quick=False)
    free = ["e2e", "2p-across", "2p-by-block", "3p-across"]
    orders = [runner.arm_order(s, seed) for seed in s.seeds]
    assert orders[0] == free + ["e2e-equal-time"]
    assert orders[1] == free[1:] + free[:1] + ["e2e-equal-time"]
    assert [o[0] for o in orders[:4]] == free  # each arm leads once in four seeds
    assert all(sorted(o) == sorted(s.arms) for o in orders)


def test_studies_without_run_records_are_rechecked_from_their_per_seed_values_and_holm_adjusted_together():
    from pathlib import Path

    from raylocal.study.recheck import recheck, recheck_tables

    root = Path(__file__).resolve().parent.parent / "docs" / "study"
    question = [runner._read_results(root / name / "results.json") for name in ("parts", "boundary")]
    checked = 0
    for results in question + [runner._read_results(root / "finetune" / "results.json")]:
        rows = {r["arm"]: r for r in results["rows"]}
        for d in recheck(results):  # the published raw intervals, recomputed from the per-seed values
            published = rows[d["arm"]]["vs_baseline"]["final_same_epochs"] if d["vs"] == results["study"]["baseline"] \
                else rows[d["arm"]]["vs_contrast"]["final"]  # fmt: skip
            assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((published["mean"], published["lo"], published["hi"]))
            checked += 1
    assert checked == 28
    alone, together = recheck_tables(question[:1]), recheck_tables(question)
    two_parts = "| 2-parts | e2e | 3 | +0.208 [+0.083, +0.333] | worse |"
    assert f"{two_parts} worse |" in alone and "over the question's 5 comparisons" in alone
    assert f"{two_parts} undecided |" in together
    # the boundary study's after-step-3 arm is the parts study's 2 parts, read back: one hypothesis, not two
    assert "over the question's 9 distinct comparisons (of 10: the same runs are compared once)" in together
    assert "| after-step-3 | e2e | 3 | +0.208 [+0.083, +0.333] | worse | undecided |" in together


def test_a_study_with_a_tight_margin_decides_equivalence_against_it_too():
    s = spec.Study(
        name="t", question="q", base={}, baseline="e2e", seeds=[0, 1, 2], tight_margin=0.01,
        arms={"e2e": {"epochs": 3}, "parts": {"epochs": 2, "finetune_epochs": 1}},
    )  # fmt: skip
    gaps = {0: 0.012, 1: 0.013, 2: 0.011}  # within ±0.02 for sure, not within ±0.01
    runs = {
        "e2e": {k: _summary(2.0, [(2, 20, 2.5), (3, 30, 2.0)]) for k in gaps},
        "parts": {k: _summary(2.0 + g, [(3, 20, 2.0 + g)], parts_bpd=2.5) for k, g in gaps.items()},
    }
    rows = tables.analyse(s, _records(runs))
    vs = rows[1]["vs_baseline"]
    assert vs["final_same_epochs"]["verdict"] == "worse, by less than 0.02"
    assert vs["final_same_epochs_tight"]["verdict"] == "worse" and vs["final_same_epochs_tight"]["margin"] == 0.01
    text = tables.table(s, rows)
    assert "− baseline, same epochs, against ±0.01 |" in text and text.count("worse, by less than 0.02") == 1
    assert catalog.reference_study(quick=False).tight_margin == 0.01


def test_a_study_run_killed_mid_way_resumes_from_its_checkpoint_to_the_uninterrupted_result(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    """A session's end kills the run in training: the next invocation goes on from
    its last checkpoint (after epoch 1 of 2), and ends where a run never killed ends."""
    from raylocal.training.schedules import SingleProcessRun

    spec = {
        "name": "killed", "question": "Does a killed run resume?", "baseline": "e2e", "seeds": [0],
        "base": _tiny_base(mnist_dir), "arms": {"e2e": {"schedule": "e2e", "epochs": 2}},
    }  # fmt: skip
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(spec))

    def argv(storage: str) -> list[str]:
        return [
            "--spec",
            str(path),
            "--out",
            str(tmp_path / storage / "out"),
            "--storage-path",
            str(tmp_path / storage),
        ]

    assert study.main(argv("whole")) == 0
    whole = json.loads((tmp_path / "whole" / "killed" / "e2e-seed0" / "summary.json").read_text())
    real_epoch = SingleProcessRun._epoch

    def killed_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(SingleProcessRun, "_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        study.main(argv("killed"))
    run_dir = tmp_path / "killed" / "killed" / "e2e-seed0"
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()
    epochs: list[int] = []
    monkeypatch.setattr(SingleProcessRun, "_epoch", lambda self, epoch: epochs.append(epoch) or real_epoch(self, epoch))
    capsys.readouterr()
    assert study.main(argv("killed")) == 0
    assert f"resuming {run_dir} from its checkpoint" in capsys.readouterr().out
    assert epochs == [1]  # only the epoch the kill cut short: not trained again from the start
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["test_bpd"] == whole["test_bpd"] and resumed["steps"] == whole["steps"]


def test_a_run_takes_its_images_from_those_read_already_else_from_its_files(mnist_dir, tmp_path):
    from raylocal.core.config import RaylocalConfig, data_source

    here = RaylocalConfig(data_root=str(mnist_dir), validation=16)
    read = data_source(here).load()
    assert load_data(here, {data_source(here): read}) is read  # read already: not from its files again
    gone = RaylocalConfig(data_root=str(tmp_path / "gone"))
    with pytest.raises(errors.DataError):  # another source: from its files, which are not there
        load_data(gone, {data_source(here): read})
    fresh = load_data(here)
    assert torch.equal(fresh.train, read.train) and len(fresh.train) == 64 - 16


def test_a_study_with_a_ray_arm_survives_its_job_directory_going_once_it_has_joined(
    mnist_dir, tmp_path, monkeypatch, ray_session
):
    """Under `ray job submit` on a multi-node cluster the job's working directory can
    go once the driver has joined Ray. A study given paths inside it (its images,
    a tune space, its outputs) still trains the arms after its first Ray arm and
    writes its tables where it was told, not into the last run's directory."""
    import shutil

    from conftest import lose_the_working_directory_on_joining

    import raylocal.cluster.preflight
    from raylocal.tune import cli as tune_lr

    lose_the_working_directory_on_joining(monkeypatch, tmp_path, raylocal.cluster.preflight)
    job_dir = tmp_path / "job"
    shutil.copytree(mnist_dir, job_dir / "data")
    shutil.copytree(ROOT / "tune_spaces", job_dir / "tune_spaces")
    tune = {"space": "tune_spaces/independent.py", "trials": 2, "seed": 100, "validation": 16, "report_every": 2}
    spec = {
        "name": "job", "question": "q", "baseline": "e2e", "seeds": [0], "base": _tiny_base("data"),
        "arms": {
            "e2e": {"schedule": "e2e", "epochs": 1},
            "async": {"schedule": "async", "parts": 2, "part_spec": "1|2", "epochs": 1, "cpus_per_part": 0.5},
            "tuned": {"schedule": "simultaneous", "parts": 2, "part_spec": "1|2", "epochs": 1, "tune_lr": tune},
        },
    }  # fmt: skip
    (job_dir / "job.json").write_text(json.dumps(spec))
    spaces = []

    def fake_tune(argv, loaded):  # after the async arm: the space and images as read before it; a best.json
        args = dict(zip(argv[::2], argv[1::2]))
        spaces.append(Path(args["--space"]).read_text())
        trial = json.loads(Path(args["--config"]).read_text())
        held_out = load_data(load_config_file(args["--config"]), loaded)  # what the real command would train on
        assert len(held_out.train) == 64 - 16 and held_out.train.dtype == torch.uint8
        best = Path(trial["storage_path"]) / args["--study"] / "best.json"
        best.parent.mkdir(parents=True)
        best.write_text(json.dumps({**trial, "lr": [2e-3, 5e-4]}))
        return 0

    monkeypatch.setattr(tune_lr, "main", fake_tune)
    assert study.main(["--spec", "job.json", "--out", "out", "--storage-path", "runs"]) == 0
    assert not (tmp_path / "job" / "data").exists()  # gone with the job's directory, at the async arm's join
    assert spaces == [(ROOT / "tune_spaces" / "independent.py").read_text()]
    results = json.loads((job_dir / "out" / "job" / "results.json").read_text())
    assert sorted(results["runs"]) == ["async", "e2e", "tuned"]
    assert load_config_file(job_dir / "runs" / "job" / "tuned-seed0" / "config.json").schedule.lr == [2e-3, 5e-4]
