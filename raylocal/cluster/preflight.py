"""What a Ray run checks in the driver before it starts anything.

Everything here reads the config (and the images' shape) alone: no tensor is
made and Ray is not needed, so a spec that does not fit the model, a link or
fault for a part that does not exist, fails in one line at once, before a
placement group, an actor or a run directory exists. The cluster's side
(can the bundles be placed at all?) is ``Placement.check`` (raylocal/cluster/placement.py).
"""

from __future__ import annotations

from raylocal.core.config import RaylocalConfig
from raylocal.core.faults import parse_faults
from raylocal.core.links import check_links
from raylocal.errors import ConfigError
from raylocal.model.glow import GlowLayout
from raylocal.model.parts import PartSpec, resolve_part_spec
from raylocal.training.trainer import check_image_shape


def planned_spec(config: RaylocalConfig, image_shape: tuple[int, int, int]) -> PartSpec:
    """The parts the run would train, read from the config against the model's
    layout (an automatic split on estimated costs: ``--balance measure`` only
    moves its boundaries, never makes a valid count invalid)."""
    check_image_shape(image_shape, config.n_levels)
    layout = GlowLayout.of(image_shape, config.n_levels, config.depth, config.hidden)
    if config.one_part():
        return PartSpec(((0, len(layout)),))
    return resolve_part_spec(layout, config.parts, config.split, config.part_spec)


def check_faults(config: RaylocalConfig, n_parts: int, unit: str = "part") -> None:
    """Every injected fault names a part (or a data-parallel ``unit``: a worker)
    that exists (part K+1, the fine-tune, takes a sigkill)."""
    for fault in parse_faults(config.inject or ""):
        finetune = fault.kind == "sigkill" and config.finetune_epochs > 0
        if fault.part >= n_parts + finetune:
            also = f", and the fine-tune as part {n_parts + 1}" if finetune else ""
            raise ConfigError(
                f"inject {fault.kind}:{fault.part + 1}@{fault.at:g}: there is no {unit} {fault.part + 1} "
                f"(the run has {n_parts} {unit}s{also})"
            )


def check_run(config: RaylocalConfig, image_shape: tuple[int, int, int]) -> PartSpec:
    """All the driver can check of a run before Ray: parts, links and faults."""
    spec = planned_spec(config, image_shape)
    check_links(config.link, len(spec), timed_by=timed_traffic(config))
    check_faults(config, len(spec))
    return spec


def timed_traffic(config: RaylocalConfig) -> str | None:
    """What in this run crosses the link by the clock rather than by a part's step, if anything."""
    if config.schedule in ("pipeline", "data-parallel"):
        return f"a {config.schedule} run"
    if config.finetune_epochs and config.finetune_workers > 1:
        return f"its DDP fine-tune (finetune_workers={config.finetune_workers})"
    return None
