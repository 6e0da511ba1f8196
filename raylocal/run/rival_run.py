"""The rivals as runs: the model trained end to end on Ray over the run's ``--link``.

- ``data-parallel`` (``DataParallelTraining``): ``--workers`` Ray Train workers (``WorkerBundles``),
  DDP (``--bucket-cap-mb``, ``--ddp-compression``), or local SGD with
  ``--average-every`` (``--outer-lr``: DiLoCo's outer step);
- ``pipeline`` (``PipelineTraining``): one actor per stage, the model cut where the parts would cut it
  (``--parts``, ``--split``, ``--part-spec``), ``--micro-batches`` per batch in
  ``--pipeline-order`` (1F1B or GPipe), placed as the parts are (``PartBundles``).

Each trains ``--epochs`` (or until ``--time-budget``) from the run's own
initialisation, or, data-parallel, from weights its caller hands it (the race's
parts + fine-tune). ``FinishTrainedElsewhere`` then evaluates, checkpoints and
summarises the model as an e2e run's; the summary adds the rival's own figures
(``data_parallel``, or ``pipeline`` with each stage's). Neither resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from raylocal.baselines.ddp import train_ddp
from raylocal.baselines.pipeline_on_ray import train_pipeline_parallel
from raylocal.cluster.connect import standing_in
from raylocal.cluster.placement import Placement
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.run.finish import finish_trained_elsewhere
from raylocal.run.phases import Carry, TrainedElsewhere


@dataclass
class RivalContext:
    """What a rival's phases share: its config, images and directory, its
    ``Placement`` (the stages' or the workers' bundles, checked before anything
    started) and the weights it starts from, when its caller hands it some."""

    config: RaylocalConfig
    data: ImageData
    run_dir: Path
    placement: Placement
    start_from: dict[str, Tensor] | None = None

    def open(self, carry: Carry) -> None:
        """Stand in the run directory until the run ends (under `ray job submit` the job's own may be gone)."""
        carry.held.enter_context(standing_in(self.run_dir))


class DataParallelTraining:
    """``data-parallel``: DDP or local SGD on Ray Train workers; the summary gains their totals."""

    name = "data-parallel training"

    def run(self, context: RivalContext, carry: Carry) -> None:
        config, stats = context.config, {}
        assert context.placement.workers is not None, "plan_ray_run plans the workers"
        context.open(carry)
        state, history = train_ddp(
            config, context.data.train, context.placement.workers, config.schedule.epochs, config.schedule.lr[0],
            context.run_dir / "ddp", context.start_from, time_budget=config.run.time_budget, stats=stats,
        )  # fmt: skip
        carry.trained = TrainedElsewhere(state, int(stats["steps"]), float(stats["seconds"]), history)
        carry.record |= {"data_parallel": stats, "workers": config.cluster.workers}


class PipelineTraining:
    """``pipeline``: one actor per stage; the summary shows its stages where a
    run's parts are, with each stage's figures."""

    name = "pipeline training"

    def run(self, context: RivalContext, carry: Carry) -> None:
        config, data, plan = context.config, context.data, context.placement
        steps = config.schedule.epochs * (len(data.train) // config.schedule.batch_size)
        assert plan.parts is not None, "plan_ray_run plans the stages"
        context.open(carry)
        cluster = config.cluster
        trained = train_pipeline_parallel(
            config, plan.parts, plan.train_images(data.train), cluster.pipeline_order, cluster.micro_batches, steps,
            config.run.time_budget,
        )  # fmt: skip
        stages = trained.stages
        figures = {"stages": trained.canonical, "bounds": trained.bounds, "planned_in": trained.planned}
        figures["per_stage"] = stages
        carry.record |= {"pipeline": figures, "parts": trained.canonical, "n_parts": len(stages)}
        first = stages[0]["stats"]
        carry.trained = TrainedElsewhere(trained.state, int(first["steps"]), max(s["seconds"] for s in stages), [])


class FinishTrainedElsewhere:
    """A rival's end in this process: evaluated, checkpointed and summarised as an e2e run's."""

    name = "finish"

    def run(self, context: RivalContext, carry: Carry) -> None:
        assert carry.trained is not None, "a rival's training phase comes first"
        carry.summary = finish_trained_elsewhere(context.config, context.data, context.run_dir, carry.trained)
