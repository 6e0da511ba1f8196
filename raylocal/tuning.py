"""Ray Tune: search per-part learning rates of the async trainer for stability.

Each trial is a whole parts run. Its K part actors are reserved for it in one
placement group together with the trial itself
(``PlacementGroupFactory([{trial}] + [{part}] * K)``), so concurrent trials
never starve each other. While the parts train, the trial gathers their
weights every ``report_every`` steps, evaluates the assembled model's test BPD
and reports it; ASHA stops the weak trials early. A trial that diverges
(non-finite BPD, or a part beyond its rollback budget) reports it and stops:
it never crashes the study.

Search spaces live in ``tune_spaces/<name>.py``: ``space(parts) -> dict`` (a
Tune param space, which may refuse a part count) and ``lrs(params, parts) ->
list[float]``; ``GRID = True`` marks a grid (each point once).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from raylocal.config import RunConfig, write_config_file
from raylocal.data import ImageData
from raylocal.errors import ConfigError, DivergedError
from raylocal.runlog import Progress
from raylocal.schedules import part_spec_for
from raylocal.train import build_glow, evaluate_bpd

DIVERGED_BPD = 1e3  # what a diverged trial reports as its BPD: worse than any real model


def load_space(path: str | Path, parts: int) -> ModuleType:
    """Import a search space module and check it against the part count."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: tune space does not exist (see tune_spaces/)")
    spec = importlib.util.spec_from_file_location(f"tune_space_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise ConfigError(f"{path}: cannot import tune space ({type(e).__name__}: {e})") from None
    for name in ("space", "lrs"):
        if not callable(getattr(module, name, None)):
            raise ConfigError(f"{path}: a tune space defines space(parts) and lrs(params, parts); {name} is missing")
    module.space(parts)  # may raise ConfigError for a part count it does not support
    return module


def trial_lrs(space: ModuleType, params: dict[str, Any], parts: int) -> list[float]:
    values = space.lrs(params, parts)
    if len(values) != parts or not all(v > 0 for v in values):
        raise ConfigError(f"tune space gave learning rates {values} for {parts} parts")
    return [float(v) for v in values]


def run_trial(params: dict[str, Any], base_json: str, space_path: str, data: ImageData, report_every: int) -> None:
    """One Tune trial: a whole async parts run, reporting test BPD as it goes."""
    import ray
    from ray import tune

    from raylocal.ray_trainer import run_async_phase

    base = RunConfig.model_validate_json(base_json)
    space = load_space(space_path, base.parts)
    lrs = trial_lrs(space, params, base.parts)
    trial_dir = Path(tune.get_context().get_trial_dir())
    config = base.model_copy(update={"lr": lrs, "progress": False, "resume": False})
    torch.set_num_threads(1)
    glow = build_glow(config, data.shape)
    spec = part_spec_for(config, glow, data.train)
    device = torch.device("cpu")
    next_report = [report_every]
    reports = [0]

    def metrics(state: dict[str, torch.Tensor], polled: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        glow.load_state_dict(state)
        bpd = evaluate_bpd(glow, data.test, config.eval_batch_size, device)
        rollbacks = sum(p.get("rollbacks", 0) for p in polled)
        diverged = not math.isfinite(bpd)
        out = {
            "test_bpd": DIVERGED_BPD if diverged else bpd,
            "diverged": int(diverged),
            "rollbacks": rollbacks,
            "steps": polled[-1]["steps"] if polled else 0,
            "finished": int(done),
        }
        out.update({f"lr_{k + 1}": lr for k, lr in enumerate(lrs)})
        return out

    last_polled: list[dict[str, Any]] = []

    def monitor(gather, polled: list[dict[str, Any]]) -> None:
        last_polled[:] = polled
        if polled[-1]["steps"] < next_report[0]:
            return
        next_report[0] += report_every
        m = metrics(gather(), polled, done=False)
        reports[0] += 1
        tune.report(m)
        if m["diverged"]:
            raise DivergedError(f"assembled model's BPD is not finite at step {m['steps']}")

    try:
        state, stats, _, _ = run_async_phase(config, data, list(spec.bounds), Progress(False), trial_dir, monitor)
    except (DivergedError, ray.exceptions.RayTaskError) as e:
        tune.report(
            {
                "test_bpd": DIVERGED_BPD,
                "diverged": 1,
                "rollbacks": sum(p.get("rollbacks", 0) for p in last_polled),
                "steps": last_polled[-1]["steps"] if last_polled else 0,
                "finished": 1,
                "error": str(e)[:200],
            }
            | {f"lr_{k + 1}": lr for k, lr in enumerate(lrs)}
        )
        return
    polled = [{"rollbacks": st["rollbacks"], "steps": st["steps"]} for st in stats]
    tune.report(metrics(state, polled, done=True))


def tune_study(
    base: RunConfig,
    data: ImageData,
    space_path: str,
    trials: int,
    report_every: int,
    storage: Path,
    name: str,
    resume: bool = False,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 0.5,
) -> Any:
    """Run (or continue) a study; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = load_space(space_path, base.parts)
    param_space = space.space(base.parts)
    cpus_per_part = base.cpus_per_part or 0.5
    gpus_per_part = base.gpus_per_part or 0.0
    part_bundle = {"CPU": cpus_per_part} | ({"GPU": gpus_per_part} if gpus_per_part else {})
    base = base.model_copy(update={"cpus_per_part": cpus_per_part, "gpus_per_part": gpus_per_part})
    n_steps = base.epochs * (len(data.train) // base.batch_size)
    max_reports = max(1, n_steps // report_every) + 1
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base_json=base.model_dump_json(),
            space_path=str(Path(space_path).resolve()),
            data=data,
            report_every=report_every,
        ),
        tune.PlacementGroupFactory([{"CPU": cpus_per_trial}] + [part_bundle] * base.parts),
    )
    path = storage.resolve() / name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume: no Tune study to restore at {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="test_bpd",
                mode="min",
                scheduler=ASHAScheduler(max_t=max_reports, grace_period=1, reduction_factor=2),
                num_samples=1 if getattr(space, "GRID", False) else trials,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage.resolve())),
        )
    return tuner.fit()


def ranked_table(results: Any, parts: int) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table of the trials, best first, and the rows behind it."""
    rows = []
    for r in results:
        m = r.metrics or {}
        if "test_bpd" not in m:
            continue
        rows.append(
            {
                "lrs": [m.get(f"lr_{k + 1}") for k in range(parts)],
                "test_bpd": m["test_bpd"],
                "diverged": bool(m.get("diverged")),
                "rollbacks": m.get("rollbacks"),
                "steps": m.get("steps"),
                "time_s": m.get("time_total_s", 0.0),
                "stopped_early": not m.get("finished"),
            }
        )
    rows.sort(key=lambda r: r["test_bpd"])
    lines = [
        "| rank | "
        + " | ".join(f"LR part {k + 1}" for k in range(parts))
        + " | test BPD | diverged | rollbacks | steps | time (s) | stopped by ASHA |",
        "|---" * (parts + 7) + "|",
    ]
    for i, r in enumerate(rows, 1):
        lrs = " | ".join(f"{v:.3g}" if v else "-" for v in r["lrs"])
        lines.append(
            f"| {i} | {lrs} | {r['test_bpd']:.4f} | {'yes' if r['diverged'] else 'no'} | {r['rollbacks']} "
            f"| {r['steps']} | {r['time_s']:.0f} | {'yes' if r['stopped_early'] else 'no'} |"
        )
    return "\n".join(lines), rows


def write_best_config(base: RunConfig, best: dict[str, Any], path: Path) -> RunConfig:
    """The best trial as a config file that ``run_async.py --config`` accepts unchanged."""
    config = base.model_copy(
        update={"lr": [float(v) for v in best["lrs"]], "schedule": "async", "run_name": None, "resume": False}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_config_file(config, path)
    return config
