"""Ray Tune over per-part learning rates: a tiny study, and its best config round-trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import lose_the_working_directory_on_joining, tiny_options

from raylocal.cli.train import main as run_main
from raylocal.cluster.placement import TrialGroup
from raylocal.core.config import RaylocalConfig, load_config_file
from raylocal.errors import ConfigError
from raylocal.tune.tuning import REPORTS, SynchronousPBT, load_space, ranked_table, trial_lrs

ROOT = Path(__file__).resolve().parent.parent


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


def test_a_space_read_once_is_built_and_checked_without_its_file(tmp_path):
    """What the driver and the trials build after joining Ray: the text read before
    (under `ray job submit` the job's working directory can be gone by then)."""
    import pickle

    from raylocal.tune.tuning import check_study, read_space, space_module

    path = tmp_path / "grid.py"
    path.write_text((ROOT / "tune_spaces" / "grid.py").read_text())
    source = read_space(path)
    path.unlink()
    source = pickle.loads(pickle.dumps(source))  # as a trial is sent it
    assert trial_lrs(space_module(source, 2), {"lrs": [1e-3, 5e-4]}, 2) == [1e-3, 5e-4]
    with pytest.raises(ConfigError, match="PBT perturbs LRs drawn from distributions; a grid space cannot be used"):
        check_study(source, 2, "pbt")
    with pytest.raises(ConfigError, match="grid.py: a tune space defines space\\(parts\\) and lrs"):
        space_module(type(source)(source.path, "def space(parts):\n    return {}\n"), 2)


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
    from raylocal.tune import cli as tune_lr

    lose_the_working_directory_on_joining(monkeypatch, tmp_path, tune_lr)
    space = tmp_path / "space.py"
    space.write_text(SPACE)
    storage = tmp_path / "studies"
    # a quarter CPU a part: two trials at a time on the session's 2 CPUs; --device auto, where a GPU share
    # can be asked for (the session has no GPU: the parts train on CPUs)
    opts = tiny_options(
        mnist_dir, storage, parts=2, part_spec="1|2", epochs=2, progress=False, max_rollbacks=1, warmup_steps=0,
        cpus_per_part=0.25, device="auto",
    )  # fmt: skip
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
    best = json.loads((study / "best.json").read_text())  # by section
    assert best["schedule"]["schedule"] == "async" and best["schedule"]["lr"] in ([2e-3, 5e-4], [1e-3, 1e-3])
    assert "best: LRs" in out
    # Tune's own logs are there, one directory per trial, and beside them each trial's run (on the
    # storage every node reaches, not in Tune's staging directory of the trial's node): those that finished
    # (ASHA may stop one of the two that do not diverge)
    trial_dirs = [p for p in study.iterdir() if p.is_dir() and p.name.startswith("run_trial")]
    assert len(trial_dirs) == 3
    runs = [json.loads((p / "summary.json").read_text()) for p in trial_dirs if (p / "summary.json").is_file()]
    assert runs and all(r["part_lrs"] in ([2e-3, 5e-4], [1e-3, 1e-3]) for r in runs)
    assert {Path(r["run_dir"]) for r in runs} <= set(trial_dirs)  # ran there (Tune syncs its staging here too)
    # the diverged trial reported its divergence once (Tune's result rows, one a report)
    reports = [[json.loads(line) for line in (p / "result.json").read_text().splitlines()] for p in trial_dirs]
    assert sorted(sum(r["diverged"] for r in rows) for rows in reports) == [0, 0, 1]
    # --resume restores the (finished) study instead of starting a new one
    assert tune_lr.main([*argv, "--resume"]) == 0
    assert (study / "ranking.md").read_text().splitlines() == ranking
    # ... only with the settings it was started with, refused in one line before Tune starts
    capsys.readouterr()
    assert tune_lr.main([*argv, "--resume", "--report-every", "8", "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(--report-every 4 then, 8 now; --epochs 2 then, 3 now)" in err[0], err
    # ... and with the shares its parts had (a default GPU share comes from the cluster of the day)
    kept = json.loads((study / "raylocal-study.json").read_text())
    assert kept["shares"] == {"cpus_per_part": 0.25, "gpus_per_part": 0.0}
    kept["shares"]["gpus_per_part"] = 0.45  # as if started on a cluster with GPUs
    (study / "raylocal-study.json").write_text(json.dumps(kept))
    assert tune_lr.main([*argv, "--resume"]) == 2
    assert "error: --resume: the study's parts had {'cpus_per_part': 0.25, 'gpus_per_part': 0.45}, this cluster " \
        "gives them {'cpus_per_part': 0.25, 'gpus_per_part': 0.0}" in capsys.readouterr().err  # fmt: skip
    # the shares given as flags are compared as resolved shares, so the advice can be followed (here the
    # trial's GPU bundle then fits no node of this CPU-only session: refused by placement, not by --resume)
    assert tune_lr.main([*argv, "--resume", "--gpus-per-part", "0.45"]) == 2
    err = capsys.readouterr().err
    assert "fits no node" in err and "--resume" not in err, err
    (study / "raylocal-study.json").unlink()
    assert tune_lr.main([*argv, "--resume"]) == 2
    assert "started by an older version" in capsys.readouterr().err
    (study / "raylocal-study.json").write_text(json.dumps({"flags": {}}))  # this file before it kept shares
    assert tune_lr.main([*argv, "--resume"]) == 2
    assert "cannot be read as this version's study settings" in capsys.readouterr().err
    # the best config is the study's run with the best trial's LRs, and it runs (here as its
    # single-process twin: the async run itself is test_ray.py's)
    trial = load_config_file(study / "best.json")
    assert (
        trial.schedule.epochs == 2
        and trial.parts.part_spec == "1|2"
        and trial.schedule.max_rollbacks == 1
        and trial.schedule.name == "async"
    )
    assert run_main(["--config", str(study / "best.json"), "--run-name", "best", "--schedule", "simultaneous"]) == 0
    summary = json.loads((storage / "best" / "summary.json").read_text())  # the study's storage path is kept
    assert summary["schedule"] == "simultaneous" and summary["part_lrs"] == best["schedule"]["lr"]


def test_restore_parts_hands_over_weights_and_optimizer_with_new_lrs(mnist_dir, tmp_path):
    """PBT's exploit step: a trial continues from another trial's part checkpoints,
    with its own (perturbed) LRs and everything else exactly as checkpointed."""
    from raylocal.cluster.parts_phase import part_checkpoint_path
    from raylocal.core.checkpoint import load_checkpoint, save_checkpoint
    from raylocal.core.config import RaylocalConfig
    from raylocal.core.data import load_dataset
    from raylocal.model.glow import Glow
    from raylocal.model.parts import parse_part_spec
    from raylocal.pipeline.worker import PartWorker
    from raylocal.training.service import assembled
    from raylocal.tune.tuning import ORIGIN, restore_parts

    def config(seed: int) -> RaylocalConfig:
        return RaylocalConfig(
            data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
            warmup_steps=2, threads=1, parts=2, part_spec="1|2", lr=[1e-3], samples=0, progress=False, seed=seed,
        )  # fmt: skip

    train = load_dataset("mnist", mnist_dir).train
    bounds = list(parse_part_spec("1|2", Glow((1, 8, 8), **config(0).glow_kwargs())).bounds)
    donors = [PartWorker(config(0), bounds, k, (1, 8, 8), train) for k in range(2)]
    for _ in range(5):  # a few real steps, so that weights and Adam moments are not at their initial values
        y = donors[0].trainer.step(donors[0].data_batch()).output.detach()
        donors[1].trainer.step(y)
    for k, w in enumerate(donors):
        w.step = w.stats.steps = 5 + k
    ckpt, run_dir = tmp_path / "tune-checkpoint", tmp_path / "trial"
    for k, w in enumerate(donors):
        save_checkpoint(part_checkpoint_path(ckpt, k), w.checkpoint_state(), kind="part")

    # the model PBT ranks is assembled from each part's own layers in its own checkpoint
    whole = assembled([w.checkpoint_state() for w in donors], Glow((1, 8, 8), **config(0).glow_kwargs()), bounds)
    expected = {**donors[0].weights(), **donors[1].weights()}
    assert whole.keys() == expected.keys() == donors[0].glow.state_dict().keys()
    assert all(torch.equal(whole[n], expected[n]) for n in expected)
    assert not all(torch.equal(whole[n], donors[1].glow.state_dict()[n]) for n in expected)  # not part 2's copy

    # the last part's step, and whose parts: an older checkpoint's, the trial directory it lies in
    assert restore_parts(ckpt, run_dir, [0.5, 0.25]) == (6, tmp_path.name)
    (ckpt / ORIGIN).write_text(json.dumps({"trial": "run_trial_donor", "step": 6}))
    assert restore_parts(ckpt, run_dir, [0.5, 0.25]) == (6, "run_trial_donor")  # wherever PBT copied it to
    for k, (donor, lr) in enumerate(zip(donors, [0.5, 0.25])):
        receiver = PartWorker(config(7), bounds, k, (1, 8, 8), train)  # another seed: other initial weights
        before = {n: v.clone() for n, v in receiver.part.state_dict().items()}
        receiver.restore_state(load_checkpoint(part_checkpoint_path(run_dir, k)))
        after, expected = receiver.part.state_dict(), donor.part.state_dict()
        assert not all(torch.equal(before[n], expected[n]) for n in expected)
        assert all(torch.equal(after[n], expected[n]) for n in expected)
        moments = [s["exp_avg_sq"] for s in receiver.trainer.optimizer.state.values()]
        assert moments and all(
            torch.equal(a, b["exp_avg_sq"]) for a, b in zip(moments, donor.trainer.optimizer.state.values())
        )
        assert receiver.step == 5 + k and receiver.trainer.base_lr == lr
        x = receiver.data_batch() if k == 0 else y
        receiver.trainer.step(x)
        assert receiver.trainer.optimizer.param_groups[0]["lr"] == lr  # past warmup: exactly the new LR


PBT_SPACE = """
from ray import tune


def space(parts):
    return {f"lr_{k + 1}": tune.loguniform(3e-4, 1e-2) for k in range(parts)}


def lrs(params, parts):
    return [params[f"lr_{k + 1}"] for k in range(parts)]
"""


def test_pbt_study_continues_weak_trials_from_strong_ones(mnist_dir, tmp_path, monkeypatch, ray_session):
    from raylocal.tune import cli as tune_lr

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.py"
    space.write_text(PBT_SPACE)
    storage = tmp_path / "studies"
    # part 2 sleeps 0.2 s a step, so that the 1 s polls report before the run is over; each trial and
    # each part loads its images itself (--images-from node), from the same files
    opts = tiny_options(
        mnist_dir, storage, parts=2, part_spec="1|2", epochs=4, progress=False, cpus_per_part=0.25, inject="slow:2@0.2",
        images_from="node",
    )  # fmt: skip
    argv = ["--space", str(space), "--trials", "2", "--report-every", "4", "--scheduler", "pbt", "--pbt-interval", "2"]
    assert tune_lr.main([*argv, "--study", "p", *opts]) == 0
    study = storage / "p"
    ranking = (study / "ranking.md").read_text().splitlines()
    assert len(ranking) == 2 + 2 and all(line.endswith("| no |") for line in ranking[2:])  # none stopped early
    results = {  # trial directory name -> its reported rows, as the trial recorded them
        trial.name: [json.loads(line) for line in (trial / REPORTS).read_text().splitlines()]
        for trial in study.iterdir()
        if trial.is_dir() and trial.name.startswith("run_trial")
    }
    # every trial trained to the end: 4 epochs of 4 steps, also across restores (lost latents made up)
    assert len(results) == 2 and all(rows[-1]["finished"] and rows[-1]["steps"] == 16 for rows in results.values())
    # Synchronous PBT: at a perturbation step the weaker trial continues from the stronger one's parts with
    # perturbed copies of its LRs. Tune logs each as [target, clone, iterations, clone's config, new config];
    # a trial's own rows say which checkpoint it continued from.
    policy = [json.loads(line) for line in (study / "pbt_global.txt").read_text().splitlines()]
    assert policy
    new_lrs = {(new["lr_1"], new["lr_2"]) for *_, new in policy}
    for *_, old, new in policy:
        for k in (1, 2):  # perturbed by x0.8 / x1.2, or resampled from the space
            ratio = new[f"lr_{k}"] / old[f"lr_{k}"]
            assert math.isclose(ratio, 0.8) or math.isclose(ratio, 1.2) or 3e-4 <= new[f"lr_{k}"] <= 1e-2
    exploits = [
        row for name, rows in results.items() for row in rows if row["restored_from"] and row["restored_from"] != name
    ]
    assert exploits, "PBT never continued a trial from another trial's checkpoint"
    for row in exploits:
        assert (row["lr_1"], row["lr_2"]) in new_lrs and 0 < row["resumed_at"] <= row["steps"]
    assert (study / "best.json").is_file()
    # a grid cannot be perturbed: refused before Ray is touched, one line, exit 2
    grid = ROOT / "tune_spaces" / "grid.py"
    assert tune_lr.main(["--space", str(grid), "--scheduler", "pbt", *opts]) == 2
    assert tune_lr.main(["--space", str(space), "--scheduler", "hyperband", *opts]) == 2


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, [{"CPU": 0.5}] + [{"CPU": 0.5}] * 3),  # CPUs only: the trial evaluates on a part's CPUs
        ({"gpus_per_part": 0.3, "cpus_per_part": 1.0}, [{"CPU": 1.0, "GPU": 0.1}] + [{"CPU": 1.0, "GPU": 0.3}] * 3),
    ],
)
def test_a_trial_reserves_what_its_own_evaluations_need(options, expected):
    assert TrialGroup.plan(RaylocalConfig(parts=3, **options)).bundles == expected
    assert TrialGroup.plan(RaylocalConfig(parts=3, **options), cpus_per_trial=2.0).bundles[0]["CPU"] == 2.0


def test_inside_a_trial_the_runs_parts_ask_for_the_bundles_its_group_reserved():
    """The study fixes the parts' shares in every trial's config (``trial_shares``);
    the trial's own run then plans the very bundles its group holds for them."""
    from raylocal.cluster.placement import PartBundles, trial_shares

    gpu_node = {"CPU": 8.0, "GPU": 1.0, "box": 1.0}
    for options in ({}, {"worker_resource": "box"}, {"gpus_per_part": 0.3, "cpus_per_part": 1.0}):
        base = RaylocalConfig(parts=3, **options)
        trial = base.replace(**trial_shares(base, [gpu_node], concurrent=2))
        group = TrialGroup.plan(trial).bundles
        assert group[1:] == [PartBundles.plan(trial, 3, [gpu_node]).part] * 3


def test_a_trial_started_again_in_its_directory_trains_its_parts_anew(tmp_path):
    from raylocal.tune.tuning import FINISHED_FILES, clear_finish

    for name in FINISHED_FILES:  # what an earlier attempt finished: its run would skip its parts
        (tmp_path / name).write_text("old")
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part1.pt").write_text("restored by PBT")
    clear_finish(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["part1.pt", "parts"]
    assert {"parts_result.pt", "checkpoint.pt"} <= set(FINISHED_FILES)


def test_a_study_refuses_in_one_line_what_its_trials_could_not_run(mnist_dir, tmp_path, capsys):
    """Before Ray starts: a schedule other than async (a trial is an async parts run,
    reporting as its parts train) and a space whose space() raises."""
    from raylocal.tune import cli as tune_lr
    from raylocal.tune.tuning import SpaceSource, check_study, read_space

    grid = read_space(ROOT / "tune_spaces" / "grid.py")
    with pytest.raises(ConfigError, match="schedule='simultaneous': Tune's trials are async parts runs"):
        check_study(grid, 2, "asha", "simultaneous")
    broken = SpaceSource("broken.py", "def space(parts):\n    return 1 / 0\n\n\ndef lrs(params, parts):\n    return []")
    with pytest.raises(ConfigError, match=r"broken.py: space\(2\) failed \(ZeroDivisionError: division by zero\)"):
        check_study(broken, 2, "asha")
    storage = tmp_path / "studies"
    opts = tiny_options(mnist_dir, storage, schedule="simultaneous", parts=2)
    assert tune_lr.main(["--space", str(ROOT / "tune_spaces" / "grid.py"), *opts]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: schedule='simultaneous': Tune's trials are async parts runs; give --schedule async"]
    assert not storage.exists() or not any(storage.iterdir())


def test_a_trial_that_failed_fails_the_study_in_one_line_and_nothing_is_ranked(tmp_path):
    """Tune keeps going without a trial that raised: the study must not rank the rest
    as if it were whole (a diverged trial is reported, and ranked last, not an error)."""
    from raylocal.errors import RaylocalError
    from raylocal.tune.cli import report

    class Results:
        errors = [RuntimeError("Traceback (most recent call last):\n  File ...\nValueError: a part's bad input")]

    with pytest.raises(RaylocalError, match=r"^1 trial\(s\) failed, the first: ValueError: a part's bad input; see "):
        report(Results(), RaylocalConfig(parts=2), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_study_ranks_nothing_and_says_how_to_continue(tmp_path):
    """Tune's fit() returns normally after Ctrl-C: trials still running or waiting must
    not be ranked as finished, nor their best LRs written for a study to use."""
    from types import SimpleNamespace

    from raylocal.errors import RaylocalError
    from raylocal.tune.cli import report

    trials = [SimpleNamespace(status=s) for s in ("TERMINATED", "RUNNING", "PENDING")]
    results = SimpleNamespace(errors=[], _experiment_analysis=SimpleNamespace(trials=trials))
    with pytest.raises(RaylocalError, match=r"^the study stopped before 2 of its 3 trials ended; .* --resume$"):
        report(results, RaylocalConfig(parts=2), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_trial_reserves_a_bundle_for_each_part_its_part_spec_names():
    assert len(TrialGroup.plan(RaylocalConfig(part_spec="1|1|2")).bundles) == 1 + 3


def test_a_trial_that_ends_between_perturbation_steps_does_not_strand_the_paused_ones():
    """Synchronous PBT paused trial 0 at step 16 to wait for trial 1, which then
    ended (its last report done) at step 12: Tune's own scheduler never runs trial 0
    again, and the study hangs; ours moves the barrier on."""
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pbt import _PBTTrialState

    class Trial:
        experiment_tag = "t"

        def __init__(self, status: str) -> None:
            self.status = status

    class Controller:
        def __init__(self, trials: list, live: list) -> None:
            self.trials, self.live = trials, live

        def get_trials(self) -> list:
            return self.trials

        def get_live_trials(self) -> list:
            return self.live

    paused, ended = Trial("PAUSED"), Trial("TERMINATED")
    controller = Controller([paused, ended], [paused])
    pbt = SynchronousPBT(time_attr="steps", perturbation_interval=8, hyperparam_mutations={"lr": [1e-3]},
                                synch=True, metric="test_bpd", mode="min")  # fmt: skip
    for trial, step in ((paused, 16), (ended, 12)):
        pbt._trial_state[trial] = _PBTTrialState(trial)
        pbt._trial_state[trial].last_train_time = step
    pbt._next_perturbation_sync = 16
    assert PopulationBasedTraining.choose_trial_to_run(pbt, controller) is None  # Tune's own: stranded
    pbt.on_trial_complete(controller, ended, {"steps": 12, "done": True})
    assert pbt.choose_trial_to_run(controller) is paused
    assert pbt._next_perturbation_sync == 24


def test_asha_compares_trials_at_equal_steps():
    """A trial reports on the first poll past each interval, and a slow poll reports
    late: ASHA's time is the step, not the count of reports, so that trials are
    compared at the same point of training."""
    import raylocal.tune.tuning as tuning

    asha, keep = tuning._scheduler("asha", {}, 4, 0, report_every=4, n_steps=32)
    assert (asha._time_attr, asha._max_t, asha._brackets[0]._rungs[-1][0], keep) == ("steps", 32, 4, None)


def test_a_trial_that_no_cluster_could_place_is_refused_in_one_line():
    """Tune only warns, every minute, about a trial it cannot place, and waits forever."""
    from raylocal.errors import ClusterError

    two_cpus = [{"CPU": 2.0}]
    TrialGroup.plan(RaylocalConfig(parts=3)).check(two_cpus)  # 4 bundles of 0.5
    with pytest.raises(ClusterError, match=r"^a trial of 4 parts and its own process needs CPU 2.5, the cluster has 2"):
        TrialGroup.plan(RaylocalConfig(parts=4)).check(two_cpus)
    with pytest.raises(ClusterError, match=r"^a trial's bundle of \{CPU 3\} fits no node of this cluster \(2 node"):
        TrialGroup.plan(RaylocalConfig(parts=2, cpus_per_part=3.0)).check([{"CPU": 2.0}, {"CPU": 2.0}])
    one_gpu = [{"CPU": 16.0, "GPU": 1.0}]
    with pytest.raises(ClusterError, match="needs GPU 3.1, the cluster has 1"):
        TrialGroup.plan(RaylocalConfig(parts=3, gpus_per_part=1.0)).check(one_gpu)


def test_a_trials_group_keeps_to_the_worker_resource_and_spreads_as_the_run_would():
    """A trial's bundles honour --worker-resource and --placement spread, as a run's
    own parts do; a group no cluster could place is refused in one line."""
    from raylocal.cluster.placement import WORKER_RESOURCE_SHARE
    from raylocal.errors import ClusterError

    pinned = TrialGroup.plan(RaylocalConfig(parts=2, worker_resource="workers"))
    assert pinned.strategy == "PACK"
    assert pinned.bundles == [{"CPU": 0.5, "workers": WORKER_RESOURCE_SHARE}] * 3
    head, worker = {"CPU": 8.0}, {"CPU": 1.0, "workers": 1.0}
    with pytest.raises(ClusterError, match=r"needs CPU 1.5, the nodes with resource 'workers' have 1; use fewer"):
        pinned.check([head, worker])  # the head's CPUs do not count
    pinned.check([head, worker, worker])
    with pytest.raises(ClusterError, match=r"^--worker-resource workers: no node of this cluster \(1 node\(s\)\) has"):
        pinned.check([head])
    # the default GPU share counts the GPUs of the nodes a trial may use only (4 bundles on 1 GPU, not 5)
    from raylocal.cluster.placement import trial_shares

    nodes = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 1.0, "workers": 1.0}]
    assert trial_shares(RaylocalConfig(parts=3, worker_resource="workers"), nodes, 1) == {
        "cpus_per_part": 0.5, "gpus_per_part": 0.25,
    }  # fmt: skip
    assert trial_shares(RaylocalConfig(parts=3), nodes, 1)["gpus_per_part"] == 0.9
    spread = TrialGroup.plan(RaylocalConfig(parts=2, placement="spread"))
    assert spread.strategy == "STRICT_SPREAD" and spread.factory().strategy == "STRICT_SPREAD"
    with pytest.raises(ClusterError, match=r"^--placement spread puts a trial's process and each of its 2 parts on "
                       r"its own node: 3 nodes, but only 2 can hold one"):  # fmt: skip
        spread.check([{"CPU": 8.0}, {"CPU": 8.0}])
    spread.check([{"CPU": 1.0}] * 3)


def test_a_trial_reports_its_divergence_once(monkeypatch):
    """The reporter's own evaluation found the assembled model diverged: it reports
    that and stops the run, whose DivergedError then must not report it again (a
    second row at the same step); a divergence of the parts themselves, unreported,
    is reported once."""
    import ray
    from ray import tune

    import raylocal.tune.tuning as tuning
    from raylocal.errors import DivergedError

    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics, **_: reports.append(metrics))
    monkeypatch.setattr(ray, "get", lambda value: value)  # the fake service answers at once
    monkeypatch.setattr(tuning, "gather_weights", lambda actors: {})

    class Service:
        class evaluate:
            @staticmethod
            def remote(test, state):
                return math.nan

    reporter = tuning.TrialReporter(torch.zeros(1), [1e-3, 1e-3], every=4, checkpoints=False)
    reporter.watch(Service(), {"bounds": [[0, 1], [1, 2]]})
    with pytest.raises(DivergedError) as raised:
        reporter([None, None], [{"steps": 4, "rollbacks": 0}, {"steps": 4, "rollbacks": 1}])
    reporter.report_divergence(raised.value)
    assert [(r["diverged"], r["steps"], r["test_bpd"]) for r in reports] == [(1, 4, tuning.DIVERGED_BPD)]
    fresh = tuning.TrialReporter(torch.zeros(1), [1e-3], every=4, checkpoints=False)
    fresh.report_divergence(DivergedError("part 1 beyond its rollbacks"))
    fresh.report_divergence(DivergedError("part 1 beyond its rollbacks"))
    assert [(r["diverged"], r["finished"]) for r in reports[1:]] == [(1, 1)]


def test_a_studys_trial_count_crosses_its_grids_with_its_samples():
    """What the default GPU share divides the GPUs by (with no --max-concurrent):
    every trial the study may run at once, a grid's points and not --trials."""
    from ray import tune

    from raylocal.tune.tuning import study_trials

    grid = load_space(ROOT / "tune_spaces" / "grid.py", 2)
    assert study_trials(grid.space(2), 1) == 4  # the grid's 4 profiles
    both = {"a": tune.grid_search([1, 2]), "b": {"c": tune.grid_search([1, 2, 3])}, "lr": tune.loguniform(1e-4, 1e-2)}
    assert study_trials(both, 2) == 2 * 3 * 2
    assert study_trials(load_space(ROOT / "tune_spaces" / "independent.py", 3).space(3), 8) == 8


def test_a_study_ranks_each_trial_by_its_own_record_of_its_last_report(tmp_path):
    """Tune's last result of a trial can lag its own record (rows lost around a PBT restore); the
    ranking reads the trial's record, and Tune's result only for a trial without one."""
    import types

    recorded, bare = tmp_path / "run_trial_a", tmp_path / "run_trial_b"
    recorded.mkdir()
    rows = [{"test_bpd": 7.0, "steps": 12, "finished": 0}, {"test_bpd": 6.5, "steps": 16, "finished": 1}]
    (recorded / REPORTS).write_text("".join(json.dumps(r | {"lr_1": 1e-3}) + "\n" for r in rows))
    lagging = {"test_bpd": 7.0, "steps": 12, "finished": 0, "lr_1": 1e-3, "time_total_s": 9.0}
    results = [
        types.SimpleNamespace(path=str(recorded), metrics=lagging),
        types.SimpleNamespace(path=str(bare), metrics={"test_bpd": 6.8, "steps": 16, "finished": 1, "lr_1": 2e-3}),
    ]
    _, ranked = ranked_table(results, parts=1)
    assert [(r["lrs"], r["test_bpd"], r["steps"], r["stopped_early"]) for r in ranked] == [
        ([1e-3], 6.5, 16, False),
        ([2e-3], 6.8, 16, False),
    ]
    assert ranked[0]["time_s"] == 9.0  # the time is Tune's


def test_a_trials_record_keeps_every_attempts_reports_and_outlives_its_runs_cleanup(tmp_path, monkeypatch):
    """A trial's reports.jsonl holds its reports across attempts (PBT restarts it in the same
    directory), is written again when the run removed its directory (it diverged before its first
    checkpoint), and a line cut short is left out."""
    import shutil

    import ray.tune

    from raylocal.errors import DivergedError
    from raylocal.tune.tuning import TrialReporter, last_report, read_reports

    sent = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, checkpoint=None: sent.append(metrics))
    trial = tmp_path / "run_trial_x"
    TrialReporter(torch.zeros(1), [1e-3], 4, False, trial).report({"steps": 4, "test_bpd": 7.0})
    again = TrialReporter(torch.zeros(1), [1e-3], 4, False, trial)  # restarted, in the same directory
    again.report({"steps": 8, "test_bpd": 1e3, "diverged": 1})
    again.reported_divergence = True  # its own evaluation found it
    shutil.rmtree(trial)  # the run failed before its first checkpoint: nothing to resume
    again.report_divergence(DivergedError("not finite"))
    assert [r["steps"] for r in read_reports(trial)] == [4, 8] and len(sent) == 2  # reported once each
    with open(trial / REPORTS, "a") as f:
        f.write('{"steps": 1')  # killed while writing
    assert last_report(trial)["steps"] == 8
