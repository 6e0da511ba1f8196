"""The rivals as runs: the model trained end to end on Ray over the run's ``--link``.

- ``data-parallel``: ``--workers`` Ray Train workers (``DataParallelPlacement``),
  DDP (``--bucket-cap-mb``, ``--ddp-compression``), or local SGD with
  ``--average-every`` (``--outer-lr``: DiLoCo's outer step);
- ``pipeline``: one actor per stage, the model cut where the parts would cut it
  (``--parts``, ``--split``, ``--part-spec``), ``--micro-batches`` per batch in
  ``--pipeline-order`` (1F1B or GPipe), placed as the parts are (``Placement``).

Each trains ``--epochs`` (or until ``--time-budget``) from the run's own
initialisation, or, data-parallel, from weights its caller hands it (the race's
parts + fine-tune). ``finish_trained_elsewhere`` then evaluates, checkpoints and
summarises the model as an e2e run's; the summary adds the rival's own figures
(``data_parallel``, or ``pipeline`` with each stage's). Neither resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from raylocal.baselines.ddp import train_ddp
from raylocal.baselines.pipeline_on_ray import train_pipeline_parallel
from raylocal.cluster.connect import standing_in
from raylocal.cluster.preflight import RayPlan
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.run.finish import TrainedElsewhere, finish_trained_elsewhere


class RivalRun:
    """The phases of one ``data-parallel`` or ``pipeline`` run (``Run`` owns its
    directory and record). After ``run``, ``figures`` holds the rival's own:
    the data-parallel workers' totals, or each pipeline stage's."""

    def __init__(
        self,
        config: RaylocalConfig,
        data: ImageData,
        run_dir: Path,
        ray_plan: RayPlan,
        start_from: dict[str, Tensor] | None = None,
    ) -> None:
        self.config, self.data, self.run_dir, self.start_from = config, data, run_dir, start_from
        self.ray_plan = ray_plan  # the stages' or the workers' bundles, checked before anything started
        self.figures: Any = None

    def run(self) -> dict[str, Any]:
        with standing_in(self.run_dir):  # (under `ray job submit` the job's own directory may be gone)
            trained = self._pipeline() if self.config.schedule == "pipeline" else self._data_parallel()
            summary = finish_trained_elsewhere(self.config, self.data, self.run_dir, trained)
        if self.config.schedule == "pipeline":  # its stages, where the record shows a run's parts
            n_stages = len(self.figures["per_stage"])
            return summary | {"pipeline": self.figures, "parts": self.figures["stages"], "n_parts": n_stages}
        return summary | {"data_parallel": self.figures, "workers": self.config.workers}

    def _data_parallel(self) -> TrainedElsewhere:
        config, stats = self.config, {}
        assert self.ray_plan.workers is not None, "plan_ray_run plans the workers"
        state, history = train_ddp(
            config, self.data.train, self.ray_plan.workers, config.epochs, config.lr[0], self.run_dir / "ddp",
            self.start_from, time_budget=config.time_budget, stats=stats,
        )  # fmt: skip
        self.figures = stats
        return TrainedElsewhere(state, int(stats["steps"]), float(stats["seconds"]), history)

    def _pipeline(self) -> TrainedElsewhere:
        config, data = self.config, self.data
        steps = config.epochs * (len(data.train) // config.batch_size)
        assert self.ray_plan.parts is not None, "plan_ray_run plans the stages"
        trained = train_pipeline_parallel(
            config, self.ray_plan.parts, self.ray_plan.train_images(data.train),
            config.pipeline_order, config.micro_batches, steps, config.time_budget,
        )  # fmt: skip
        stages = trained.stages
        planned = {"bounds": trained.bounds, "planned_in": trained.planned}
        self.figures = {"stages": trained.canonical, **planned, "per_stage": stages}
        first = stages[0]["stats"]
        return TrainedElsewhere(trained.state, int(first["steps"]), max(s["seconds"] for s in stages), [])
