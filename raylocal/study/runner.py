"""Running a study: every arm over every seed, resumable, and the record each run leaves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylocal.core.config import data_source, load_config_file, validate_config
from raylocal.errors import ConfigError, RaylocalError
from raylocal.run.launch import Loaded, load_data
from raylocal.study.compare import changed_settings, run_config
from raylocal.study.spec import EQUAL_TIME_OF, Study
from raylocal.tune import cli as tune_lr
from raylocal.tune.tuning import SpaceSource, read_space


@dataclass
class StudyInputs:
    """What the study's runs read from files, read before its first run joins Ray:
    under `ray job submit` the job's working directory (the bundled images,
    tune_spaces/) can be gone from then on."""

    images: Loaded
    spaces: dict[str, SpaceSource]  # the search space of each arm still to tune


def read_inputs(study: Study, storage: Path, train: Study | None) -> StudyInputs:
    """The images of every arm ``train`` trains, and the search space and the
    trials' images of every arm still to tune (a missing one fails here, before
    anything trained)."""
    inputs = StudyInputs({}, {})
    for arm in train.arms if train is not None else []:
        values = {k: v for k, v in {**study.base, **own_settings(study, arm)}.items() if k != EQUAL_TIME_OF}
        configs = [validate_config(values, f"{study.name}/{arm}")]
        spec = study.arms[arm].get("tune_lr")
        if spec is not None and not (storage / study.name / f"tune-{arm}" / "best.json").is_file():
            inputs.spaces[arm] = read_space(spec["space"])
            # the trials' images: the training images less those held out for them
            configs.append(validate_config(tune_values(study, arm, storage), f"{study.name}/tune-{arm}"))
        for config in configs:
            inputs.images[data_source(config)] = load_data(config, inputs.images)
    return inputs


def own_settings(study: Study, arm: str) -> dict[str, Any]:
    """The settings the arm sets over the study's base, without its Tune study (``tune_lr``)."""
    return {k: v for k, v in study.arms[arm].items() if k != "tune_lr"}


def tune_values(study: Study, arm: str, storage: Path) -> dict[str, Any]:
    """The config of a tuned arm's trials (see ``tuned``)."""
    spec = study.arms[arm]["tune_lr"]
    values = {**study.base, **own_settings(study, arm), "schedule": "async", "queue_size": 1, "finetune_epochs": 0}
    return values | {"seed": spec["seed"], "validation": spec["validation"], "storage_path": str(storage / study.name)}


def tuned(study: Study, arm: str, storage: Path, spaces: dict[str, SpaceSource], images: Loaded) -> dict[str, Any]:
    """The arm's overrides. An arm with ``tune_lr`` ({"space", "trials", "seed",
    "validation", "report_every"}) takes its per-part LRs from a Ray Tune study of its own (ASHA,
    scripts/tune_lr.py): its trials are the lockstep async twin of the
    simultaneous schedule (queue 1) with no fine-tune, at a seed of their own, and
    are evaluated on the last ``validation`` training images, held out from them,
    so that the LRs are not chosen on the test set. It runs once, on a copy of its
    space as ``spaces`` holds it (read before the study's first run), written
    beside its study; its best.json is read back after."""
    overrides = own_settings(study, arm)
    spec = study.arms[arm].get("tune_lr")
    if spec is None:
        return overrides
    root = storage / study.name
    best = root / f"tune-{arm}" / "best.json"
    if not best.is_file():
        values = tune_values(study, arm, storage)
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / f"tune-{arm}.json"
        config_path.write_text(json.dumps(values, indent=1) + "\n")
        space = root / f"tune-{arm}-space.py"
        space.write_text((spaces.get(arm) or read_space(spec["space"])).text)
        argv = ["--config", str(config_path), "--space", str(space), "--trials", str(spec["trials"])]
        argv += ["--report-every", str(spec["report_every"]), "--study", f"tune-{arm}"]
        print(f"tuning {study.name}/{arm}: python scripts/tune_lr.py {' '.join(argv)}", flush=True)
        if tune_lr.main(argv, loaded=images) != 0:
            raise RaylocalError(f"the Tune study of arm {arm!r} failed (see {root / f'tune-{arm}'})")
    return overrides | {"lr": load_config_file(best).schedule.lr}


def run_study(
    study: Study, storage: Path, published: dict[str, dict[int, dict]], train: Study | None = None
) -> dict[str, dict[int, dict]]:
    """Every arm over every seed: {arm: {seed: record}}. A run finished under
    ``storage`` is read back; else one that ``published`` holds (the study's
    results.json: what was run elsewhere, or before this machine's storage was
    lost) for the same settings; else it is trained if ``train`` (the study,
    or a narrowing of it) has its arm and seed, and left out otherwise (and
    not tuned)."""
    inputs = read_inputs(study, storage, train)
    runs: dict[str, dict[int, dict]] = {}
    for seed in study.seeds:  # seed-major: a stopped study has whole pairs to compare
        for arm in arm_order(study, seed):
            name = study.run_name(arm, seed)
            arm_values = planned(study, arm, seed, runs)
            if arm_values is None:  # planned for a run of this seed that is not there
                continue
            values = {**study.base, **arm_values, "seed": seed}
            if not (storage / study.name / name / "summary.json").is_file():
                old = published.get(arm, {}).get(seed)
                if old is not None:
                    _check_published(study, name, old, values)
                    runs.setdefault(arm, {})[seed] = old
                    continue
                if train is None or arm not in train.arms or seed not in train.seeds:
                    continue
            overrides = tuned(study, arm, storage, inputs.spaces, inputs.images)
            if overrides.pop(EQUAL_TIME_OF, None) is not None:
                overrides["epochs"] = arm_values["epochs"]
            path = Path(f"{study.name}/{arm}")
            summary = run_config(
                path,
                {**study.base, **overrides, "seed": seed, "run_name": name},
                str(storage / study.name),
                rerun=False,
                loaded=inputs.images,
            )
            runs.setdefault(arm, {})[seed] = record(summary, values)
    return runs


def arm_order(study: Study, seed: int) -> list[str]:
    """The order a seed's arms run in: rotated by one place from seed to seed, so that
    no arm always runs first (on a fresh, cool machine) or last; an arm planned for
    another arm's time runs after the arms it needs."""
    timed = [a for a in study.arms if EQUAL_TIME_OF in study.arms[a]]
    free = [a for a in study.arms if a not in timed]
    turn = study.seeds.index(seed) % len(free) if seed in study.seeds else 0
    return free[turn:] + free[:turn] + timed


def planned(study: Study, arm: str, seed: int, runs: dict[str, dict[int, dict]]) -> dict[str, Any] | None:
    """The arm's settings for this seed. An arm planned for another arm's time
    gets the epochs that the seed's e2e (the baseline) would train in that
    time, at the baseline's own epoch time (None while either run is missing)."""
    values = dict(study.arms[arm])
    other = values.get(EQUAL_TIME_OF)
    if other is None:
        return values
    timed, base = runs.get(other, {}).get(seed), runs.get(study.baseline, {}).get(seed)
    if timed is None or base is None:
        return None
    epoch_s = base["wall_time"] / (base["values"].get("epochs") or 1)
    return values | {"epochs": max(1, round(timed["wall_time"] / epoch_s))}


def _check_published(study: Study, name: str, old: dict, values: dict) -> None:
    """A published run stands for this one only if the study asked it for the same settings."""
    shown = changed_settings(old["values"], json.loads(json.dumps(values)))  # as results.json holds them
    if shown:
        raise ConfigError(f"{study.name}/{name} was published with other settings ({shown}); give another --out")


def record(summary: dict, values: dict[str, Any]) -> dict[str, Any]:
    """What a study keeps of a finished run, in its results.json: the settings the
    study asked for (before a Tune study chose the LRs) and every number its
    comparisons read, the test curve included, so that the run can be paired again
    without its run directory."""
    return {
        "values": values,
        "test_bpd": summary["test_bpd"],
        "after_parts": parts_phase_bpd(summary),
        "wall_time": summary["wall_time"],
        "cpu_time": sum(summary.get("phase_cpu", {}).values()) or None,  # this process's, all threads
        "parallel_epochs": parallel_epochs(summary),
        "rollbacks": summary["rollbacks"],
        "part_lrs": summary.get("part_lrs"),
        "staleness": staleness(summary),
        "curve": [
            {"epoch": c["epoch"], "elapsed": c["elapsed"], "test_bpd": c["test_bpd"]}
            for c in summary["curve"]
            if "live_images" not in c  # an async run's live evaluations on a subset
        ],
    }


def _read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or "rows" not in results:
            raise ValueError("no rows")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a study's results.json ({str(e).splitlines()[0]})") from None
    return results


def published_runs(path: Path) -> dict[str, dict[int, dict]]:
    """The runs a study's results.json holds: {arm: {seed: record}} ({} where there is none)."""
    if not path.is_file():
        return {}
    runs = _read_results(path).get("runs", {})
    return {arm: {int(seed): r for seed, r in per_seed.items()} for arm, per_seed in runs.items()}


def parts_phase_bpd(summary: dict) -> float:
    """Test BPD when the parts phase ended (the final one for a run without parts)."""
    entries = [h for h in summary["history"] if h["phase"] == "parts"]
    return entries[-1]["test_bpd"] if entries else summary["test_bpd"]


def parallel_epochs(summary: dict) -> float | None:
    """How long a simultaneous run would take with its parts in parallel, one
    device each, in epochs of its own single-process time: its parts-phase epochs
    scaled by the slowest part's share of the parts' compute, plus its fine-tune
    epochs (communication not counted). In epochs rather than seconds because the
    share is a ratio of times measured together, so it holds when the host's
    speed changes between runs, and e2e does the same work per epoch. None for
    other schedules (an async run's parts already ran in parallel)."""
    part_time = summary.get("part_time")
    if summary.get("schedule") != "simultaneous" or not part_time or sum(part_time) <= 0:
        return None
    return summary["epochs"] * max(part_time) / sum(part_time) + summary["finetune_epochs"]


def bpd_at_epochs(run: dict, epochs: float) -> float:
    """A run's test BPD after a fractional number of epochs (linear between its evaluations)."""
    curve = run["curve"]
    return float(np.interp(epochs, [c["epoch"] for c in curve], [c["test_bpd"] for c in curve]))


def bpd_at_epoch(run: dict, epoch: float) -> float:
    """A run's test BPD after ``epoch`` epochs (its evaluation at that epoch)."""
    points = [c for c in run["curve"] if abs(c["epoch"] - epoch) < 1e-9]
    if not points:
        raise ConfigError(f"the baseline of seed {run['values'].get('seed', '?')} has no evaluation at epoch {epoch:g}")
    return points[-1]["test_bpd"]


def staleness(summary: dict) -> float | None:
    """An async run's measured staleness: mean upstream steps behind, averaged
    over its boundaries (None for a run that had no link between parts)."""
    behind = summary.get("behind_steps")
    return sum(b["mean"] for b in behind) / len(behind) if behind else None
