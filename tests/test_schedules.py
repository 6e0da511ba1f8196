"""Single-process schedules: who trains, who runs, what changes, and divergence survival."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import local_session, run_local, tiny_options

from raylocal.cli.train import main
from raylocal.core.config import RaylocalConfig
from raylocal.model.glow import Glow
from raylocal.model.parts import parse_part_spec
from raylocal.training.schedules import PartsResult, epoch_plan, train_batch
from raylocal.training.trainer import PartTrainer, initialize


def test_epoch_plans():
    assert epoch_plan("alternating", 2, 5) == [(0,), (1,), (0,), (1,), (0,)]
    assert epoch_plan("alternating", 2, 2, alternate_every=50) == [(0, 1), (0, 1)]
    assert epoch_plan("sequential", 3, 2) == [(0,), (0,), (1,), (1,), (2,), (2,)]
    assert epoch_plan("simultaneous", 2, 2) == [(0, 1), (0, 1)]
    assert epoch_plan("e2e", 1, 2) == [(0,), (0,)]


def _setup(n_parts_spec: str = "1|2"):
    torch.manual_seed(0)
    glow = Glow((1, 8, 8), n_levels=2, depth=2, hidden=8)
    spec = parse_part_spec(n_parts_spec, glow)
    parts = [glow.part(a, b) for a, b in spec.bounds]
    cfg = RaylocalConfig(warmup_steps=0, parts=len(parts))
    trainers = [PartTrainer(p, 1e-2, cfg, k) for k, p in enumerate(parts)]
    x = torch.rand(16, 1, 8, 8) - 0.5
    initialize(parts, x)
    return parts, trainers, x


def _copy(part):
    return {k: v.clone() for k, v in part.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_alternating_epoch_of_part1_never_runs_part2():
    parts, trainers, x = _setup()
    calls = [0, 0]
    for k, p in enumerate(parts):
        p.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    before = [_copy(p) for p in parts]
    train_batch(parts, trainers, (0,), x)
    assert calls == [1, 0]  # downstream not computed
    assert not _same(_copy(parts[0]), before[0]) and _same(_copy(parts[1]), before[1])


def test_alternating_epoch_of_part2_runs_part1_without_autograd():
    parts, trainers, x = _setup()
    before = [_copy(p) for p in parts]
    grad_enabled = []
    parts[0].register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    res = train_batch(parts, trainers, (1,), x)
    assert grad_enabled == [False]
    assert all(p.grad is None for p in parts[0].parameters())
    assert _same(_copy(parts[0]), before[0]) and not _same(_copy(parts[1]), before[1])
    assert set(res) == {1}


def test_simultaneous_trains_every_part_on_upstream_detached_output():
    parts, trainers, x = _setup()
    before = [_copy(p) for p in parts]
    with torch.no_grad():
        y1, _ = parts[0](x)  # what part 2 must see: part 1's output before its update
    expected_loss = None
    from raylocal.model.objectives import local_nll

    with torch.no_grad():
        expected_loss = float(local_nll(parts[1], y1)[0].mean())
    res = train_batch(parts, trainers, (0, 1), x)
    assert res[1].loss == pytest.approx(expected_loss, rel=1e-6)
    assert all(not _same(_copy(p), b) for p, b in zip(parts, before))


def _run(mnist_dir, tmp_path, **opts):
    storage = tmp_path / "runs"
    assert main(tiny_options(mnist_dir, storage, run_name="r", **opts)) == 0
    return json.loads((storage / "r" / "summary.json").read_text())


@pytest.mark.parametrize("schedule", ["sequential", "alternating", "simultaneous"])
def test_parts_schedules_run_and_learn(schedule, mnist_dir, tmp_path):
    s = _run(mnist_dir, tmp_path, schedule=schedule, parts=2, epochs=2, lr="3e-3,2e-3", finetune_epochs=1)
    phases = [h["phase"] for h in s["history"]]
    assert phases[-1] == "finetune" and phases.count("finetune") == 1
    assert s["n_parts"] == 2 and len(s["part_time"]) == 2
    assert s["curve"][-1]["test_bpd"] < s["curve"][0]["test_bpd"]
    assert s["phase_time"]["finetune"] > 0
    # the run's phases, each timed around its epochs (their training, evaluations and checkpoints)
    assert [p["name"] for p in s["phases"]] == ["local parts", "local fine-tune", "finish"]
    timed = {p["name"]: p["seconds"] for p in s["phases"]}
    assert timed["local parts"] >= s["phase_time"]["parts"] and timed["local fine-tune"] >= s["phase_time"]["finetune"]


def test_per_part_learning_rates_reach_the_trainers(mnist_dir, tmp_path):
    from raylocal.run.launch import load_data

    cfg = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, parts=3, schedule="alternating",
        lr=[1e-3, 5e-4, 1e-4], storage_path=str(tmp_path), init_batch_size=64,
    )  # fmt: skip
    run = local_session(cfg, load_data(cfg), tmp_path / "x")
    assert [t.base_lr for t in run.trainers] == [1e-3, 5e-4, 1e-4]


def test_a_single_process_runs_records_are_opened_by_its_run_and_its_curve_is_their_evaluations(mnist_dir, tmp_path):
    """The ``Run`` opens the records of a single-process run and its session writes
    through them: every point on the summary's curve is an evaluation of the model
    as it was then (the last one is the final model's, recomputed here on the test
    images with the run's batch and cap), and TensorBoard holds the same values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raylocal.core.checkpoint import load_checkpoint
    from raylocal.run.launch import load_data
    from raylocal.run.run import Run
    from raylocal.training.trainer import build_glow, evaluate_bpd

    cfg = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, parts=2, schedule="alternating", epochs=2,
        eval_every=3, eval_cap=7.25, eval_batch_size=16, batch_size=32, storage_path=str(tmp_path), run_name="r",
        init_batch_size=64, progress=False,
    )  # fmt: skip
    data = load_data(cfg)
    run = Run(cfg, data)
    summary = run.execute()
    assert run.records is not None and summary["run_dir"] == str(run.records.dir) == str(tmp_path / "r")
    glow = build_glow(cfg, data.shape)
    glow.load_state_dict(load_checkpoint(run.records.checkpoint_path, kind="run")["model"])
    final = evaluate_bpd(glow, data.test, 16, torch.device("cpu"), cap=7.25)  # some images above it
    curve = summary["curve"]
    assert curve[-1]["test_bpd"] == pytest.approx(final, rel=1e-6) == summary["test_bpd"]
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and any(s % 3 == 0 and s < steps[-1] for s in steps)  # --eval-every's too
    events = EventAccumulator(summary["tensorboard"])
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("model/test_bpd")]
    assert logged == [(p["step"], pytest.approx(p["test_bpd"], rel=1e-6)) for p in curve]


def test_a_runs_samples_are_drawn_at_its_temperature(mnist_dir, tmp_path, monkeypatch):
    """The samples a run saves (``--samples`` at ``--temperature``): the images the
    run's model draws at that temperature, written where the run log keeps them."""
    import raylocal.training.records as records
    from raylocal.run.launch import load_data

    cfg = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, samples=3, temperature=0.35,
        storage_path=str(tmp_path), init_batch_size=64, progress=False,
    )  # fmt: skip
    run = local_session(cfg, load_data(cfg), tmp_path / "x")
    asked = []
    real = records.sample_images
    monkeypatch.setattr(records, "sample_images", lambda glow, n, t: asked.append((glow, n, t)) or real(glow, n, t))
    path = run.records.samples(run.glow, 7)
    assert asked == [(run.glow, 3, 0.35)] and path is not None and path.is_file()


def test_cosine_decay_spans_each_parts_own_epochs_then_the_fine_tune(mnist_dir, tmp_path):
    from raylocal.run.launch import load_data

    cfg = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, parts=3, schedule="alternating",
        epochs=5, finetune_epochs=1, batch_size=16, lr_schedule="cosine", warmup_steps=2,
        storage_path=str(tmp_path), init_batch_size=64, eval_batch_size=32, samples=0, progress=False,
    )  # fmt: skip
    run = local_session(cfg, load_data(cfg), tmp_path / "x")
    per_epoch = len(run.stream)
    # alternating over 5 epochs: parts 1 and 2 train in two epochs each, part 3 in one
    assert [t.total_steps for t in run.trainers] == [2 * per_epoch, 2 * per_epoch, per_epoch]
    run_local(run)
    assert [t.steps for t in run.trainers] == [t.total_steps for t in run.trainers]
    assert run.finetuner.total_steps == per_epoch == run.finetuner.steps
    # every trainer ends its phase with its LR decayed to zero
    assert all(t.lr == pytest.approx(0.0, abs=1e-12) for t in [*run.trainers, run.finetuner])


def test_cosine_run_gives_every_trainer_the_lr_of_the_runs_position(mnist_dir, tmp_path, monkeypatch):
    import math

    from raylocal.run.launch import load_data

    applied = []  # (trainer index, LR the optimizer used), in the order of the run's batches
    original = PartTrainer.step

    def recording(self, x):
        result = original(self, x)
        applied.append((self.index, self.optimizer.param_groups[0]["lr"]))
        return result

    monkeypatch.setattr(PartTrainer, "step", recording)
    cfg = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, parts=2, schedule="alternating",
        epochs=2, finetune_epochs=1, batch_size=16, lr=[1e-2], lr_schedule="cosine-run", warmup_steps=0,
        storage_path=str(tmp_path), init_batch_size=64, eval_batch_size=32, samples=0, progress=False,
    )  # fmt: skip
    run = local_session(cfg, load_data(cfg), tmp_path / "x")
    run_local(run)
    per_epoch = len(run.stream)
    total = 3 * per_epoch
    assert [k for k, _ in applied] == [0] * per_epoch + [1] * per_epoch + [2] * per_epoch
    # the same curve e2e would follow: part 2's first step is not back at the top
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * g / total)) for g in range(total)]
    assert [lr for _, lr in applied] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_alternating_every_n_batches_switches_parts_mid_epoch(mnist_dir, tmp_path, monkeypatch):
    from raylocal.run.launch import load_data

    trained = []  # trainer index of every step, in the order of the run's batches
    original = PartTrainer.step

    def recording(self, x):
        trained.append(self.index)
        return original(self, x)

    monkeypatch.setattr(PartTrainer, "step", recording)
    cfg = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, parts=2, schedule="alternating",
        alternate_every=3, epochs=2, finetune_epochs=1, batch_size=16, lr_schedule="cosine", warmup_steps=0,
        storage_path=str(tmp_path), init_batch_size=64, eval_batch_size=32, samples=0, progress=False,
    )  # fmt: skip
    run = local_session(cfg, load_data(cfg), tmp_path / "x")
    per_epoch = len(run.stream)
    assert per_epoch == 4  # 64 training images / 16: so a switch falls inside each epoch
    # parts-phase batches 0-2 -> part 1, 3-5 -> part 2, 6-7 -> part 1, across the epoch boundary
    parts_phase = [0, 0, 0, 1, 1, 1, 0, 0]
    assert [t.total_steps for t in run.trainers] == [5, 3]  # each part's cosine spans its own batches
    s = run_local(run)
    assert trained == parts_phase + [2] * per_epoch
    assert [t.steps for t in run.trainers] == [5, 3]
    assert [h["active"] for h in s["history"]] == [[1, 2], [1, 2], []]


def test_diverging_part_is_rolled_back_visibly_and_survives(mnist_dir, tmp_path, capsys):
    # sequential: part 2 starts on part 1's frozen output with an absurd LR
    s = _run(
        mnist_dir, tmp_path, schedule="sequential", parts=2, epochs=2, lr="1e-3,30",
        warmup_steps=0, max_rollbacks=50, snapshot_every=1, rollback_factor=3,
    )  # fmt: skip
    assert s["rollbacks"][1] > 0 and s["rollbacks"][0] == 0
    # a part fed by another never skips a batch (its input moves); one count per trainer
    assert len(s["skipped_batches"]) == len(s["rollbacks"]) and s["skipped_batches"][1] == 0
    assert all(e["part"] == 2 for e in s["rollback_events"])
    assert s["rollback_events"][0]["new_lr"] == pytest.approx(15.0)
    assert "ROLLBACK part 2" in capsys.readouterr().err
    assert s["test_bpd"] == s["test_bpd"] and s["test_bpd"] < 100  # finite, sane


@pytest.mark.parametrize(
    "spec,expected",
    [
        # layers: 0 squeeze, 1-3 and 4-6 the steps of block 1, 7 split, 8 squeeze, 9-11 and 12-14 block 2
        ("1[:1]|1[1:],2", [1, 2, 3, 4, 5, 6]),  # inside a block: its step 1 and step 2
        ("1|2", [4, 5, 6, 9, 10, 11]),  # at the blocks' edge: block 1's last step and block 2's first
    ],
)
def test_boundary_scope_fine_tune_trains_exactly_the_steps_at_each_boundary(spec, expected, mnist_dir, tmp_path):
    from raylocal.core.data import load_dataset
    from raylocal.model.parts import boundary_steps, resolve_part_spec

    glow = Glow(n_levels=2, depth=2, hidden=8, image_shape=(1, 8, 8))
    assert boundary_steps(glow, resolve_part_spec(glow, 2, "across-blocks", spec, None).bounds) == expected
    # the same seeds with and without the fine-tune: exactly those layers moved, nothing else
    weights = []
    for finetune in (0, 1):
        config = RaylocalConfig(
            data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
            eval_batch_size=32, warmup_steps=2, threads=1, parts=2, part_spec=spec, schedule="simultaneous",
            epochs=1, finetune_epochs=finetune, finetune_scope="boundary", samples=0, progress=False,
            storage_path=str(tmp_path),
        )  # fmt: skip
        run = local_session(config, load_dataset("mnist", mnist_dir), tmp_path / f"ft{finetune}")
        run_local(run)
        weights.append({k: v.clone() for k, v in run.glow.state_dict().items()})
    before, after = weights
    changed = sorted({int(k.split(".")[1]) for k in before if not torch.equal(before[k], after[k]) and "layers." in k})
    assert changed == expected
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("layers."))  # the top prior


def test_relative_update_rule_scales_each_part_by_its_measured_step_size(mnist_dir, tmp_path):
    """--lr-rule relative-update: over steps 10-19 (second half of a warmup of at most
    20) each part's relative update is measured; then part k's LR is multiplied by
    g / r_k (g: their geometric mean). The r_k are measured here independently, from
    the optimizers' own step hooks."""
    from raylocal.core.data import load_dataset

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=4, threads=1, parts=2, part_spec="1|2", schedule="simultaneous",
        epochs=6, lr=[2e-3], lr_rule="relative-update", samples=0, progress=False, storage_path=str(tmp_path),
    )  # fmt: skip
    run = local_session(config, load_dataset("mnist", mnist_dir), tmp_path / "rule")
    seen: dict[int, list[float]] = {0: [], 1: []}
    for k, t in enumerate(run.trainers):
        params = [p for g in t.optimizer.param_groups for p in g["params"]]
        held: list[torch.Tensor] = []

        def before(opt, args, kwargs, params=params, held=held):
            held[:] = [p.detach().clone() for p in params]

        def after(opt, args, kwargs, k=k, t=t, params=params, held=held):
            if 10 <= t.steps < 20:  # the trainer counts the step after the optimizer's
                moved = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, held))
                seen[k].append((moved / sum(float(b.pow(2).sum()) for b in held)) ** 0.5)

        t.optimizer.register_step_pre_hook(before)
        t.optimizer.register_step_post_hook(after)
    summary = run_local(run)
    rates = [sum(v) / len(v) for v in seen.values()]
    assert [len(v) for v in seen.values()] == [10, 10] and rates[0] != pytest.approx(rates[1], rel=0.05)
    g = (rates[0] * rates[1]) ** 0.5
    assert summary["lr_multipliers"] == pytest.approx([g / r for r in rates], rel=1e-6)
    assert summary["part_lrs"] == pytest.approx([2e-3 * g / r for r in rates], rel=1e-6)
    # the rule compares parts that train together, from one LR
    with pytest.raises(ValueError, match="simultaneous and alternating schedules, not 'async'"):
        RaylocalConfig(parts=2, schedule="async", lr_rule="relative-update")
    with pytest.raises(ValueError, match="from one --lr, got 2"):
        RaylocalConfig(parts=2, schedule="simultaneous", lr=[1e-3, 1e-3], lr_rule="relative-update")


@pytest.mark.parametrize("cut_at", [14, 28])  # inside the rule's window (steps 10-19), and after it
def test_a_run_with_the_lr_rule_resumes_to_the_same_weights(mnist_dir, tmp_path, cut_at):
    import shutil

    from raylocal.core.data import load_dataset

    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=4, threads=1, parts=2, part_spec="1|2", schedule="simultaneous",
        epochs=8, lr=[2e-3], lr_rule="relative-update", samples=0, progress=False, storage_path=str(tmp_path),
        checkpoint_every=1,
    )  # fmt: skip
    data = load_dataset("mnist", mnist_dir)
    full = local_session(RaylocalConfig(**values), data, tmp_path / "full")
    write = full.checkpoint

    def checkpoint_and_keep_one():
        write()
        if full.state.global_step == cut_at:
            (tmp_path / "cut").mkdir(exist_ok=True)  # (an epoch end checkpoints this step twice)
            shutil.copy(full.records.checkpoint_path, tmp_path / "cut" / full.records.checkpoint_path.name)

    full.checkpoint = checkpoint_and_keep_one
    expected = run_local(full)
    resumed = local_session(RaylocalConfig(**values, resume=True), data, tmp_path / "cut")
    got = run_local(resumed)
    assert got["lr_multipliers"] == expected["lr_multipliers"] and expected["lr_multipliers"] is not None
    a, b = full.glow.state_dict(), resumed.glow.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_rest_of_a_run_records_its_config_as_given_not_the_device_it_was_handed(mnist_dir, tmp_path):
    """The fine-tune after a Ray parts phase runs on the device Ray granted its
    process (a GPU worker's is "cuda:0", no value of --device). Its checkpoint
    keeps the run's config as given, so that --resume validates it and resolves
    the device anew; a second call finds that checkpoint and continues from it."""
    from raylocal.core.checkpoint import load_checkpoint
    from raylocal.core.data import load_dataset
    from raylocal.run.finish import finish_after_parts
    from raylocal.run.launch import resume_config
    from raylocal.run.service import RunService
    from raylocal.training.trainer import build_glow

    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=0, threads=1, parts=2, part_spec="1|2", schedule="async",
        epochs=1, finetune_epochs=1, samples=0, progress=False, storage_path=str(tmp_path), run_name="run",
    )  # fmt: skip
    config, data = RaylocalConfig(**values), load_dataset("mnist", mnist_dir)
    torch.manual_seed(0)
    glow = build_glow(config, data.shape)
    bounds = parse_part_spec("1|2", glow).bounds
    stats = [{"steps": 4, "compute_s": 0.1, "losses": [3.0], "rollbacks": 0, "skipped": 0} for _ in bounds]
    parts = PartsResult(state=glow.state_dict(), wall=0.2, stats=stats)
    run_dir = tmp_path / "run"
    service = RunService(config.model_dump_json(), data.shape, 1, False, device="cpu")  # the model service's route
    first = service.finish(data.name, data.train, data.test, str(run_dir), bounds, parts)
    recorded = load_checkpoint(run_dir / "checkpoint.pt", kind="run")["config"]
    assert RaylocalConfig.model_validate_json(recorded) == config  # not device "cpu", not resume
    assert (
        first["steps"] == 4 + len(data.train) // config.schedule.batch_size
    )  # the parts' steps, then one fine-tune epoch
    again = finish_after_parts(config, data, run_dir, bounds, parts=parts, device="cpu")  # continues: all done
    assert again["steps"] == first["steps"] and again["test_bpd"] == first["test_bpd"]
    assert resume_config(RaylocalConfig(**values, resume=True), {"epochs": 1}).cluster.device == "auto"


def test_lr_clock_is_one_decay_over_the_run_or_each_trainers_own():
    import math

    from raylocal.training.trainer import LRClock, scheduled_lr

    run_wide = LRClock.of(RaylocalConfig(lr_schedule="cosine-run"), 10, 4, 2)
    assert (run_wide.decay(7), run_wide.position(13)) == (60, 13)
    # a fine-tune trained elsewhere after 40 batches of parts goes on along the run's curve
    args = run_wide.finetune_elsewhere(40)
    assert args == {"lr_clock": 40, "lr_total": 60}
    on = [scheduled_lr(1.0, s, 0, args["lr_total"], "cosine-run", args["lr_clock"] + s) for s in range(20)]
    assert on == pytest.approx([0.5 * (1 + math.cos(math.pi * (40 + s) / 60)) for s in range(20)])
    own = LRClock.of(RaylocalConfig(lr_schedule="cosine"), 10, 4, 2)
    assert (own.decay(7), own.position(13), own.finetune_elsewhere(40)) == (7, None, {})


def test_a_run_that_takes_over_parts_trained_elsewhere_builds_no_trainer_for_them(mnist_dir, tmp_path, monkeypatch):
    """The rest of an async run (after its Ray parts) and a rival's end train no part here: they build
    the fine-tune's trainer alone (none for a rival), yet record each part's LR as configured and the
    rollbacks the parts reported."""
    import raylocal.training.schedules as schedules
    from raylocal.core.data import load_dataset
    from raylocal.run.finish import finish_after_parts, finish_trained_elsewhere
    from raylocal.run.phases import TrainedElsewhere
    from raylocal.training.trainer import build_glow

    built = []
    real = schedules.PartTrainer
    monkeypatch.setattr(schedules, "PartTrainer", lambda *a, **k: built.append(k.get("name")) or real(*a, **k))
    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=0, threads=1, parts=2, part_spec="1|2", schedule="async",
        epochs=1, finetune_epochs=1, samples=0, progress=False, lr=[1e-3, 5e-4],
    )  # fmt: skip
    config, data = RaylocalConfig(**values), load_dataset("mnist", mnist_dir)
    torch.manual_seed(0)
    glow = build_glow(config, data.shape)
    bounds = parse_part_spec("1|2", glow).bounds
    stats = [{"steps": 4, "compute_s": 0.1, "losses": [3.0], "rollbacks": r, "skipped": 0} for r in (2, 1)]
    parts = PartsResult(state=glow.state_dict(), wall=0.2, stats=stats)
    summary = finish_after_parts(config, data, tmp_path / "async", bounds, parts=parts, device="cpu")
    assert built == ["the fine-tune"]
    assert summary["part_lrs"] == [1e-3, 5e-4] and summary["rollbacks"] == [2, 1, 0]
    assert [h["rollbacks"] for h in summary["history"]] == [[2, 1], [2, 1]]  # the parts', then fine-tune's epoch
    built.clear()
    rival = RaylocalConfig(**values | {"schedule": "data-parallel", "finetune_epochs": 0, "lr": [1e-3]})
    trained = TrainedElsewhere(glow.state_dict(), steps=4, seconds=0.1, history=[])
    summary = finish_trained_elsewhere(rival, data, tmp_path / "rival", trained)
    assert built == [] and summary["part_lrs"] == [1e-3] and summary["rollbacks"] == [0]


def test_a_run_trains_its_phases_in_order_hands_on_the_carry_and_releases_what_they_held(tmp_path, monkeypatch):
    """Run's loop, with phases of its own: each gets the shared context and what the ones before it put
    in the carry; the summary is the last phase's with what the others recorded; what a phase held is
    released at the end, also when a later phase fails, and a failed run leaves no directory behind."""
    import contextlib

    from raylocal.run.run import Run

    released, seen = [], []

    class Holds:
        name = "holds"

        def run(self, context, carry):
            seen.append(("holds", context))
            carry.held.enter_context(contextlib.ExitStack()).callback(released.append, "held")
            carry.plan = {"bounds": [(0, 2)]}
            carry.record["where"] = {"driver": "here"}

    class Finishes:
        name = "finishes"

        def run(self, context, carry):
            seen.append(("finishes", carry.plan["bounds"], released[:]))
            carry.summary = {"test_bpd": 1.5}

    class Fails:
        name = "fails"

        def run(self, context, carry):
            raise RuntimeError("a phase failed")

    config = RaylocalConfig(storage_path=str(tmp_path), run_name="ok", progress=False)
    run = Run(config, data=None)
    monkeypatch.setattr(run, "_phases", lambda: ("the context", [Holds(), Finishes()]))
    summary = run.execute()
    assert seen == [("holds", "the context"), ("finishes", [(0, 2)], [])] and released == ["held"]
    assert summary["test_bpd"] == 1.5 and summary["where"] == {"driver": "here"}
    assert [p["name"] for p in summary["phases"]] == ["holds", "finishes"]
    assert json.loads((tmp_path / "ok" / "summary.json").read_text()) == summary
    released.clear()
    # an actor's error raised in a later phase still comes out as its one line (as AsyncContext.open holds it)
    import ray.exceptions

    from raylocal.cluster.connect import errors_in_one_line
    from raylocal.errors import SpecError

    class OneLine:
        name = "one line"

        def run(self, context, carry):
            carry.held.enter_context(errors_in_one_line())

    class ActorFails:
        name = "actor fails"

        def run(self, context, carry):
            raise ray.exceptions.RayTaskError("PartActor.run", "Traceback ...", SpecError("the parts' own words"))

    remote = Run(config.replace(run_name="remote"), data=None)
    monkeypatch.setattr(remote, "_phases", lambda: ("the context", [OneLine(), Holds(), ActorFails()]))
    with pytest.raises(SpecError, match="^the parts' own words$"):
        remote.execute()
    assert released == ["held"]
    released.clear()
    failing = Run(config.replace(run_name="failed"), data=None)
    monkeypatch.setattr(failing, "_phases", lambda: ("the context", [Holds(), Fails(), Finishes()]))
    with pytest.raises(RuntimeError, match="a phase failed"):
        failing.execute()
    assert released == ["held"] and not (tmp_path / "failed").exists()
