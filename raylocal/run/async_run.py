"""The ``async`` schedule as a whole run on Ray, with a driver that only coordinates.

On a GPU cluster the driver usually sits on a head node with no GPU, so it
does no tensor work: it starts actors, streams progress, writes files and
moves state dicts around. Everything heavy runs where the work is:

- a **model service** (``ServiceActor``, a shell around ``ModelService``) in a
  bundle of its own, reserved for the whole run (a share of a GPU when the
  parts have GPUs): it plans the parts (``--balance measure`` times the layers
  on the device that trains them) and evaluates the assembled model while the
  parts train, from weights passed by reference, one evaluation at a time,
  never stopping a part;
- the **parts phase** (``PartsPhase`` in raylocal/cluster/parts_phase.py; its actors start
  while the service plans the parts), which ends by saving a ``PartsResult`` in the run directory;
- the **rest of the run** (``finish_after_parts``: fine-tune, final evaluation,
  samples, checkpoint, summary) in a Ray Train worker (``TorchTrainer``, one
  worker, a GPU when the cluster has one); with ``--finetune-workers N`` the
  fine-tune is N DDP workers and the service finishes the run from their weights;
  with no fine-tune epochs the service finishes it.

The summary's ``where`` says which node, process and device ran each phase.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylocal.baselines.ddp import train_ddp
from raylocal.cluster.connect import errors_in_one_line, fit_train_run, standing_in
from raylocal.cluster.handle import InProcess
from raylocal.cluster.parts_phase import Monitor, PartsPhase, train_parts
from raylocal.cluster.placement import Placement, actor_device, train_worker_device, train_worker_env
from raylocal.cluster.preflight import RayPlan
from raylocal.cluster.queue import LatentQueue
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData, NodeImages, training_images
from raylocal.core.runlog import Progress, write_json
from raylocal.errors import ClusterError, DivergedError
from raylocal.run.finish import finish_after_parts
from raylocal.training.schedules import PARTS_RESULT, PartsResult
from raylocal.training.service import ModelService, assembled
from raylocal.training.trainer import LRClock

# What a caller watches the parts phase with, in place of the live evaluation:
# made from the run's model service and the parts' plan once both exist.
MonitorFactory = Callable[[Any, dict[str, Any]], Monitor | None]


def here(device: str) -> dict[str, Any]:
    """Where this process is: Ray node, host, pid and the device it computes on."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node, "host": socket.gethostname(), "pid": os.getpid(), "device": device}


def parts_where(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each part ran, from the parts phase's pipeline report."""
    keys = zip(report["actor_nodes"], report["actor_pids"], report["actor_devices"])
    return [{"node_id": n, "pid": p, "device": d} for n, p, d in keys]


def keep_parts_result(run_dir: Path, parts: PartsResult, where: dict[str, Any]) -> None:
    """The parts phase's record in the run directory (what ``--resume`` continues
    from, and its pipeline report), and where each part ran."""
    write_json(run_dir / "pipeline.json", parts.report)
    parts.save(run_dir / PARTS_RESULT)
    where["parts"] = parts_where(parts.report)


def _import_all(modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name)


class RunService:
    """A thin shell around ``ModelService`` that also finishes runs whose
    fine-tune is not a single Ray Train worker's (none, or DDP). The async run
    holds it as an actor (``ServiceActor``), or in the caller's own process
    (``InProcess``) when the caller already holds a bundle: a Tune trial, a
    benchmark's cell."""

    def __init__(
        self,
        config_json: str,
        image_shape: tuple[int, int, int],
        threads: int,
        prefetch: bool = True,
        device: str | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.config = RaylocalConfig.model_validate_json(config_json)
        # an actor's (a Tune trial's) device is the one Ray granted it; a driver's is the config's
        device = device or str(actor_device(self.config))
        self.service = ModelService(self.config, image_shape, device)
        self.evaluations, self.evaluation_s = 0, 0.0
        if prefetch:
            # what finishing a run needs (seconds of imports), loaded while the parts
            # train: on a thread, so that planning the parts does not wait for it
            modules = ["torch.utils.tensorboard"] + (["torchvision.utils"] if self.config.samples else [])
            threading.Thread(target=_import_all, args=(modules,), daemon=True).start()

    def where(self) -> dict[str, Any]:
        return here(str(self.service.device)) | {"evaluations": self.evaluations, "evaluation_s": self.evaluation_s}

    def plan(self, train_images: torch.Tensor | NodeImages) -> dict[str, Any]:
        return self.service.plan(training_images(train_images))

    def evaluate(self, test_images: torch.Tensor, *weights: dict[str, torch.Tensor]) -> float:
        state: dict[str, torch.Tensor] = {}
        for w in weights:  # one dict per part
            state.update(w)
        start = time.perf_counter()
        bpd = self.service.evaluate(test_images, state)
        self.evaluations += 1
        self.evaluation_s += time.perf_counter() - start
        return bpd

    def evaluate_parts(self, test_images: torch.Tensor, bounds: list, states: list[dict[str, Any]]) -> float:
        """Test BPD of the model assembled from part checkpoints (what PBT copies)."""
        return self.evaluate(test_images, assembled(states, self.service.glow, bounds))

    def finish(
        self,
        name: str,
        train: torch.Tensor | NodeImages,
        test: torch.Tensor,
        run_dir: str,
        bounds: list,
        parts: PartsResult | None,
        finetuned: Any = None,
    ) -> dict[str, Any]:
        config = self.config.model_copy(update={"device": str(self.service.device)})
        data = ImageData(name, training_images(train), test)
        summary = finish_after_parts(config, data, Path(run_dir), bounds, finetuned, parts)
        return summary | {"where_finished": self.where() | {"phase": "model service"}}


ServiceActor = ray.remote(RunService)


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


def _finish_loop(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker of a one-worker fine-tune: the rest of the run."""
    import ray.train

    config = RaylocalConfig.model_validate_json(loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    train = loop_config["train"]  # the driver's images in the object store, or what this node loads
    train = training_images(train) if isinstance(train, NodeImages) else ray.get(train)
    data = ImageData(loop_config["name"], train, ray.get(loop_config["test"]))
    device = train_worker_device(config)
    run_dir = Path(loop_config["run_dir"])
    parts = ray.get(loop_config["parts"]) if loop_config["parts"] is not None else None
    mailbox = loop_config["mailbox"]  # the driver's: the summary goes back in memory, not through a file
    try:
        summary = finish_after_parts(
            config.model_copy(update={"device": device}), data, run_dir, loop_config["bounds"], parts=parts
        )
    except DivergedError as e:
        # a divergence is deterministic: reported, not raised, so that Ray Train
        # does not rerun the fine-tune max_restarts times to diverge again
        mailbox.put_latest({"diverged": str(e)})
        return
    summary["where_finished"] = here(device) | {"phase": "ray train worker"}
    mailbox.put_latest({"summary": summary})  # a restarted worker's replaces an earlier one's
    ray.train.report({"test_bpd": summary["test_bpd"]})


def finish_on_ray_train(
    config: RaylocalConfig,
    placement: Placement,
    name: str,
    refs: tuple[Any, Any],
    run_dir: Path,
    bounds: list,
    parts: PartsResult | None,
) -> dict[str, Any]:
    """The fine-tune and the rest of the run as a Ray Train run of one worker (a
    GPU when the cluster has one, else CPUs and as many torch threads). Ray
    Train restarts a dead worker up to ``max_restarts`` times; the new one
    continues from the run's last checkpoint. Returns the run's summary."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    resources = dict(placement.work)
    use_gpu = resources.pop("GPU", 0) > 0
    threads = config.threads or max(1, int(resources["CPU"]))
    mailbox = LatentQueue(1)
    trainer = TorchTrainer(
        _finish_loop,
        train_loop_config={
            "config": config.model_dump_json(),
            "name": name,
            "train": refs[0],
            "test": refs[1],
            "run_dir": str(run_dir),
            "bounds": bounds,
            "threads": threads,
            "parts": ray.put(parts) if parts is not None else None,
            "mailbox": mailbox,
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=TrainRunConfig(
            name="finetune",
            storage_path=str((run_dir / "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=config.max_restarts),
            worker_runtime_env=train_worker_env(use_gpu),
        ),
    )
    try:
        try:
            fit_train_run(trainer)
        except Exception as e:  # Ray Train wraps worker errors in several types
            raise ClusterError(f"the fine-tune failed: {str(e).strip().splitlines()[0][:200]}") from None
        if mailbox.qsize() == 0:
            raise ClusterError("the fine-tune's worker ended without a summary")
        result = mailbox.get()
    finally:
        mailbox.shutdown()
    if "diverged" in result:
        raise DivergedError(result["diverged"])
    return result["summary"]


class AsyncRun:
    """The phases of one ``async`` run (``Run`` owns its directory and record,
    and hands it the run's ``RayPlan``, checked and planned before anything
    started): the parts' plan, the parts phase, then the rest of the run, each in Ray.

    With ``--resume``: when the parts phase had finished (its ``PartsResult``
    is saved) the run goes on to the fine-tune, which continues from the run's
    checkpoint; otherwise the parts continue from their own checkpoints.

    ``service_here`` runs the model service in this process rather than in an
    actor of its own (a caller that holds a bundle: a Tune trial, a benchmark's
    cell); ``monitor`` watches the parts phase in place of the live evaluation
    (see ``MonitorFactory``). After ``run``, ``plan`` and ``parts`` hold the
    parts' plan and the parts phase's result."""

    def __init__(
        self,
        config: RaylocalConfig,
        data: ImageData,
        run_dir: Path,
        ray_plan: RayPlan,
        service_here: bool = False,
        monitor: MonitorFactory | None = None,
    ) -> None:
        self.config, self.data = config, data
        self.run_dir = run_dir
        self.service_here, self.monitor = service_here, monitor
        self.ray_plan = ray_plan  # parts: the parts', service's and one-worker fine-tune's; workers: a DDP fine-tune's
        self.plan: dict[str, Any] | None = None
        self.progress = Progress(config.progress)
        self.where: dict[str, Any] = {}
        self.service: Any = None
        self.service_pg: PlacementGroup | None = None
        self.parts: PartsResult | None = None  # the parts phase's result, once it ran in this process
        self.finetune_link: dict[str, Any] | None = None  # a DDP fine-tune's link figures

    def run(self) -> dict[str, Any]:
        """The run's phases, in its (existing) directory; returns its summary."""
        with standing_in(self.run_dir), errors_in_one_line():
            return self._run()

    def _run(self) -> dict[str, Any]:
        config = self.config
        self.where["driver"] = here("none")
        refs = (self.ray_plan.train_images(self.data.train), ray.put(self.data.test))
        service = self._start_service()
        try:
            plan_ref = service.plan.remote(self._images(refs)[0])
            if config.resume and (self.run_dir / PARTS_RESULT).is_file():
                plan = self.plan = ray.get(plan_ref)
            else:
                live = None if self.monitor else self._live_settings(refs[1])
                # the part actors start (a process and a torch import each) while the service plans
                with PartsPhase(config, self.data, self.run_dir, self.ray_plan.parts, refs[0]) as phase:
                    plan = self.plan = ray.get(plan_ref)
                    if self.monitor:
                        watch = self.monitor(service, plan)
                    else:
                        watch = LiveEvaluation(service, *live, self.progress)
                    self.parts = train_parts(phase, plan, self.progress, watch)
                    keep_parts_result(self.run_dir, self.parts, self.where)  # before the actors are released
            self.where["service"] = ray.get(service.where.remote())
            summary = self._finish(plan, refs)
        finally:
            self._release()
        summary["where"] = self.where
        return summary

    def _start_service(self) -> Any:
        """The model service, in a placement group of its own (released by ``_release``)."""
        config = self.config
        bundle = self.ray_plan.parts.service
        if self.service_here:  # in a process that holds one bundle's CPUs: one thread
            in_actor = ray.get_runtime_context().get_actor_id() is not None
            device = None if in_actor else config.device
            self.service = InProcess(RunService(config.model_dump_json(), self.data.shape, 1, False, device))
            return self.service
        self.service_pg = self.ray_plan.parts.reserve_service()
        self.service = ServiceActor.options(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.service_pg, placement_group_bundle_index=0),
        ).remote(config.model_dump_json(), self.data.shape, config.threads or max(1, int(bundle["CPU"])))
        return self.service

    def _images(self, refs: tuple[Any, Any]) -> tuple[Any, Any]:
        """The images as the service takes them: by reference in an actor, this
        process's own tensors when it serves here (no second copy of them)."""
        return (self.data.train, self.data.test) if self.service_here else refs

    def _release(self) -> None:
        if self.service is not None and not self.service_here:
            ray.kill(self.service)
        self.service = None
        if self.service_pg is not None:
            remove_placement_group(self.service_pg)
            self.service_pg = None

    def _live_settings(self, test_ref: Any) -> tuple[Any, int, int, int]:
        """``LiveEvaluation``'s settings (test images, their count, every, steps per epoch),
        read before the parts start; its clock starts with the parts."""
        config, test = self.config, self.data.test
        steps_per_epoch = len(self.data.train) // config.batch_size
        n_live = min(config.live_eval_images or len(test), len(test))
        live_ref = test_ref if n_live == len(test) else ray.put(test[:n_live])
        return live_ref, n_live, config.eval_every or steps_per_epoch, steps_per_epoch

    def _finish(self, plan: dict[str, Any], refs: tuple[Any, Any]) -> dict:
        config, run_dir, name = self.config, self.run_dir, self.data.name
        bounds = plan["bounds"]
        if config.finetune_epochs == 0:
            summary = ray.get(self.service.finish.remote(name, *self._images(refs), str(run_dir), bounds, self.parts))
        elif config.finetune_workers > 1:
            # the DDP workers take the whole cluster; a fresh service finishes the run after them
            self._release()
            finetuned = self._ddp_finetune()
            service = self._start_service()
            images = self._images(refs)
            summary = ray.get(service.finish.remote(name, *images, str(run_dir), bounds, self.parts, finetuned))
            summary["finetune_link"] = self.finetune_link
        else:
            # the service's bundle is handed to the fine-tune: Ray Train always
            # reserves its own placement group and cannot take over one of ours
            self._release()
            summary = finish_on_ray_train(config, self.ray_plan.parts, name, refs, run_dir, bounds, self.parts)
        self.where["finished"] = summary.pop("where_finished")
        if "parts" not in self.where:  # resumed after the parts phase: from its report
            self.where["parts"] = parts_where(json.loads((run_dir / "pipeline.json").read_text()))
        return summary

    def _ddp_finetune(self) -> tuple[dict[str, torch.Tensor], float, list[dict[str, Any]]]:
        """The fine-tune data-parallel on Ray Train workers (DDP over ``--link``)."""
        config = self.config
        parts = self.parts or PartsResult.load(self.run_dir / PARTS_RESULT)  # resumed after the parts phase
        t0 = time.perf_counter()
        lr = config.finetune_lr or min(config.lr)
        per_epoch = len(self.data.train) // config.batch_size
        clock = LRClock.of(config, per_epoch, config.epochs, config.finetune_epochs)
        run_clock = clock.finetune_elsewhere(int(parts.stats[0]["steps"]))  # on from where the parts left it
        link_stats: dict[str, Any] = {}
        assert self.ray_plan.workers is not None, "plan_ray_run plans the fine-tune's workers"
        tuned, history = train_ddp(
            config, self.data.train, self.ray_plan.workers, config.finetune_epochs, lr, self.run_dir / "ddp",
            parts.state, stats=link_stats, **run_clock,
        )  # fmt: skip
        self.where["finetune_ddp"] = link_stats.pop("where", None)
        self.finetune_link = link_stats
        return tuned, time.perf_counter() - t0, history
