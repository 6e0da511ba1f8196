"""What each way of training over a link costs, on paper: bytes per step and step time.

From the config alone (no training): the bytes each sender puts on its link
per training step, and a model of each method's step time at a bandwidth and
latency, from which the bandwidth where a method loses 10% of its throughput
follows. ``scripts/bench_links.py --project-only`` prints them; the measured
race checks them.

The step-time models (``compute``: one device's seconds for a step of the
whole model, split evenly over the parts or stages; ``forward``: its forward
share, a third of it by default):

- parts, never waiting: each part computes its share and its link carries its
  bytes meanwhile: ``max(compute / K, bytes / bw)``;
- DDP with buckets overlapping the backward pass: ``forward + max(backward,
  bytes / bw + buckets x latency)``;
- local SGD, averaging blocking every H steps: ``compute + (bytes / bw +
  latency) / H`` (``bytes`` here: one average);
- a pipeline (GPipe, M micro-batches over K stages): its bubble, and the
  activations forward and their gradients back, which wait on each other:
  ``(M + K - 1) / M x compute / K + 2 x (activation bytes / bw + latency)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raylocal.core.config import RaylocalConfig
from raylocal.model.parts import resolve_part_spec
from raylocal.training.trainer import WIRE_DTYPES, build_glow


def ring_bytes(nbytes: float, world: int) -> float:
    """What each worker sends in a ring all-reduce of ``nbytes``: 2(N-1)/N of them."""
    return 2 * (world - 1) / world * nbytes if world > 1 else 0.0


@dataclass(frozen=True)
class WireBytes:
    """Bytes per training step on each method's busiest link."""

    parameters: int  # the model's, in numbers
    latents: float  # the parts' latents alone
    parts: float  # latents, weight syncs and the init packet, amortised over the run
    ddp: float
    local_sgd: float  # one average's bytes over H steps
    local_sgd_round: float  # one average
    pipeline: float  # activations forward and their gradients back


def wire_bytes_per_step(
    config: RaylocalConfig, image_shape: tuple[int, int, int], steps: int, workers: int = 2
) -> WireBytes:
    """Bytes per step from the config: at the busiest boundary of a
    ``config.parts``-way split, the latents (at ``config.wire_dtype``), the
    weights of every part upstream of it every ``sync_every`` steps, and the
    init packet (those weights once more) over ``steps``; a DDP worker's
    ring all-reduce of every gradient; a local-SGD worker's of the parameters
    every H steps; a pipeline's activations and their float32 gradients."""
    glow = build_glow(config, image_shape)
    params = glow.param_bytes()
    spec = resolve_part_spec(glow.layout, config.parts.count, config.parts.split, config.parts.part_spec)
    itemsize = WIRE_DTYPES[config.links.wire_dtype].itemsize
    busiest, latents, activations = 0.0, 0.0, 0.0
    upstream = 0
    with torch.no_grad():
        x = torch.zeros(1, *image_shape)
        for a, b in spec.bounds[:-1]:
            part = glow.part(a, b)
            x, _ = part(x)
            upstream += sum(p.numel() * p.element_size() for p in part.parameters())
            latent = x.numel() * itemsize
            per_step = latent * config.schedule.batch_size + upstream / config.links.sync_every
            per_step += upstream / max(steps, 1)  # the init packet: the upstream weights, once
            if per_step > busiest:
                busiest, latents = per_step, latent * config.schedule.batch_size
            activations = max(activations, x.numel() * 4 * config.schedule.batch_size)
    average = ring_bytes(params, workers)
    return WireBytes(
        parameters=params // 4,
        latents=latents,
        parts=busiest,
        ddp=ring_bytes(params, workers),
        local_sgd=average / max(config.cluster.average_every, 1),
        local_sgd_round=average,
        pipeline=2 * activations,
    )


@dataclass(frozen=True)
class StepModel:
    """One device's step of the whole model, and how the methods split it."""

    compute: float  # seconds
    parts: int = 2
    forward_share: float = 1 / 3
    buckets: int = 1
    average_every: int = 50
    micro_batches: int = 4

    def parts_step(self, b: WireBytes, bw: float, lat: float) -> float:
        return max(self.compute / self.parts, b.parts * 8 / bw)

    def ddp_step(self, b: WireBytes, bw: float, lat: float) -> float:
        forward = self.forward_share * self.compute
        return forward + max(self.compute - forward, b.ddp * 8 / bw + self.buckets * lat)

    def local_sgd_step(self, b: WireBytes, bw: float, lat: float) -> float:
        return self.compute + (b.local_sgd_round * 8 / bw + lat) / self.average_every

    def pipeline_step(self, b: WireBytes, bw: float, lat: float) -> float:
        m, k = self.micro_batches, self.parts
        return (m + k - 1) / m * self.compute / k + 2 * (b.pipeline / 2 * 8 / bw + lat)

    def methods(self) -> dict[str, Callable[[WireBytes, float, float], float]]:
        return {
            "parts": self.parts_step,
            "DDP": self.ddp_step,
            "local SGD": self.local_sgd_step,
            "pipeline": self.pipeline_step,
        }


def bandwidth_losing(step: Callable[[float], float], share: float = 0.1) -> float:
    """The bandwidth (bit/s) below which ``step(bw)`` is more than ``1 / (1 - share)``
    times its step on an infinitely fast link: where it has lost ``share`` of its
    throughput (bisection in log space; step times fall as bandwidth grows)."""
    target = step(float("inf")) / (1 - share)
    lo, hi = 1.0, 1e15  # bit/s
    if step(lo) <= target:
        return lo
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if step(mid) > target else (lo, mid)
    return hi
