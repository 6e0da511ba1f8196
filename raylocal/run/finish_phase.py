"""The rest of an async run on Ray, once its parts have trained: the
fine-tune, the final evaluation, samples, checkpoint and summary
(``finish_after_parts``), as the phases of one of three routes (``Run``
chooses them):

- no fine-tune epochs: ``ServiceFinish``, the model service finishes the run;
- one fine-tune worker: ``RayTrainFinetune``, a Ray Train run of one worker
  (``TorchTrainer``, a GPU when the cluster has one) does it all; Ray Train
  restarts a dead worker, which continues from the run's last checkpoint;
- ``--finetune-workers N``: ``DdpFinetune``, N DDP workers on Ray Train
  fine-tune over ``--link``, then ``ServiceFinish`` from their weights.
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
from raylocal.cluster.placement import PartBundles, train_worker_device
from raylocal.cluster.ray_train import run_on_ray_train
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData, NodeImages, training_images
from raylocal.errors import DivergedError
from raylocal.run.async_run import AsyncContext
from raylocal.run.finish import finish_after_parts
from raylocal.run.phases import Carry
from raylocal.run.service import here
from raylocal.training.schedules import PARTS_RESULT, PartsResult
from raylocal.training.trainer import LRClock


def finished(context: AsyncContext, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's summary from its finishing process; ``where`` gains that process
    and, for a run resumed after its parts phase, where its parts ran (from their report)."""
    context.where["finished"] = summary.pop("where_finished")
    if "parts" not in context.where:
        report = json.loads((context.run_dir / "pipeline.json").read_text())
        context.where["parts"] = parts_where(report)
    return summary


class ServiceFinish:
    """The run's end in the model service: without a fine-tune, or after a DDP one
    (whose weights it takes). ``parts`` is read from the run directory when the
    run resumed after its parts phase."""

    name = "service finish"

    def run(self, context: AsyncContext, carry: Carry) -> None:
        service, run_dir, bounds = context.service, context.run_dir, carry.plan["bounds"]
        images = service.images(context.refs)
        finish = service.actor.finish.remote(
            context.data.name, *images, str(run_dir), bounds, carry.parts, carry.finetuned
        )
        carry.summary = finished(context, ray.get(finish))


class DdpFinetune:
    """``--finetune-workers N``: the fine-tune data-parallel on N Ray Train
    workers (DDP over ``--link``). They take the whole cluster: the model
    service gives them its place and starts again after them."""

    name = "ddp fine-tune"

    def run(self, context: AsyncContext, carry: Carry) -> None:
        config, run_dir = context.config, context.run_dir
        context.service.release()
        parts = carry.parts or PartsResult.load(run_dir / PARTS_RESULT)  # resumed after the parts phase
        t0 = time.perf_counter()
        lr = config.schedule.finetune_lr or min(config.schedule.lr)
        per_epoch = len(context.data.train) // config.schedule.batch_size
        clock = LRClock.of(config, per_epoch, config.schedule.epochs, config.schedule.finetune_epochs)
        run_clock = clock.finetune_elsewhere(int(parts.stats[0]["steps"]))  # on from where the parts left it
        link: dict[str, Any] = {}
        assert context.placement.workers is not None, "plan_ray_run plans the fine-tune's workers"
        tuned, history = train_ddp(
            config, context.data.train, context.placement.workers, config.schedule.finetune_epochs, lr, run_dir / "ddp",
            parts.state, stats=link, **run_clock,
        )  # fmt: skip
        context.where["finetune_ddp"] = link.pop("where", None)
        carry.finetuned = (tuned, time.perf_counter() - t0, history)
        carry.record["finetune_link"] = link
        context.service.start()


class RayTrainFinetune:
    """One fine-tune worker: a Ray Train run of one worker (a GPU when the
    cluster has one) fine-tunes and finishes the run. The model service hands
    it its bundle (Ray Train reserves a placement group of its own and cannot
    take over one of ours); Ray Train restarts a dead worker, which continues
    from the run's last checkpoint."""

    name = "ray train fine-tune"

    def run(self, context: AsyncContext, carry: Carry) -> None:
        context.service.release()
        summary = finish_on_ray_train(
            context.config, context.placement.parts, context.data.name, context.refs, context.run_dir,
            carry.plan["bounds"], carry.parts,
        )  # fmt: skip
        carry.summary = finished(context, summary)


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
    bundles: PartBundles,
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
    resources = dict(bundles.work)
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
            "threads": bundles.work_threads,
            "parts": ray.put(parts) if parts is not None else None,
        },
        what="the fine-tune", name="finetune", storage=run_dir / "ray_train", workers=1, resources=resources,
        use_gpu=use_gpu, max_failures=config.cluster.max_restarts,
    )  # fmt: skip
    return result["summary"]
