"""Ray Tune: search per-part learning rates of the async trainer for stability.

Each trial is a whole parts run. Its K part actors are reserved for it in one
placement group together with the trial itself
(``PlacementGroupFactory([{trial}] + [{part}] * K)``), so concurrent trials
never starve each other. While the parts train, the trial gathers their
weights every ``report_every`` steps, evaluates the assembled model's test BPD
and reports it; ASHA stops the weak trials early. With ``scheduler="pbt"`` (Population Based
Training) every report also carries the parts' checkpoints, and PBT restarts a
weak trial from a strong trial's parts with perturbed per-part LRs: the trial
then continues the stream from that step, Adam moments included, so the LRs
become a schedule found during training. A trial that diverges
(non-finite BPD, or a part beyond its rollback budget) reports it and stops:
it never crashes the study.

Search spaces live in ``tune_spaces/<name>.py``: ``space(parts) -> dict`` (a
Tune param space, which may refuse a part count) and ``lrs(params, parts) ->
list[float]``; ``GRID = True`` marks a grid (each point once).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from ray.tune.schedulers import PopulationBasedTraining

from raylocal.cluster.parts_phase import gather_part_states, gather_weights, part_checkpoint_path
from raylocal.cluster.placement import TrialGroup, live_nodes, trial_shares
from raylocal.core.checkpoint import load_checkpoint, save_checkpoint
from raylocal.core.config import RaylocalConfig, data_source, write_config_file
from raylocal.core.data import DataSource, ImageData
from raylocal.core.runlog import CHECKPOINT
from raylocal.errors import ConfigError, DivergedError
from raylocal.run.run import Run
from raylocal.training.schedules import PARTS_RESULT

DIVERGED_BPD = 1e3  # what a diverged trial reports as its BPD: worse than any real model
SCHEDULERS = ("asha", "pbt")
DONE = "done"  # Tune's key of a result that ends its trial (ray.tune.result.DONE)


@dataclass(frozen=True)
class SpaceSource:
    """A search space's file, read once, before the driver joins Ray: the driver
    and the trials build the space from this text, never from the file again
    (under `ray job submit` the job's working directory can be gone by then)."""

    path: str  # (for messages and the module's name)
    text: str


def read_space(path: str | Path) -> SpaceSource:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: tune space does not exist (see tune_spaces/)")
    if path.suffix != ".py":
        raise ConfigError(f"{path}: a tune space is a Python file (.py), see tune_spaces/")
    return SpaceSource(str(path), path.read_text())


def space_module(source: SpaceSource, parts: int) -> ModuleType:
    """The search space as a module, checked against the part count."""
    module = ModuleType(f"tune_space_{Path(source.path).stem}")
    module.__file__ = source.path
    try:
        exec(compile(source.text, source.path, "exec"), module.__dict__)
    except Exception as e:
        raise ConfigError(f"{source.path}: cannot import tune space ({type(e).__name__}: {e})") from None
    for name in ("space", "lrs"):
        if not callable(getattr(module, name, None)):
            raise ConfigError(
                f"{source.path}: a tune space defines space(parts) and lrs(params, parts); {name} is missing"
            )
    try:
        module.space(parts)  # may raise ConfigError for a part count it does not support
    except ConfigError:
        raise
    except Exception as e:  # a space that cannot be built fails here, in one line, before Ray starts
        raise ConfigError(f"{source.path}: space({parts}) failed ({type(e).__name__}: {e})") from None
    return module


def load_space(path: str | Path, parts: int) -> ModuleType:
    """Import a search space file and check it against the part count."""
    return space_module(read_space(path), parts)


def check_study(space: SpaceSource, parts: int, scheduler: str, schedule: str = "async") -> ModuleType:
    """The space module, once the space, the scheduler and the run's schedule are known to fit together."""
    if schedule != "async":  # a trial is an async parts run, reporting as its parts train
        raise ConfigError(f"schedule={schedule!r}: Tune's trials are async parts runs; give --schedule async")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    module = space_module(space, parts)
    if scheduler == "pbt" and getattr(module, "GRID", False):
        raise ConfigError(f"{space.path}: PBT perturbs LRs drawn from distributions; a grid space cannot be used")
    return module


def study_trials(param_space: Any, samples: int) -> int:
    """How many trials a study runs: ``samples`` of each point of the space's grids
    (Tune crosses every ``grid_search`` with every other, and with the samples)."""
    if isinstance(param_space, dict):
        if set(param_space) == {"grid_search"}:
            return len(param_space["grid_search"]) * samples
        points = 1
        for value in param_space.values():
            points *= study_trials(value, 1)
        return points * samples
    return samples


def trial_lrs(space: ModuleType, params: dict[str, Any], parts: int) -> list[float]:
    values = space.lrs(params, parts)
    if len(values) != parts or not all(v > 0 for v in values):
        raise ConfigError(f"tune space gave learning rates {values} for {parts} parts")
    return [float(v) for v in values]


# Beside a trial's part checkpoints in a Tune checkpoint: the trial that wrote them. Where a checkpoint
# lies is Tune's storage layout's to choose; whose parts it holds is the trial's to say.
ORIGIN = "origin.json"
# A trial's own record of its reports, in its directory: Tune's result.json there can lose the rows from
# before a PBT restore (the restored trial's log starts anew when Tune's copy in storage lags behind).
REPORTS = "reports.jsonl"


def restore_parts(checkpoint_dir: Path, run_dir: Path, lrs: list[float]) -> tuple[int, str]:
    """Put the part checkpoints of a Tune checkpoint where the async trainer
    resumes from, with this trial's LRs (PBT's explore step changed them);
    returns the step the last part continues from, and the trial whose parts
    they are (a checkpoint of an older version, without ``ORIGIN``: the trial
    directory it lies in)."""
    step = 0
    for k, lr in enumerate(lrs):
        state = load_checkpoint(part_checkpoint_path(checkpoint_dir, k), kind="part")
        state["trainer"]["base_lr"] = lr
        save_checkpoint(part_checkpoint_path(run_dir, k), state, kind="part")
        step = int(state["step"])
    origin = checkpoint_dir / ORIGIN
    trial = json.loads(origin.read_text()).get("trial") if origin.is_file() else None
    return step, trial or checkpoint_dir.resolve().parent.name


class TrialReporter:
    """A Tune trial's reports, as the parts phase's monitor: every ``report_every``
    steps of the last part, the assembled model's test BPD (with ``checkpoints``,
    for PBT, every part's state with it); a non-finite BPD reports the trial as
    diverged and stops it."""

    def __init__(
        self, test: torch.Tensor, lrs: list[float], every: int, checkpoints: bool, trial_dir: Path | None = None
    ) -> None:
        self.test, self.lrs = test, lrs
        self.trial_dir = trial_dir  # where its reports are recorded; its name is what its checkpoints name
        self.recorded = read_reports(trial_dir) if trial_dir is not None else []  # earlier attempts' too
        self.service: Any = None
        self.bounds: list[tuple[int, int]] = []
        self.every, self.checkpoints = every, checkpoints
        self.resumed_at, self.restored_from = 0, ""
        self.next_report = every
        self.last_polled: list[dict[str, Any]] = []
        self.reported_divergence = False

    def watch(self, service: Any, plan: dict[str, Any]) -> TrialReporter:
        """This reporter as the run's monitor (a ``MonitorFactory``): it evaluates
        with the run's model service (an actor handle, or ``InProcess``)."""
        self.service, self.bounds = service, [tuple(b) for b in plan["bounds"]]
        return self

    def resume_from(self, step: int, trial: str) -> None:
        """Continue from ``trial``'s parts (this trial's own, or another's that PBT copied) at ``step``."""
        self.resumed_at, self.restored_from = step, trial
        self.next_report = step + self.every

    def row(self, bpd: float, polled: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        diverged = not math.isfinite(bpd)
        out = {
            "test_bpd": DIVERGED_BPD if diverged else bpd,
            "diverged": int(diverged),
            "rollbacks": sum(p.get("rollbacks", 0) for p in polled),
            "steps": polled[-1]["steps"] if polled else 0,
            "resumed_at": self.resumed_at,
            "restored_from": self.restored_from,
            "finished": int(done),
        }
        if done:  # Tune stops a trial on its "done" result: PBT cannot pause a finished trial and rerun its end
            out[DONE] = True
        return out | {f"lr_{k + 1}": lr for k, lr in enumerate(self.lrs)}

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        """Report to Tune, and record the report in the trial's own directory."""
        from ray import tune

        self.recorded.append(metrics)
        self.keep_record()
        tune.report(metrics, checkpoint=checkpoint)

    def keep_record(self) -> None:
        """Write the trial's reports, every attempt's, in its directory (again after a run
        that failed before its first checkpoint removed the directory)."""
        if self.trial_dir is not None:
            self.trial_dir.mkdir(parents=True, exist_ok=True)
            (self.trial_dir / REPORTS).write_text("".join(json.dumps(row) + "\n" for row in self.recorded))

    def metrics(self, state: dict[str, torch.Tensor], polled: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        import ray

        return self.row(ray.get(self.service.evaluate.remote(self.test, state)), polled, done)

    def __call__(self, actors: list[Any], polled: list[dict[str, Any]]) -> None:
        import ray
        from ray import tune

        self.last_polled[:] = polled
        if polled[-1]["steps"] < self.next_report:
            return
        self.next_report += self.every
        if not self.checkpoints:
            m = self.metrics(gather_weights(actors), polled, done=False)
            self.report(m)
        else:  # evaluate exactly the checkpointed parts: PBT copies what it ranked
            states = gather_part_states(actors)
            bpd = ray.get(self.service.evaluate_parts.remote(self.test, self.bounds, states))
            m = self.row(bpd, polled, done=False)
            m["steps"] = int(states[-1]["step"])
            with tempfile.TemporaryDirectory() as tmp:
                for k, state in enumerate(states):
                    save_checkpoint(part_checkpoint_path(Path(tmp), k), state, kind="part")
                origin = {"trial": self.trial_dir.name if self.trial_dir else "", "step": m["steps"]}
                (Path(tmp) / ORIGIN).write_text(json.dumps(origin))
                self.report(m, checkpoint=tune.Checkpoint.from_directory(tmp))
        if m["diverged"]:
            self.reported_divergence = True
            raise DivergedError(f"assembled model's BPD is not finite at step {m['steps']}")

    def report_divergence(self, error: DivergedError) -> None:
        """The trial's last report, once: its parts diverged beyond their rollbacks
        (unreported), or this reporter's own evaluation did (reported already)."""
        if not self.reported_divergence:
            self.report(self.row(math.nan, self.last_polled, done=True) | {"error": str(error)[:200]})
            self.reported_divergence = True
        else:  # reported as it was found, before the run failed and removed a directory without a checkpoint
            self.keep_record()


# What a trial's run leaves once it has finished: a trial that Tune starts again in
# the same directory (PBT taking it over, a restored study) trains its parts anew
FINISHED_FILES = (PARTS_RESULT, CHECKPOINT, "pipeline.json", "summary.json")


def clear_finish(trial_dir: Path) -> None:
    """Remove what an earlier attempt of this trial finished, so that its run
    neither skips its parts nor resumes a fine-tune from them."""
    for name in FINISHED_FILES:
        (trial_dir / name).unlink(missing_ok=True)


def run_trial(
    params: dict[str, Any],
    base_json: str,
    space: SpaceSource,
    data: ImageData | DataSource,
    report_every: int,
    checkpoints: bool,
) -> None:
    """One Tune trial: a whole async parts run (``Run``, in the trial's directory,
    its model service in the trial's own process), reporting test BPD as it goes
    (see ``TrialReporter``). ``data`` is the driver's, or with ``--images-from
    node`` what the trial's node loads (its parts then load their own too)."""
    from ray import tune

    base = RaylocalConfig.model_validate_json(base_json)
    data = data.load() if isinstance(data, DataSource) else data
    lrs = trial_lrs(space_module(space, base.part_count()), params, base.part_count())
    # the trial's run on the study's storage (which every node must reach), beside Tune's own files:
    # get_trial_dir() is a staging directory on the trial's node, where a part on another node
    # would find no checkpoint to resume from
    context = tune.get_context()
    trial_dir = Path(base.run.storage_path) / context.get_experiment_name() / Path(context.get_trial_dir()).name
    reporter = TrialReporter(data.test, lrs, report_every, checkpoints, trial_dir)
    clear_finish(trial_dir)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # PBT restarted this trial from its own or another trial's parts
        with checkpoint.as_directory() as d:
            reporter.resume_from(*restore_parts(Path(d), trial_dir, lrs))
    trial = {"lr": lrs, "progress": False, "resume": checkpoint is not None, "finetune_epochs": 0, "samples": 0}
    config = base.replace(**(trial | {"storage_path": str(trial_dir.parent), "run_name": trial_dir.name}))
    run = Run(config, data, service_here=True, monitor=reporter.watch)
    try:
        summary = run.execute()
    except DivergedError as e:  # reported once, so that the study ranks it; any other failure fails the trial
        reporter.report_divergence(e)
        return
    polled = [{"rollbacks": st["rollbacks"], "steps": st["steps"]} for st in run.carry.parts.stats]
    reporter.report(reporter.row(summary["test_bpd"], polled, done=True))


# What a study is started with, kept beside Tune's files: --resume rebuilds each
# trial from the flags it is given, so it must be given the same ones
STUDY_SETTINGS = "raylocal-study.json"
# the flags that say where the cluster, the study and a cache are, or how it prints, and the
# parts' shares (kept as resolved on the cluster: tune_study); every other flag shapes the
# trials or best.json (which keeps the fine-tune the trials skip)
NOT_KEPT = ("address", "storage_path", "run_name", "resume", "progress", "cache_dir", "cpus_per_part", "gpus_per_part")


def study_settings(base: RaylocalConfig, space: SpaceSource, scheduler: str, options: dict[str, Any]) -> dict:
    """Everything that shapes a study: the run's flags (its data by absolute path),
    the space's text, the scheduler and the study's own options (trials, report
    interval, ...); ``tune_study`` adds the parts' shares it resolved on the cluster."""
    flags = {k: v for k, v in base.flat(mode="json").items() if k not in NOT_KEPT}
    if flags.get("data_root"):
        flags["data_root"] = str(Path(flags["data_root"]).resolve())
    return {"flags": flags, "space": space.text, "scheduler": scheduler, **options}


def _kept(study: Path) -> dict[str, Any]:
    """The settings a study was started with, as ``tune_study`` kept them."""
    kept = study / STUDY_SETTINGS
    if not kept.is_file():
        raise ConfigError(f"--resume: {study} has no {STUDY_SETTINGS}: it was started by an older version; start anew")
    try:
        settings = json.loads(kept.read_text())
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict) or not isinstance(settings.get("flags"), dict) or "shares" not in settings:
        raise ConfigError(f"--resume: {kept} cannot be read as this version's study settings; start anew")
    return settings


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "flags"} | settings.get("flags", {})


def check_resumable(study: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """``--resume`` continues a study only with the flags it was started with
    (another scheduler, report interval or model would change its trials midway);
    checked before Ray starts. Returns the settings it was started with, for
    ``tune_study`` to check the shares against the cluster's."""
    from ray import tune

    if not tune.Tuner.can_restore(str(study)):
        raise ConfigError(f"--resume: no Tune study to restore at {study}")
    kept = _kept(study)
    then, now = _flat(kept), _flat(json.loads(json.dumps(settings)))  # (tuples as lists)
    differ = [k for k in now if then.get(k) != now[k]]
    if differ:
        shown = "; ".join(
            f"--{k.replace('_', '-')} "
            + ("its text differs" if k == "space" else f"{then.get(k)!r} then, {now[k]!r} now")
            for k in differ[:3]
        )
        raise ConfigError(f"--resume: the study at {study} was started with other settings ({shown}); "
                          "give the flags it was started with")  # fmt: skip
    return kept


def _trainable(
    base: RaylocalConfig,
    data: ImageData,
    space: SpaceSource,
    report_every: int,
    checkpoints: bool,
    cpus_per_trial: float | None,
) -> Any:
    """``run_trial`` with the study's fixed arguments, reserving each trial's
    part actors in its placement group."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(
            run_trial,
            base_json=base.model_dump_json(),
            space=space,
            data=data if base.data.images_from == "driver" else data_source(base),
            report_every=report_every,
            checkpoints=checkpoints,
        ),
        TrialGroup.plan(base, cpus_per_trial).factory(),
    )


def tune_study(
    base: RaylocalConfig,
    data: ImageData,
    space: SpaceSource,
    trials: int,
    report_every: int,
    storage: Path,
    name: str,
    resumed: dict[str, Any] | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float | None = None,
    scheduler: str = "asha",
    pbt_interval: int = 2,
    *,
    settings: dict[str, Any],
) -> Any:
    """Run (or continue) a study; returns Tune's ResultGrid. ``scheduler`` is
    ``asha`` (stop weak trials early) or ``pbt`` (weak trials continue from
    strong ones' parts with perturbed LRs every ``pbt_interval`` reports).
    ``settings`` (``study_settings``) are kept beside a new study, for ``--resume``;
    ``resumed``, those a study to continue was started with (``check_resumable``)."""
    from ray import tune

    module = check_study(space, base.part_count(), scheduler, base.schedule.name)
    param_space = module.space(base.part_count())
    nodes = live_nodes()
    samples = 1 if getattr(module, "GRID", False) else trials
    shares = trial_shares(base, nodes, max_concurrent or study_trials(param_space, samples), cpus_per_trial)
    base = base.replace(**(shares | {"storage_path": str(storage.resolve())}))  # (a trial's cwd is its own)
    n_steps = base.schedule.epochs * (len(data.train) // base.schedule.batch_size)  # each part's, the last's reported
    TrialGroup.plan(base, cpus_per_trial).check(nodes)
    trainable = _trainable(base, data, space, report_every, scheduler == "pbt", cpus_per_trial)
    path = storage.resolve() / name
    if resumed is not None:  # (its flags checked before Ray started: check_resumable)
        kept = resumed.get("shares")
        if kept != shares:  # a default share comes from the cluster, which may differ now
            raise ConfigError(f"--resume: the study's parts had {kept}, this cluster gives them {shares}; "
                              "give them with --cpus-per-part and --gpus-per-part")  # fmt: skip
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / STUDY_SETTINGS).write_text(json.dumps(settings | {"shares": shares}, indent=1) + "\n")
        chosen, keep = _scheduler(scheduler, param_space, trials, pbt_interval * report_every, report_every, n_steps)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="test_bpd",
                mode="min",
                scheduler=chosen,
                num_samples=samples,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage.resolve()), checkpoint_config=keep),
        )
    return tuner.fit()


class SynchronousPBT(PopulationBasedTraining):
    """Tune's synchronous PBT, whose barrier no trial that ends can strand. Tune checks
    the barrier only when a trial reports: a trial whose last report ends it (done)
    before the next perturbation step left the trials paused at that step waiting for
    it for ever (ray 2.x). Once every trial still live has reached the barrier, it
    moves on, as it would have had the ended trial reported there."""

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._release(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, trial)
        self._release(tune_controller, trial)

    def _release(self, tune_controller: Any, ended: Any) -> None:
        live = [self._trial_state[t] for t in tune_controller.get_live_trials() if t is not ended]
        if live and all(state.last_train_time >= self._next_perturbation_sync for state in live):
            self._next_perturbation_sync = max(state.last_train_time for state in live) + self._perturbation_interval


def _scheduler(
    name: str, param_space: dict, trials: int, pbt_steps: int, report_every: int, n_steps: int
) -> tuple[Any, Any]:
    """Tune's trial scheduler and the checkpoints each trial keeps. Time is the
    last part's step, which a restored trial continues from: trials are compared
    at the same step, not at their n-th report (a slow poll reports late)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if name != "pbt":
        grace = min(report_every, n_steps)
        return ASHAScheduler(
            time_attr="steps", max_t=max(n_steps, 1), grace_period=max(grace, 1), reduction_factor=2
        ), None
    # Synchronous: every trial reaches the perturbation step before the weak
    # ones copy the strong ones, so a study does not depend on which trial
    # happened to run faster.
    pbt = SynchronousPBT(
        time_attr="steps",
        perturbation_interval=pbt_steps,
        hyperparam_mutations=param_space,
        quantile_fraction=0.5 if trials < 4 else 0.25,
        synch=True,
    )
    return pbt, tune.CheckpointConfig(num_to_keep=4)  # PBT may copy a trial's older checkpoints


def read_reports(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's own record of its reports (``REPORTS``), oldest first; a line cut
    short (a trial killed while writing it) is left out."""
    path = trial_dir / REPORTS
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def last_report(trial_dir: Path) -> dict[str, Any] | None:
    """A trial's last report, from its own record; None without one."""
    rows = read_reports(trial_dir)
    return rows[-1] if rows else None


def ranked_table(results: Any, parts: int) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table of the trials, best first, and the rows behind it: each trial's last report
    from its own record (Tune's last result for a trial without one), its time from Tune."""
    rows = []
    for r in results:
        m = last_report(Path(r.path)) or r.metrics or {}
        if "test_bpd" not in m:
            continue
        rows.append(
            {
                "lrs": [m.get(f"lr_{k + 1}") for k in range(parts)],
                "test_bpd": m["test_bpd"],
                "diverged": bool(m.get("diverged")),
                "rollbacks": m.get("rollbacks"),
                "steps": m.get("steps"),
                "time_s": (r.metrics or {}).get("time_total_s", 0.0),
                "stopped_early": not m.get("finished"),
            }
        )
    rows.sort(key=lambda r: r["test_bpd"])
    lines = [
        "| rank | "
        + " | ".join(f"LR part {k + 1}" for k in range(parts))
        + " | test BPD | diverged | rollbacks | steps | time (s) | stopped early |",
        "|---" * (parts + 7) + "|",
    ]
    for i, r in enumerate(rows, 1):
        lrs = " | ".join(f"{v:.3g}" if v else "-" for v in r["lrs"])
        lines.append(
            f"| {i} | {lrs} | {r['test_bpd']:.4f} | {'yes' if r['diverged'] else 'no'} | {r['rollbacks']} "
            f"| {r['steps']} | {r['time_s']:.0f} | {'yes' if r['stopped_early'] else 'no'} |"
        )
    return "\n".join(lines), rows


def write_best_config(base: RaylocalConfig, best: dict[str, Any], path: Path) -> RaylocalConfig:
    """The best trial as a config file that ``run_async.py --config`` accepts unchanged."""
    config = base.replace(lr=[float(v) for v in best["lrs"]], schedule="async", run_name=None, resume=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_config_file(config, path)
    return config
