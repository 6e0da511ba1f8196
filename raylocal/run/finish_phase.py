"""The rest of an async run on Ray, once its parts have trained: the
fine-tune, the final evaluation, samples, checkpoint and summary
(``finish_after_parts``), by one of three routes:

- no fine-tune epochs: the model service finishes the run;
- one fine-tune worker: a Ray Train run of one worker (``TorchTrainer``, a GPU
  when the cluster has one) does it all; Ray Train restarts a dead worker,
  which continues from the run's last checkpoint;
- ``--finetune-workers N``: N DDP workers on Ray Train fine-tune over
  ``--link``, then a fresh model service finishes the run from their weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
import torch

from raylocal.baselines.ddp import train_ddp
from raylocal.cluster.parts_phase import parts_where
from raylocal.cluster.placement import Placement, train_worker_device
from raylocal.cluster.preflight import RayPlan
from raylocal.cluster.ray_train import run_on_ray_train
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData, NodeImages, training_images
from raylocal.errors import DivergedError
from raylocal.run.finish import finish_after_parts
from raylocal.run.service import ServiceHandle, here
from raylocal.training.schedules import PARTS_RESULT, PartsResult
from raylocal.training.trainer import LRClock


class FinishPhase:
    """The run's last phase, by the route its config asks for (see the module
    doc). ``parts`` is the parts phase's result when it ran in this process
    (else it is read from the run directory: resumed after it); ``where`` (the
    run's record of which node, process and device did what) gains the
    finishing process and, for a DDP fine-tune, its workers."""

    def __init__(
        self,
        config: RaylocalConfig,
        data: ImageData,
        run_dir: Path,
        ray_plan: RayPlan,
        service: ServiceHandle,
        parts: PartsResult | None,
        where: dict[str, Any],
    ) -> None:
        self.config, self.data, self.run_dir, self.ray_plan = config, data, run_dir, ray_plan
        self.service, self.parts, self.where = service, parts, where

    def run(self, bounds: list, refs: tuple[Any, Any]) -> dict[str, Any]:
        """The run's summary; ``refs``: the train and test images in Ray's object store."""
        config, run_dir, name, service = self.config, self.run_dir, self.data.name, self.service
        if config.finetune_epochs == 0:
            summary = ray.get(
                service.actor.finish.remote(name, *service.images(refs), str(run_dir), bounds, self.parts)
            )
        elif config.finetune_workers > 1:
            # the DDP workers take the whole cluster; a fresh service finishes the run after them
            service.release()
            finetuned, link = self._ddp_finetune()
            service.start()
            images = service.images(refs)
            summary = ray.get(service.actor.finish.remote(name, *images, str(run_dir), bounds, self.parts, finetuned))
            summary["finetune_link"] = link
        else:
            # the service's bundle is handed to the fine-tune: Ray Train always
            # reserves its own placement group and cannot take over one of ours
            service.release()
            summary = finish_on_ray_train(config, self.ray_plan.parts, name, refs, run_dir, bounds, self.parts)
        self.where["finished"] = summary.pop("where_finished")
        if "parts" not in self.where:  # resumed after the parts phase: from its report
            self.where["parts"] = parts_where(json.loads((run_dir / "pipeline.json").read_text()))
        return summary

    def _ddp_finetune(self) -> tuple[tuple[dict[str, torch.Tensor], float, list[dict[str, Any]]], dict[str, Any]]:
        """The fine-tune data-parallel on Ray Train workers (DDP over ``--link``):
        its weights, seconds and history, and its link's figures."""
        config = self.config
        parts = self.parts or PartsResult.load(self.run_dir / PARTS_RESULT)  # resumed after the parts phase
        t0 = time.perf_counter()
        lr = config.finetune_lr or min(config.lr)
        per_epoch = len(self.data.train) // config.batch_size
        clock = LRClock.of(config, per_epoch, config.epochs, config.finetune_epochs)
        run_clock = clock.finetune_elsewhere(int(parts.stats[0]["steps"]))  # on from where the parts left it
        link: dict[str, Any] = {}
        assert self.ray_plan.workers is not None, "plan_ray_run plans the fine-tune's workers"
        tuned, history = train_ddp(
            config, self.data.train, self.ray_plan.workers, config.finetune_epochs, lr, self.run_dir / "ddp",
            parts.state, stats=link, **run_clock,
        )  # fmt: skip
        self.where["finetune_ddp"] = link.pop("where", None)
        return (tuned, time.perf_counter() - t0, history), link


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
        summary = finish_after_parts(config, data, run_dir, loop_config["bounds"], parts=parts, device=device)
    except DivergedError as e:
        # a divergence is deterministic: reported, not raised, so that Ray Train
        # does not rerun the fine-tune max_restarts times to diverge again
        mailbox.post({"diverged": str(e)})
        return
    summary["where_finished"] = here(device) | {"phase": "ray train worker"}
    mailbox.post({"summary": summary})  # a restarted worker's replaces an earlier one's
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
    resources = dict(placement.work)
    use_gpu = resources.pop("GPU", 0) > 0
    result = run_on_ray_train(
        _finish_loop,
        {
            "config": config.model_dump_json(),
            "name": name,
            "train": refs[0],
            "test": refs[1],
            "run_dir": str(run_dir),
            "bounds": bounds,
            "threads": placement.work_threads,
            "parts": ray.put(parts) if parts is not None else None,
        },
        what="the fine-tune", name="finetune", storage=run_dir / "ray_train", workers=1, resources=resources,
        use_gpu=use_gpu, max_failures=config.max_restarts,
    )  # fmt: skip
    return result["summary"]
