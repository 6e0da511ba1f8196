"""What a Ray run checks and plans in the driver before it starts anything.

The checks read the config (and the images' shape) alone: no tensor is made
and Ray is not needed, so a spec that does not fit the model, a link or fault
for a part that does not exist, fails in one line at once, before a placement
group, an actor or a run directory exists. ``plan_ray_run`` then joins Ray and
plans, once, what the run asks of the cluster (``PartBundles.check``: can the
bundles be placed at all?), so that the run's phases are handed a ``Placement``
and never read the cluster or plan again.
"""

from __future__ import annotations

from raylocal.cluster.connect import connect, node_images
from raylocal.cluster.placement import PartBundles, Placement, WorkerBundles, require_gpu_share
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData
from raylocal.core.faults import parse_faults
from raylocal.core.links import check_links
from raylocal.errors import ConfigError
from raylocal.model.glow import GlowLayout
from raylocal.model.parts import PartSpec, resolve_part_spec
from raylocal.training.trainer import check_image_shape, resolve_device


def planned_spec(config: RaylocalConfig, image_shape: tuple[int, int, int]) -> PartSpec:
    """The parts the run would train, read from the config against the model's
    layout (an automatic split on estimated costs: ``--balance measure`` only
    moves its boundaries, never makes a valid count invalid)."""
    check_image_shape(image_shape, config.model.n_levels)
    layout = GlowLayout.of(image_shape, config.model.n_levels, config.model.depth, config.model.hidden)
    if config.one_part():
        return PartSpec(((0, len(layout)),))
    return resolve_part_spec(layout, config.parts.count, config.parts.split, config.parts.part_spec)


def check_faults(config: RaylocalConfig, n_parts: int, unit: str = "part") -> None:
    """Every injected fault names a part (or a data-parallel ``unit``: a worker)
    that exists (part K+1, the fine-tune, takes a sigkill)."""
    for fault in parse_faults(config.run.inject or ""):
        finetune = fault.kind == "sigkill" and config.schedule.finetune_epochs > 0
        if fault.part >= n_parts + finetune:
            also = f", and the fine-tune as part {n_parts + 1}" if finetune else ""
            raise ConfigError(
                f"inject {fault.kind}:{fault.part + 1}@{fault.at:g}: there is no {unit} {fault.part + 1} "
                f"(the run has {n_parts} {unit}s{also})"
            )


def check_run(config: RaylocalConfig, image_shape: tuple[int, int, int]) -> PartSpec:
    """All the driver can check of a run before Ray: parts, links and faults."""
    spec = planned_spec(config, image_shape)
    check_links(config.links.link, len(spec), timed_by=timed_traffic(config))
    check_faults(config, len(spec))
    return spec


def check_driver_device(config: RaylocalConfig) -> None:
    """A rival's model is evaluated, sampled and checkpointed in the driver once
    its workers are done: a driver that cannot use ``--device`` fails now, not
    after the training (a GPU cluster's head often has no GPU)."""
    try:
        resolve_device(config.cluster.device)
    except ConfigError:
        raise ConfigError(
            f"device {config.cluster.device!r}: a {config.schedule.name} run evaluates its model in the driver, "
            "which sees no GPU; --device auto trains on the cluster's GPUs and evaluates on the driver's CPU"
        ) from None


def timed_traffic(config: RaylocalConfig) -> str | None:
    """What in this run crosses the link by the clock rather than by a part's step, if anything."""
    if config.schedule.name in ("pipeline", "data-parallel"):
        return f"a {config.schedule.name} run"
    if config.schedule.finetune_epochs and config.cluster.finetune_workers > 1:
        return f"its DDP fine-tune (finetune_workers={config.cluster.finetune_workers})"
    return None


def plan_ray_run(config: RaylocalConfig, data: ImageData, with_service: bool = True) -> Placement:
    """Check the run (its parts or workers, links and faults), join Ray, and plan
    its bundles on the live cluster: what every Ray run does first, once."""
    if config.schedule.name == "data-parallel":
        check_image_shape(data.shape, config.model.n_levels)
        check_links(config.links.link, 2, timed_by=timed_traffic(config))  # one link between any two workers
        check_faults(config, config.cluster.workers, "worker")
        spec = None
    else:
        spec = check_run(config, data.shape)
    if config.schedule.name in ("data-parallel", "pipeline"):
        check_driver_device(config)
    connect(config)
    images = node_images(config, data.train) if spec is not None else None  # (DDP's workers load their own)
    parts = workers = None
    if spec is not None:
        parts = PartBundles.plan(config, len(spec))
        require_gpu_share(config, parts.part_gpus, "the stages" if config.schedule.name == "pipeline" else "the parts")
        parts.check(with_service=with_service and config.schedule.name == "async")
    if config.schedule.name == "data-parallel":
        workers = WorkerBundles.plan(config, config.cluster.workers, config.cluster.cpus_per_part)
    elif config.schedule.name == "async" and config.schedule.finetune_epochs and config.cluster.finetune_workers > 1:
        workers = WorkerBundles.plan(config, config.cluster.finetune_workers)  # after the parts: all of it
    if workers is not None:
        workers.check()
    return Placement(parts, workers, images)
