"""The end of a run trained elsewhere, in this process: after the Ray parts
(``finish_after_parts``: the fine-tune and the run's end) or after a rival
(``finish_trained_elsewhere``: the run's end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.model.parts import PartSpec
from raylocal.run.phases import Finetuned, TrainedElsewhere
from raylocal.training.records import RunRecords
from raylocal.training.schedules import PARTS_RESULT, PartsResult, SingleProcessRun


def take_over(run: SingleProcessRun, parts: PartsResult) -> None:
    """Continue after a parts phase trained elsewhere (the Ray parts): take its
    assembled weights, timings and evaluations; its fine-tune and end follow."""
    stats = parts.stats
    run.glow.load_state_dict(parts.state)
    run.stream.restore({"epoch": len(run.plan), "position": 0})
    run.state.elapsed = parts.wall
    run.state.phase_time["parts"] = parts.wall
    run.state.part_time = [st["compute_s"] for st in stats]
    run.state.global_step = int(stats[0]["steps"])
    run.adopted = True
    for point in parts.curve:  # evaluations made while the parts trained
        run.records.evaluation(point["test_bpd"], run.state.curve, point)
    bpd = run.record_eval(float(len(run.plan)))
    run.state.history.append(
        {
            "epoch": len(run.plan),
            "phase": "parts",
            "active": [k + 1 for k in range(len(run.parts))],
            "test_bpd": bpd,
            "local_loss": {
                str(k + 1): sum(st["losses"][-50:]) / max(len(st["losses"][-50:]), 1) for k, st in enumerate(stats)
            },
            "epoch_time": parts.wall / max(len(run.plan), 1),
            "elapsed": parts.wall,
            "rollbacks": run.part_figures("rollbacks"),
        }
    )


def adopt_finetune(
    run: SingleProcessRun, state: dict[str, Tensor], seconds: float, history: list[dict[str, Any]]
) -> None:
    """Take a fine-tune phase trained elsewhere (DDP on Ray Train workers)."""
    adopt_trained(run, state, seconds, history, "finetune", len(run.plan), float(run.total_epochs))


def adopt_trained(
    run: SingleProcessRun,
    state: dict[str, Tensor],
    seconds: float,
    history: list[dict[str, Any]],
    phase: str,
    first_epoch: int,
    at_epoch: float,
) -> None:
    """Take the weights, seconds and per-epoch history of training done elsewhere,
    as the run's ``phase``: its epochs from ``first_epoch`` on, the evaluation of
    its weights at epoch ``at_epoch`` (where a time budget stopped it)."""
    run.glow.load_state_dict(state)
    run.adopted = True
    run.stream.restore({"epoch": run.total_epochs, "position": 0})
    run.state.elapsed += seconds
    run.state.phase_time[phase] = run.state.phase_time.get(phase, 0.0) + seconds
    for i, h in enumerate(history):
        run.state.history.append(
            {
                "epoch": first_epoch + i + 1,
                "phase": phase,
                "active": [],
                "test_bpd": float("nan"),
                "local_loss": {phase: h.get("loss", float("nan"))},
                "epoch_time": h.get("epoch_time", float("nan")),
                "elapsed": run.state.elapsed,
                "rollbacks": run.part_figures("rollbacks"),
                "ddp_images_per_s": h.get("images_per_s", float("nan")),  # the only ones with a history
            }
        )
    bpd = run.record_eval(at_epoch)
    if run.state.history:
        run.state.history[-1]["test_bpd"] = bpd


def finish_trained_elsewhere(
    config: RaylocalConfig, data: ImageData, run_dir: Path, trained: TrainedElsewhere
) -> dict[str, Any]:
    """The rest of a run trained end to end elsewhere (a rival on Ray): the
    evaluation, samples, checkpoint (of the whole model, as e2e's) and summary,
    in this process. The summary is returned, for the run to write once."""
    whole = config.replace(schedule="e2e", parts=1, part_spec=None, lr=config.schedule.lr[:1])
    run = SingleProcessRun(whole, data, RunRecords(whole, data.test, run_dir), parts_elsewhere=True)
    run.recorded_config = config
    run.state.global_step = trained.steps
    at_epoch = trained.steps / max(len(run.stream), 1)
    adopt_trained(run, trained.state, trained.seconds, trained.history, config.schedule.name, 0, at_epoch)
    summary = run.finish() | {"schedule": config.schedule.name}
    if trained.steps < config.schedule.epochs * len(run.stream) and config.run.time_budget:
        summary["stopped_early"] = f"time budget of {config.run.time_budget:g}s reached"
    return summary


def finish_after_parts(
    config: RaylocalConfig,
    data: ImageData,
    run_dir: Path,
    bounds: list[tuple[int, int]],
    finetuned: Finetuned | None = None,
    parts: PartsResult | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The rest of a run whose parts phase was trained elsewhere: the fine-tune
    epochs, evaluation, samples, checkpoint and summary, in this process (on
    ``device``, the one Ray granted it; else the config's ``--device``).

    It continues from the run's checkpoint when there is one (the fine-tune had
    started: a restart, or ``--resume``), else from ``parts``, the parts phase's
    result (read from the run directory when the run resumed after that phase).
    The summary is returned, for the run to write once.
    ``finetuned`` is a fine-tune already trained elsewhere (DDP): its weights,
    seconds and per-epoch history are taken instead of training one here."""
    parts = parts or PartsResult.load(run_dir / PARTS_RESULT)
    spec = PartSpec(tuple(tuple(b) for b in bounds))
    resume = finetuned is None and (run_dir / "checkpoint.pt").is_file()
    records = RunRecords(config, data.test, run_dir)
    run = SingleProcessRun(config, data, records, spec, device=device, resume=resume, parts_elsewhere=True)
    run.taken_over |= {figure: [st[figure] for st in parts.stats] for figure in ("rollbacks", "skipped")}
    if not resume:
        take_over(run, parts)
        run.records.log.link_report(parts.report, int(parts.stats[0]["steps"]))
        if finetuned is not None:
            adopt_finetune(run, *finetuned)
    run.train_epochs(run.total_epochs)
    summary = run.finish()
    report = dict(parts.report)
    if "packet_trace" in report:  # its rows stay in pipeline.json; the summary takes what they show
        report["packet_delays"] = [boundary["delays"] for boundary in report.pop("packet_trace")]
    summary.update(report)
    return summary
