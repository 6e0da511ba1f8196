"""The rest of a run whose parts phase was trained elsewhere (the Ray parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.model.parts import PartSpec
from raylocal.training.schedules import PARTS_RESULT, PartsResult, SingleProcessRun


def finish_after_parts(
    config: RaylocalConfig,
    data: ImageData,
    run_dir: Path,
    bounds: list[tuple[int, int]],
    finetuned: tuple[dict[str, Tensor], float, list[dict[str, Any]]] | None = None,
    parts: PartsResult | None = None,
) -> dict[str, Any]:
    """The rest of a run whose parts phase was trained elsewhere: the fine-tune
    epochs, evaluation, samples, checkpoint and summary, in this process.

    It continues from the run's checkpoint when there is one (the fine-tune had
    started: a restart, or ``--resume``), else from ``parts``, the parts phase's
    result (read from the run directory when the run resumed after that phase).
    The summary is returned, for the run to write once.
    ``finetuned`` is a fine-tune already trained elsewhere (DDP): its weights,
    seconds and per-epoch history are taken instead of training one here."""
    parts = parts or PartsResult.load(run_dir / PARTS_RESULT)
    spec = PartSpec(tuple(tuple(b) for b in bounds))
    resume = finetuned is None and (run_dir / "checkpoint.pt").is_file()
    run = SingleProcessRun(config.model_copy(update={"resume": resume}), data, run_dir, spec, record=False)
    if not resume:
        run.take_over(parts)
        run.log.link_report(parts.report, int(parts.stats[0]["steps"]))
        if finetuned is not None:
            run.adopt_finetune(*finetuned)
    summary = run.run()
    summary.update(parts.report)
    n = len(parts.stats)
    summary["rollbacks"] = [st["rollbacks"] for st in parts.stats] + summary["rollbacks"][n:]
    summary["skipped_batches"] = [st["skipped"] for st in parts.stats] + summary["skipped_batches"][n:]
    return summary
