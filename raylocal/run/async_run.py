"""The ``async`` schedule as a whole run on Ray, with a driver that only coordinates.

On a GPU cluster the driver usually sits on a head node with no GPU, so it
does no tensor work: it starts actors, streams progress, writes files and
moves state dicts around. Everything heavy runs where the work is:

- a **model service** (``ServiceHandle`` in raylocal/run/service.py) in a
  bundle of its own, held until a fine-tune takes its place (without one it
  finishes the run; a share of a GPU when the parts have GPUs): it plans the
  parts (``--balance measure`` times the layers on the device that trains
  them) and evaluates the assembled model while the parts train
  (``LiveEvaluation``), from weights passed by reference, one evaluation at a
  time, never stopping a part;
- the **parts phase** (``RayParts``, over ``PartsPhase`` in
  raylocal/cluster/parts_phase.py; its actors start while the service plans
  the parts), which ends by saving a ``PartsResult`` in the run directory;
- the **rest of the run** (raylocal/run/finish_phase.py: fine-tune, final
  evaluation, samples, checkpoint, summary) in a Ray Train worker, on DDP
  workers and then the service, or in the service alone.

The phases share an ``AsyncContext``. The summary's ``where`` says which node,
process and device ran each phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from raylocal.cluster.connect import errors_in_one_line, standing_in
from raylocal.cluster.parts_phase import Monitor, PartsPhase, keep_parts_result, train_parts
from raylocal.cluster.placement import Placement
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.core.runlog import Progress
from raylocal.run.phases import Carry
from raylocal.run.service import ServiceHandle, here
from raylocal.training.schedules import PARTS_RESULT

# What a caller watches the parts phase with, in place of the live evaluation:
# made from the run's model service and the parts' plan once both exist.
MonitorFactory = Callable[[Any, dict[str, Any]], Monitor | None]


class LiveEvaluation:
    """A parts-phase monitor: every ``every`` steps of the last part, the service
    evaluates the weights the parts hold then, on the first ``images`` test
    images (``--live-eval-images``: a fixed subset, so that watching costs
    little; its curve points say how many). At most one evaluation is in
    flight; the driver only collects its number when it has landed."""

    def __init__(
        self, service: Any, test_ref: Any, images: int, every: int, steps_per_epoch: int, progress: Progress
    ) -> None:
        self.service, self.test_ref, self.images, self.every = service, test_ref, images, every
        self.steps_per_epoch, self.progress = steps_per_epoch, progress
        self.next_step = every
        self.pending: tuple[Any, int, float] | None = None
        self.curve: list[dict[str, float]] = []
        self.start = time.perf_counter()

    def __call__(self, actors: list[Any], polled: list[dict[str, Any]]) -> None:
        self.collect(wait=False)
        step = polled[-1]["steps"]
        if self.pending is None and step >= self.next_step:
            self.next_step = step + self.every
            weights = [a.weights.remote() for a in actors]  # references: no tensor passes through here
            ref = self.service.evaluate.remote(self.test_ref, *weights)
            self.pending = (ref, step, time.perf_counter() - self.start)

    def finish(self) -> None:
        """The parts are done: wait for the last evaluation (it stalls nothing now)."""
        self.collect(wait=True)

    def collect(self, wait: bool) -> None:
        if self.pending is None:
            return
        ref, step, elapsed = self.pending
        ready, _ = ray.wait([ref], timeout=None if wait else 0)
        if not ready:
            return
        self.pending = None
        bpd = ray.get(ref)
        epoch = step / self.steps_per_epoch
        point = {"epoch": epoch, "step": step, "elapsed": elapsed, "test_bpd": bpd, "live_images": self.images}
        self.curve.append(point)
        self.progress.update(
            f"step {step}: assembled model's test BPD {bpd:.4f} (live, {self.images} test images)", force=True
        )


class AsyncContext:
    """What the phases of one ``async`` run share on Ray (``Run`` chose the
    phases, and checked and planned the run's ``Placement`` before anything
    started): the run's images in the object store, its model service, where
    each phase ran and the progress line. ``open`` (the first phase's) holds
    them until the run ends.

    ``service_here`` runs the model service in this process rather than in an
    actor of its own (a caller that holds a bundle: a Tune trial, a benchmark's
    cell); ``monitor`` watches the parts phase in place of the live evaluation
    (see ``MonitorFactory``)."""

    def __init__(
        self,
        config: RaylocalConfig,
        data: ImageData,
        run_dir: Path,
        placement: Placement,
        service_here: bool = False,
        monitor: MonitorFactory | None = None,
    ) -> None:
        self.config, self.data, self.run_dir = config, data, run_dir
        self.monitor = monitor
        # parts: the parts', service's and one-worker fine-tune's bundles; workers: a DDP fine-tune's
        self.placement = placement
        self.progress = Progress(config.run.progress)
        self.where: dict[str, Any] = {}
        self.refs: tuple[Any, Any] = (None, None)  # the train and test images in the object store, once open
        # the model service: in this process for a caller that holds a bundle (one thread), else an actor
        local = data if service_here else None
        parts = placement.parts
        self.service = ServiceHandle(
            config.model_dump_json(), data.shape, parts, parts.threads, local, config.cluster.device
        )

    def open(self, carry: Carry) -> None:
        """Stand in the run directory, with Ray's errors in one line, put the images
        in the object store and start the model service: held until the run ends."""
        carry.held.enter_context(standing_in(self.run_dir))
        carry.held.enter_context(errors_in_one_line())
        self.where["driver"] = here("none")
        carry.record["where"] = self.where
        self.refs = (self.placement.train_images(self.data.train), ray.put(self.data.test))
        carry.held.callback(self.service.release)
        self.service.start()

    def live_settings(self) -> tuple[Any, int, int, int]:
        """``LiveEvaluation``'s settings (test images, their count, every, steps per epoch),
        read before the parts start; its clock starts with the parts."""
        config, test = self.config, self.data.test
        steps_per_epoch = len(self.data.train) // config.schedule.batch_size
        n_live = min(config.run.live_eval_images or len(test), len(test))
        live_ref = self.refs[1] if n_live == len(test) else ray.put(test[:n_live])
        return live_ref, n_live, config.run.eval_every or steps_per_epoch, steps_per_epoch


class RayParts:
    """An async run's first phase: the parts' plan, then the parts phase on Ray,
    one actor per part, while the model service evaluates (or the caller's
    monitor watches). Its ``PartsResult`` is kept in the run directory for
    ``--resume``: a run resumed after this phase goes on to its fine-tune, which
    continues from the run's checkpoint; otherwise the parts continue from their
    own checkpoints."""

    name = "ray parts"

    def run(self, context: AsyncContext, carry: Carry) -> None:
        context.open(carry)
        config, service, run_dir = context.config, context.service, context.run_dir
        plan_ref = service.actor.plan.remote(service.images(context.refs)[0])
        if config.run.resume and (run_dir / PARTS_RESULT).is_file():
            carry.plan = ray.get(plan_ref)
        else:
            live = None if context.monitor else context.live_settings()
            # the part actors start (a process and a torch import each) while the service plans
            with PartsPhase(config, context.data, run_dir, context.placement.parts, context.refs[0]) as phase:
                plan = carry.plan = ray.get(plan_ref)
                if context.monitor:
                    watch = context.monitor(service.actor, plan)
                else:
                    watch = LiveEvaluation(service.actor, *live, context.progress)
                carry.parts = train_parts(phase, plan, context.progress, watch)
                keep_parts_result(run_dir, carry.parts, context.where)  # before the actors are released
        context.where["service"] = ray.get(service.actor.where.remote())
