"""The pipeline-parallel rival: the same model cut at the same boundary as the
parts, trained end to end with exact gradients.

Each stage holds a contiguous slice of the model. A batch is cut into
micro-batches; their activations go forward over the link and the gradients of
those activations come back over it, and every stage updates once per batch,
after its last micro-batch: the gradients are those of end-to-end training
(``tests/test_pipeline_parallel.py`` checks them in float64). Two schedules
order a stage's work:

- ``gpipe``: every micro-batch forward, then every one backward;
- ``1f1b``: stage s runs S - s - 1 forwards ahead, then one backward after each
  forward (the same gradients, fewer activations held).

The e2e objective is a sum over stages: each stage's log-dets (the first also
the dequantisation constant), the last stage's prior of its output. A stage's
backward therefore starts from its own terms plus the gradient of everything
downstream with respect to its output, which the next stage sends back.

``torch.distributed.pipelining`` (``PipelineStage``, ``ScheduleGPipe``,
``Schedule1F1B``) moves activations with the process group's point-to-point
sends, which offer no hook to delay them as DDP's comm hooks do, so its traffic
cannot cross this project's emulated link; the stages here use the link layer
the parts use (``LinkSender``, ``LinkReceiver``), in both directions, lossless:
an outage delays a message until the link is back, never loses it, as DDP's
buckets wait (a pipeline cannot train without every micro-batch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from raylocal.baselines.guard import NonFiniteGuard
from raylocal.core.config import RaylocalConfig
from raylocal.core.faults import Straggler
from raylocal.core.tensors import tensor_bytes
from raylocal.errors import ClusterError
from raylocal.model.glow import Part
from raylocal.model.objectives import LN2, to_device, wait_for
from raylocal.pipeline.worker import to_wire
from raylocal.training.trainer import scheduled_lr

SCHEDULES = ("gpipe", "1f1b")


def stage_ops(schedule: str, stage: int, n_stages: int, micro: int) -> list[tuple[str, int]]:
    """The order of one stage's work on one batch: ("F", m) forwards micro-batch m,
    ("B", m) takes it backward. Both schedules take the micro-batches backward in
    the order they went forward, so every link delivers in the order it is read."""
    if schedule == "gpipe":
        return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]
    if schedule != "1f1b":
        raise ValueError(f"unknown pipeline schedule {schedule!r} (one of {', '.join(SCHEDULES)})")
    ahead = min(n_stages - stage - 1, micro)
    ops = [("F", m) for m in range(ahead)]
    for m in range(micro - ahead):
        ops += [("F", ahead + m), ("B", m)]
    return ops + [("B", m) for m in range(micro - ahead, micro)]


@dataclass
class StageStats:
    steps: int = 0
    compute_s: float = 0.0  # forward and backward
    wait_s: float = 0.0  # for an activation or a gradient to arrive
    send_s: float = 0.0  # for the link to take a message, still busy with the one before
    seconds: float = 0.0  # the stage's training, its links closed (not the draining after)
    bytes_forward: int = 0  # activations sent
    bytes_backward: int = 0  # gradients sent
    skipped: int = 0  # updates skipped, their gradient not finite
    losses: list[float] = field(default_factory=list)  # the stage's share of the e2e NLL (bits/dim), per batch


class PipelineStage:
    """One stage: its slice of the model, its optimizer, and what its micro-batches
    keep between their forward and their backward."""

    def __init__(self, part: Part, config: RaylocalConfig, lr: float, total_steps: int, micro: int) -> None:
        self.part, self.config, self.base_lr, self.micro = part, config, lr, micro
        self.total_steps = total_steps  # of the LR decay
        opt_cls = torch.optim.Adamax if config.schedule.optimizer == "adamax" else torch.optim.Adam
        self.optimizer = opt_cls(list(part.parameters()), lr=lr)
        self.saved: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # micro-batch -> (input, output, its terms)
        self.stats = StageStats()
        self._loss: Tensor | float = 0.0  # the batch's loss so far, on the device
        self.device = next(part.parameters()).device
        self.straggler = Straggler([], 0)  # build_stage gives a straggling stage its own
        self.guard = NonFiniteGuard(config.schedule.grad_clip, who="pipeline")

    @property
    def is_first(self) -> bool:
        return self.part.is_first

    @property
    def is_last(self) -> bool:
        return self.part.prior is not None

    def terms(self, y: Tensor, logdet: Tensor) -> Tensor:
        """This stage's share of the per-sample e2e NLL, in bits/dim of the image."""
        if self.is_first:
            logdet = logdet - self.part.data_dims * math.log(self.part.n_bins)
        if self.is_last:
            logdet = logdet + self.part.prior.log_prob(y)
        return -logdet / (self.part.data_dims * LN2)

    def forward(self, m: int, x: Tensor) -> Tensor:
        """Micro-batch m forward; returns the output for the next stage (detached)."""
        start = time.perf_counter()
        if not self.is_first:
            x = x.detach().requires_grad_(True)
        y, logdet = self.part(x)
        own = self.terms(y, logdet).mean() / self.micro  # the batch's loss is the mean over its micro-batches
        self.saved[m] = (x, y, own)
        self._loss = self._loss + own.detach().double()  # (read with the norm, in the update: one device wait)
        computed = time.perf_counter() - start
        self.stats.compute_s += computed
        self.straggler.after(computed)
        return y.detach()

    def backward(self, m: int, grad_output: Tensor | None = None) -> Tensor | None:
        """Micro-batch m backward from this stage's terms and ``grad_output`` (the
        gradient of everything downstream with respect to its output; none for the
        last stage); returns the gradient with respect to its input (none for the first)."""
        start = time.perf_counter()
        x, y, own = self.saved.pop(m)
        if grad_output is None:
            own.backward()
        else:
            torch.autograd.backward([own, y], [torch.ones_like(own), grad_output.to(y.dtype)])
        wait_for(y.device)  # (on a GPU the kernels run on: a straggler is slowed by what they take)
        computed = time.perf_counter() - start
        self.stats.compute_s += computed
        self.straggler.after(computed)
        return None if self.is_first else x.grad

    def update(self) -> None:
        """The batch's update, once every micro-batch has come back (GPipe's flush).
        Its gradient is clipped by this stage's norm, not the whole model's: the
        stages share no norm, as the parts do not."""
        start = time.perf_counter()
        params = [p for p in self.part.parameters() if p.grad is not None]
        cfg = self.config
        lr = scheduled_lr(
            self.base_lr, self.stats.steps, cfg.schedule.warmup_steps, self.total_steps, cfg.schedule.lr_schedule
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.guard.step(params, self.optimizer, self._loss, self.stats.steps):
            self.stats.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.losses.append(self.guard.last_loss)
        self.stats.steps += 1
        self._loss = 0.0
        wait_for(self.device)  # (the optimizer's kernels, launched, may not have run yet)
        computed = time.perf_counter() - start
        self.stats.compute_s += computed
        self.straggler.after(computed)


def check_stages_agree(steps: list[int]) -> None:
    """Every stage of a pipeline that ended without an error trained the same
    batches; one that stopped early met an end or a lost tensor on a link."""
    if len(set(steps)) > 1:
        raise ClusterError(f"the pipeline's stages trained {steps} batches each, not the same: a stage stopped early")


@dataclass
class StageLinks:
    """A stage's four link ends (None where it has no neighbour): activations
    from upstream and to downstream, gradients from downstream and to upstream."""

    activations_in: Any = None
    activations_out: Any = None
    gradients_in: Any = None
    gradients_out: Any = None


def _received(link: Any, stats: StageStats) -> Tensor | None:
    """The next tensor a link delivers; None once its sender has ended."""
    start = time.perf_counter()
    packet = link.get()
    stats.wait_s += time.perf_counter() - start
    return None if packet["kind"] == "end" else packet["latent"]


def _send(link: Any, tensor: Tensor, step: int, stats: StageStats) -> int:
    """Send ``tensor`` over ``link`` as the parts send their latents (``to_wire``: a
    copy, so that a view such as a Split's half carries only its own bytes; off a
    GPU without blocking, the link's thread waiting for it); returns its bytes."""
    sent, ready = to_wire(tensor, torch.float32)
    stats.send_s += link.send({"kind": "data", "step": step, "latent": sent, "ready": ready, "weights": None})
    return tensor_bytes(sent)


def train_stage(
    stage: PipelineStage,
    ops: list[tuple[str, int]],
    links: StageLinks,
    batches: Iterator[Tensor] | None,
    steps: int | None = None,
    budget: float | None = None,
) -> StageStats:
    """A stage's whole training, each batch as ``ops`` orders it. The first stage
    cuts the batches of ``batches`` into its micro-batches and decides when to
    stop (after ``steps`` batches, or the first batch past ``budget`` seconds);
    its end goes down the activation links, and every other stage stops when it
    arrives. A stage closes the links it sends on, so that when one fails, the
    end of its gradient link stops the stages upstream of it too; and it takes
    what its links still bring up to their ends, so that no neighbour that sends
    ahead (GPipe's forwards) waits forever for room on a stage that has stopped."""
    start = time.perf_counter()
    try:
        while _batch(stage, ops, links, batches):
            if steps is not None and stage.stats.steps >= steps:
                break
            # only the first stage keeps time: a later one that stopped on its own clock
            # would leave the first waiting for gradients of a batch it already sent
            if budget is not None and batches is not None and time.perf_counter() - start >= budget:
                break
    finally:
        for link in (links.activations_out, links.gradients_out):
            if link is not None:
                link.close()
        stage.stats.seconds = time.perf_counter() - start
        for link in (links.activations_in, links.gradients_in):
            if link is not None:
                link.drain()
    return stage.stats


def _batch(
    stage: PipelineStage, ops: list[tuple[str, int]], links: StageLinks, batches: Iterator[Tensor] | None
) -> bool:
    """One batch through this stage; False when upstream or downstream has ended instead."""
    micro = list(next(batches).chunk(stage.micro)) if batches is not None else []
    for op, m in ops:
        tag = stage.stats.steps * stage.micro + m
        if op == "F":
            x = micro[m] if stage.is_first else _received(links.activations_in, stage.stats)
            if x is None:
                return False
            y = stage.forward(m, to_device(x, stage.device))
            if not stage.is_last:
                stage.stats.bytes_forward += _send(links.activations_out, y, tag, stage.stats)
        else:
            grad = None if stage.is_last else _received(links.gradients_in, stage.stats)
            if grad is None and not stage.is_last:
                return False  # downstream ended early: a stage failed, and its error ends the run
            grad_input = stage.backward(m, None if grad is None else to_device(grad, stage.device))
            if not stage.is_first:
                stage.stats.bytes_backward += _send(links.gradients_out, grad_input, tag, stage.stats)
    stage.update()
    return True
