"""One run: its directory, its phases and its one record.

``Run`` is what every entry point that trains a configured run composes (the
command line, the studies, Tune trials, the benchmarks' cells). It resolves the
run directory, checks what can be checked before anything is written, writes
``config.json`` once when the run starts and ``summary.json`` once when it
ends (with the phases it trained and each one's wall time), and removes a
directory it created if the run fails before its first checkpoint (nothing
to resume, nothing half-written). A Ray run is checked,
joins Ray and is planned on the cluster once (``plan_ray_run``), before
anything is written. What the run writes in its directory as it trains (its
TensorBoard curves, status line, evaluations, samples and checkpoint path) is
its ``RunRecords`` (raylocal/training/records.py): a single-process run's are
opened here and handed to its session; a Ray run's are opened on the same
directory by the process that ends it (the model service, a Ray Train worker).

Between those it trains a list of phases (raylocal/run/phases.py), in the
context they share, handing each other what they made in memory:

- the single-process schedules: the parts' epochs, the fine-tune and the run's
  end, in this process (``LocalParts``, ``LocalFinetune``, ``LocalFinish``);
- the async schedule on Ray: the Ray parts (``RayParts``), then the fine-tune
  and the run's end in a Ray Train worker (``RayTrainFinetune``), on DDP
  workers and then the model service (``DdpFinetune``, ``ServiceFinish``), or
  the end in the service alone (``ServiceFinish``);
- the rivals on Ray: data-parallel workers or pipeline stages
  (``DataParallelTraining``, ``PipelineTraining``), then the run's end here
  (``FinishTrainedElsewhere``).

A caller that holds a bundle of its own and watches the parts itself (a Tune
trial, a benchmark's cell) composes the same run with ``service_here`` and a
``monitor`` (see ``AsyncContext``), and reads ``carry`` afterwards (the parts'
plan and result) and ``placement``, beside the summary. A caller may also hand a
run the weights it starts from (``start_from``: the race's parts + fine-tune)
instead of the data-dependent initialisation (the single-process and
data-parallel runs).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from raylocal.core.config import RIVAL_SCHEDULES, RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.core.runlog import has_checkpoint, resolve_run_dir, write_json
from raylocal.run.phases import Carry, Phase, local_phases
from raylocal.training.records import RunRecords
from raylocal.training.schedules import SingleProcessRun

if TYPE_CHECKING:  # the Ray runs import Ray: only their schedules pay for it
    from raylocal.cluster.placement import Placement
    from raylocal.run.async_run import MonitorFactory


class Run:
    """A configured run (see the module doc)."""

    def __init__(
        self,
        config: RaylocalConfig,
        data: ImageData,
        service_here: bool = False,
        monitor: MonitorFactory | None = None,
        start_from: dict[str, Tensor] | None = None,
    ) -> None:
        if start_from is not None and config.schedule.name in ("async", "pipeline"):
            raise ValueError(f"a run of the {config.schedule.name} schedule starts from its own initialisation")
        self.config, self.data, self.start_from = config, data, start_from
        self.dir = self.directory_of(config)
        self.service_here, self.monitor = service_here, monitor
        self.phases: list[Phase] = []
        self.placement: Placement | None = None  # a Ray run's, planned before anything is written
        self.records: RunRecords | None = None  # a single-process run's (a Ray run's are opened where it ends)
        self.carry = Carry()

    @staticmethod
    def directory_of(config: RaylocalConfig) -> Path:
        """The run's directory (``resolve_run_dir``): a fresh one is named after its schedule and parts."""
        fresh = f"{config.schedule.name}-{config.parts.count}p"
        return resolve_run_dir(config.run.storage_path, config.run.run_name, config.run.resume, fresh)

    def execute(self) -> dict[str, Any]:
        """Train the run's phases; returns its summary (also written to summary.json)."""
        created = not self.dir.exists()
        self.carry = Carry()
        try:
            context, self.phases = self._phases()
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.config.run.resume:
                write_json(self.dir / "config.json", self.config.sectioned())
            with self.carry.held:  # what the phases held, released when they are done or have failed
                for phase in self.phases:
                    start = time.perf_counter()
                    phase.run(context, self.carry)
                    timed = {"name": phase.name, "seconds": time.perf_counter() - start}
                    self.carry.record.setdefault("phases", []).append(timed)
            summary = self.carry.result()
        except BaseException:
            if created and not has_checkpoint(self.dir):  # nothing to resume: leave nothing behind
                shutil.rmtree(self.dir, ignore_errors=True)
            raise
        write_json(self.dir / "summary.json", summary)
        return summary

    def _phases(self) -> tuple[Any, list[Phase]]:
        """The context the run's phases share, and the phases."""
        config = self.config
        if config.schedule.name not in RIVAL_SCHEDULES and config.schedule.name != "async":
            self.records = RunRecords(config, self.data.test, self.dir)
            session = SingleProcessRun(config, self.data, self.records, start_from=self.start_from)
            return session, local_phases(session)
        # The Ray runs import Ray: only their schedules pay for it. All of their modules are imported
        # before the driver joins Ray: under `ray job submit` the job's working directory, this code's own
        # copy, can then be removed (by another node's agent, where nodes share a temp directory; README).
        from raylocal.cluster.preflight import plan_ray_run
        from raylocal.run.async_run import AsyncContext, RayParts
        from raylocal.run.finish_phase import DdpFinetune, RayTrainFinetune, ServiceFinish
        from raylocal.run.rival_run import DataParallelTraining, FinishTrainedElsewhere, PipelineTraining, RivalContext

        self.placement = plan_ray_run(config, self.data, with_service=not self.service_here)
        if config.schedule.name in RIVAL_SCHEDULES:
            training = PipelineTraining() if config.schedule.name == "pipeline" else DataParallelTraining()
            context = RivalContext(config, self.data, self.dir, self.placement, self.start_from)
            return context, [training, FinishTrainedElsewhere()]
        if not config.schedule.finetune_epochs:
            finish: list[Phase] = [ServiceFinish()]
        elif config.cluster.finetune_workers > 1:
            finish = [DdpFinetune(), ServiceFinish()]
        else:
            finish = [RayTrainFinetune()]
        context = AsyncContext(config, self.data, self.dir, self.placement, self.service_here, self.monitor)
        return context, [RayParts(), *finish]
