"""The whole model on one device, for weights trained elsewhere: it plans the
parts and evaluates assembled weights. The async run's model service, a Tune
trial's evaluations and the benchmarks' final evaluations are all this one."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from raylocal.core.config import RaylocalConfig
from raylocal.core.tensors import tensor_bytes
from raylocal.training.schedules import part_spec_for
from raylocal.training.trainer import build_glow, configured_bpd, resolve_device


class ModelService:
    """The whole model on one device, for a driver that does no tensor work of
    its own: it plans the parts (``--balance measure`` times the layers on the
    device that trains them) and evaluates weights trained elsewhere."""

    def __init__(self, config: RaylocalConfig, image_shape: tuple[int, int, int], device: str) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.glow = build_glow(config, image_shape).to(self.device)

    def plan(self, train_images: Tensor) -> dict[str, Any]:
        """The run's parts: their bounds, canonical form, and the model's parameter bytes."""
        spec = part_spec_for(self.config, self.glow, train_images)
        return {
            "bounds": [list(b) for b in spec.bounds],
            "canonical": spec.canonical(self.glow),
            "param_bytes": self.glow.param_bytes(),
            "part_param_bytes": [tensor_bytes(self.glow.part(start, stop).state_dict()) for start, stop in spec.bounds],
        }

    def evaluate(self, test_images: Tensor, state: dict[str, Tensor]) -> float:
        """Test BPD of the assembled weights ``state``."""
        self.glow.load_state_dict(state)
        return configured_bpd(self.config, self.glow, test_images, self.device)


def assembled(states: list[dict[str, Any]], glow: torch.nn.Module, bounds: list) -> dict[str, Tensor]:
    """The whole model's state dict from part checkpoints: each part's own layers
    from its own checkpoint (the rest of a checkpoint is its stale upstream copy)."""
    out: dict[str, Tensor] = {}
    for (start, stop), state in zip(bounds, states):
        out.update({name: state["model"][name] for name in glow.part(start, stop).state_dict()})
    return out
