"""The pipeline-parallel rival on Ray: one actor per stage, placed as the parts
are (``PartBundles``), and at every boundary two latent queues, activations
forward and gradients back, each behind the parts' emulated link
(``LinkSender`` and ``LinkReceiver`` on ``--link``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylocal.baselines.pipeline_parallel import PipelineStage, StageLinks, check_stages_agree, stage_ops, train_stage
from raylocal.cluster.connect import errors_in_one_line
from raylocal.cluster.parts_phase import get_or_none
from raylocal.cluster.placement import PartBundles, actor_device
from raylocal.cluster.queue import LatentQueue
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import BatchStream, NodeImages, training_images
from raylocal.core.faults import Straggler, parse_faults
from raylocal.core.links import SYSTEM_CLOCK, Clock, LinkSpec
from raylocal.core.runlog import peak_rss_mb
from raylocal.model.objectives import preprocess, to_device
from raylocal.pipeline.worker import LinkReceiver, LinkSender, WorkerStats
from raylocal.training.service import ModelService
from raylocal.training.trainer import LRClock, build_glow, initialize


def build_stage(
    config: RaylocalConfig, bounds: list[tuple[int, int]], index: int, images: torch.Tensor, micro: int, device: Any
) -> tuple[PipelineStage, Iterator[torch.Tensor] | None]:
    """Stage ``index`` as every process builds it: the whole model from the seed,
    ActNorm's data init through every stage in order (as e2e's run makes it), then
    its own slice; the first stage also gets the run's batches (e2e's, in order)."""
    glow = build_glow(config, tuple(images.shape[1:])).to(device)
    parts = [glow.part(a, b) for a, b in bounds]
    noise = torch.Generator().manual_seed(config.schedule.seed + 1)
    initialize(parts, preprocess(images[: config.schedule.init_batch_size].to(device), config.model.n_bits, noise))
    stream = BatchStream(images, config.schedule.batch_size, config.schedule.seed)
    total = LRClock.of(config, len(stream), config.schedule.epochs, 0).decay(config.schedule.epochs * len(stream))
    lr = config.part_lrs(len(parts))[index] if len(config.schedule.lr) > 1 else config.schedule.lr[0]
    stage = PipelineStage(parts[index], config, lr, total, micro)
    stage.straggler = Straggler(parse_faults(config.run.inject or ""), index)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            yield preprocess(to_device(stream.next(), device), config.model.n_bits, noise)

    return stage, batches() if index == 0 else None


def stage_links(
    config: RaylocalConfig,
    k: int,
    n: int,
    queues: list[Any],
    stats: list[WorkerStats],
    origin: float,
    put: Callable[[Any], Any],
    get: Callable[[Any], Any],
    clock: Clock = SYSTEM_CLOCK,
) -> StageLinks:
    """Stage ``k``'s ends of its boundaries' links: at boundary k-1 its activations
    come in and their gradients go back (``stats[0]``), at boundary k the reverse
    (``stats[1]``). Queue 2b carries boundary b's activations, 2b+1 its gradients.
    Both directions of a boundary are one link: the same spec, and outages timed
    from the one ``origin`` the driver chose, so that an outage cuts both at once
    (on two nodes, to within their clocks' skew, as every arrival time is)."""

    def sender(queue: Any, boundary: int, counted: WorkerStats) -> LinkSender:
        spec = LinkSpec.parse(config.links.link, boundary, config.schedule.seed)
        return LinkSender(queue, spec, put, counted, k, clock=clock, lossless=True, origin=origin)

    links = StageLinks()
    if k > 0:
        links.activations_in = LinkReceiver(queues[2 * (k - 1)], get, clock)
        links.gradients_out = sender(queues[2 * (k - 1) + 1], k - 1, stats[0])
    if k < n - 1:
        links.activations_out = sender(queues[2 * k], k, stats[1])
        links.gradients_in = LinkReceiver(queues[2 * k + 1], get, clock)
    return links


@ray.remote
class StageActor:
    """A thin shell around one ``PipelineStage`` and its links."""

    def __init__(self, config_json: str, index: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.config = RaylocalConfig.model_validate_json(config_json)
        self.index, self.threads = index, threads

    def plan(self, images: torch.Tensor | NodeImages) -> dict[str, Any]:
        """The stages' bounds and their canonical form, planned in this stage's
        process as the model service plans the parts: ``--balance measure`` times
        the layers on the device the stages train on, not on the driver's."""
        torch.set_num_threads(self.threads)
        images = training_images(images)
        device = actor_device(self.config)
        plan = ModelService(self.config, tuple(images.shape[1:]), str(device)).plan(images)
        bounds = [tuple(b) for b in plan["bounds"]]
        return {"bounds": bounds, "canonical": plan["canonical"], "pid": os.getpid(), "device": str(device)}

    def build(self, bounds: list[tuple[int, int]], images: torch.Tensor | NodeImages, micro: int) -> None:
        """This stage, built and initialised, ready to train (``train``)."""
        torch.set_num_threads(self.threads)
        self.n = len(bounds)
        device = actor_device(self.config)
        self.stage, self.batches = build_stage(self.config, bounds, self.index, training_images(images), micro, device)

    def train(self, queues: list[LatentQueue], plan: dict[str, Any]) -> dict[str, Any]:
        """Train the built stage over its links, whose outages count from ``plan["origin"]``."""
        k, n, stage = self.index, self.n, self.stage
        link_stats = [WorkerStats(), WorkerStats()]  # one each: two link threads must not share a counter
        links = stage_links(self.config, k, n, queues, link_stats, plan["origin"], ray.put, get_or_none)
        ops = stage_ops(plan["schedule"], k, n, plan["micro"])
        stats = train_stage(stage, ops, links, self.batches, plan.get("steps"), plan.get("budget"))
        state = {name: t.detach().cpu() for name, t in stage.part.state_dict().items()}
        wire_bytes = sum(s.bytes_forward for s in link_stats)
        figures = {"stats": asdict(stats), "seconds": stats.seconds, "wire_bytes": wire_bytes}
        where = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        return figures | {"peak_rss_mb": peak_rss_mb(), "state": state} | where


def _on(pg: Any, bundle: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)


@dataclass
class PipelineResult:
    """What the pipeline's stages trained: the assembled weights, the bounds the
    first stage planned (their canonical form, and where they were planned),
    and each stage's figures (its stats, seconds, the bytes its links sent,
    its process and node; before the last, where its boundary's activation and
    gradient queues ran)."""

    state: dict[str, torch.Tensor]
    bounds: list[tuple[int, int]]
    canonical: str
    planned: dict[str, Any]
    stages: list[dict[str, Any]]


def train_pipeline_parallel(
    config: RaylocalConfig,
    bundles: PartBundles,
    train_images: Any,
    schedule: str = "1f1b",
    micro: int = 4,
    steps: int | None = None,
    budget: float | None = None,
) -> PipelineResult:
    """Train the model end to end as a pipeline of ``bundles.n_parts`` stages on
    Ray, placed as ``bundles`` say (checked, on a joined cluster:
    ``plan_ray_run``), for ``steps`` batches or ``budget`` seconds;
    ``train_images`` is what each stage is sent for its images. The first stage
    plans the bounds, as the model service plans the parts."""
    if config.schedule.batch_size % micro:
        raise ValueError(f"a batch of {config.schedule.batch_size} does not split into {micro} micro-batches")
    n = bundles.n_parts
    pg, first, own = bundles.reserve_parts()
    # each queue on the bundle of the stage that reads it (its blocking get()s stay on that node):
    # boundary k's activations on stage k + 1's, their gradients on stage k's
    readers = [first + k + 1 - j for k in range(n - 1) for j in (0, 1)]
    queues = [LatentQueue(config.links.queue_size, scheduling_strategy=_on(pg, b)) for b in readers]
    actors = []
    try:
        for k in range(n):
            strategy = _on(pg, first + k)
            options = {
                "num_cpus": bundles.part_cpus,
                "num_gpus": bundles.part_gpus,
                "scheduling_strategy": strategy,
                **bundles.shown_gpus(bundles.part_gpus),
            }
            actors.append(StageActor.options(**options).remote(config.model_dump_json(), k, bundles.threads))
        with errors_in_one_line():
            planned = ray.get(actors[0].plan.remote(train_images))
            bounds, canonical = planned.pop("bounds"), planned.pop("canonical")
            ray.get([a.build.remote(bounds, train_images, micro) for a in actors])
            # every stage built: the links' outages count from here, as the parts' from their start
            plan = {"schedule": schedule, "micro": micro, "steps": steps, "budget": budget}
            plan["origin"] = SYSTEM_CLOCK.now()
            results = ray.get([a.train.remote(queues, plan) for a in actors])
            for k in range(n - 1):  # where each boundary's two queues ran: on their readers' nodes
                results[k]["queue_nodes"] = [queues[2 * k].node_id(), queues[2 * k + 1].node_id()]
    finally:
        for a in actors:
            ray.kill(a)
        for q in queues:
            q.shutdown()
        if own:
            remove_placement_group(pg)
    check_stages_agree([r["stats"]["steps"] for r in results])
    state: dict[str, torch.Tensor] = {}
    for r in results:
        state.update(r.pop("state"))
    return PipelineResult(state, bounds, canonical, planned, results)
