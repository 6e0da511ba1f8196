"""The async run's driver only coordinates: planning, evaluations, the fine-tune
and the final evaluation all run in Ray processes, where the work is."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import lose_the_working_directory_on_joining, tiny_options

import raylocal.cluster.preflight
import raylocal.training.schedules
import raylocal.training.trainer
from raylocal.cli.train import main
from raylocal.core.checkpoint import load_checkpoint
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.run.finish import finish_after_parts
from raylocal.tools.config_path import climbs, stops, trace
from raylocal.training.schedules import PARTS_RESULT
from raylocal.training.service import ModelService
from raylocal.training.trainer import build_glow, evaluate_bpd

pytestmark = pytest.mark.usefixtures("ray_session")


def _forbid(*_args, **_kwargs):
    raise AssertionError("the driver did tensor work")


def test_driver_only_coordinates_and_a_killed_fine_tune_resumes_to_the_same_weights(mnist_dir, tmp_path, monkeypatch):
    storage = tmp_path / "runs"
    opts = dict(
        schedule="async", parts=2, part_spec="1|2", epochs=2, finetune_epochs=3, checkpoint_every=2,
        inject="sigkill:3@5,slow:2@0.25", eval_every=2, run_name="a", progress=False,
    )  # fmt: skip
    lose_the_working_directory_on_joining(
        monkeypatch, tmp_path, raylocal.cluster.preflight
    )  # as under `ray job submit`
    # in this process (the driver) nothing may build an optimizer, train or evaluate
    monkeypatch.setattr(torch.optim.Adam, "__init__", _forbid)
    monkeypatch.setattr(torch.optim.Adamax, "__init__", _forbid)
    monkeypatch.setattr(raylocal.training.trainer.PartTrainer, "step", _forbid)
    monkeypatch.setattr(raylocal.training.trainer, "evaluate_bpd", _forbid)
    calls = trace(tiny_options(mnist_dir, storage, **opts))  # main(), the config's calls on the driver recorded
    monkeypatch.undo()
    # the config goes down once: checked, joined and planned (``plan_ray_run``), the parts trained,
    # then the rest of the run; each module once, never back (issue 33)
    path = stops(calls)
    expected = ["launch", "run", "preflight", "connect", "placement", "async_run", "parts_phase", "finish_phase"]
    assert [m.rsplit(".", 1)[-1] for m in path] == expected and climbs(path) == 0, path
    assert not torch.cuda.is_initialized()
    run_dir = storage / "a"
    s = json.loads((run_dir / "summary.json").read_text())
    where = s["where"]
    assert where["driver"]["pid"] == os.getpid()
    others = [p["pid"] for p in where["parts"]] + [where["service"]["pid"], where["finished"]["pid"]]
    assert os.getpid() not in others and len(set(others)) == 4, where
    assert where["finished"]["phase"] == "ray train worker"
    assert [p["name"] for p in s["phases"]] == ["ray parts", "ray train fine-tune"]
    # the evaluations while the parts trained (one per epoch of the last part) ran in the service
    live = [p for p in s["curve"] if p["step"] < 8]
    assert where["service"]["evaluations"] >= 1 and len(live) >= 1
    # the worker was killed at its 5th fine-tune step and Ray Train restarted it
    assert (run_dir / ".fault-sigkill-3@5").exists()
    assert [h["phase"] for h in s["history"]] == ["parts", "finetune", "finetune", "finetune"]
    # the same fine-tune, uninterrupted and in this process, from the same parts phase
    ref_dir = storage / "ref"
    ref_dir.mkdir()
    shutil.copy(run_dir / PARTS_RESULT, ref_dir / PARTS_RESULT)
    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=2, threads=1, parts=2, part_spec="1|2", epochs=2, finetune_epochs=3,
        schedule="async", samples=4, progress=False, storage_path=str(storage), checkpoint_every=2,
    )  # fmt: skip
    config = RaylocalConfig(**values)
    data = load_dataset("mnist", mnist_dir)
    bounds = raylocal.training.schedules.part_spec_for(config, build_glow(config, data.shape)).bounds
    ref = finish_after_parts(config, data, ref_dir, bounds)
    a = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    b = load_checkpoint(ref_dir / "checkpoint.pt")["model"]
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    assert s["test_bpd"] == pytest.approx(ref["test_bpd"], abs=0)


def test_model_service_plans_and_evaluates_as_the_run_would(mnist_dir):
    config = RaylocalConfig(data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, parts=3, schedule="async")
    data = load_dataset("mnist", mnist_dir)
    service = ModelService(config, data.shape, "cpu")
    plan = service.plan(data.train)
    glow = build_glow(config, data.shape)
    expected = raylocal.training.schedules.part_spec_for(config, glow, data.train)
    assert plan["bounds"] == [list(b) for b in expected.bounds] and len(plan["bounds"]) == 3
    assert plan["param_bytes"] == sum(p.numel() * 4 for p in glow.parameters())
    state = {k: v.clone() for k, v in glow.state_dict().items()}
    assert service.evaluate(data.test, state) == evaluate_bpd(glow, data.test, 500, torch.device("cpu"))


def test_a_fine_tune_that_diverges_fails_the_run_in_one_line_and_is_not_retried(mnist_dir, tmp_path, capsys):
    args = tiny_options(
        mnist_dir, tmp_path / "runs", run_name="ftdiv", schedule="async", parts=2, part_spec="1|2", epochs=1,
        finetune_epochs=1, finetune_lr=1e9, warmup_steps=0, max_rollbacks=0, max_restarts=2, progress=False,
    )  # fmt: skip
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    # the divergence itself, not Ray Train's wrapper around its third failure
    assert len(err) == 1 and err[0].startswith("error: the fine-tune diverged: 1 rollbacks"), err
