"""The latent queue between two part actors: a ``PacketChannel`` in a small Ray
actor; and a ``Mailbox``, one value a worker hands back to the driver.

This module imports no torch, so the actors' processes start at once instead of
spending seconds importing it (one per boundary, every run).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raylocal.pipeline.channel import PacketChannel


@ray.remote(num_cpus=0, max_concurrency=8)  # blocked put()s and get()s each hold a thread
class _ChannelActor(PacketChannel):
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class LatentQueue:
    """A bounded FIFO of packets between two parts: a ``PacketChannel`` held by
    one small Ray actor. Only packets of object references pass through it;
    the latents themselves stay in the object store."""

    def __init__(self, maxsize: int, scheduling_strategy: Any = None) -> None:
        self.maxsize = maxsize
        self.actor = _ChannelActor.options(scheduling_strategy=scheduling_strategy).remote(maxsize)

    def put(self, packet: dict[str, Any]) -> None:
        ray.get(self.actor.put.remote(packet))

    def put_latest(self, packet: dict[str, Any]) -> int:
        return ray.get(self.actor.put_latest.remote(packet))

    def get(self) -> dict[str, Any]:
        return ray.get(self.actor.get.remote())

    def qsize(self) -> int:
        return ray.get(self.actor.qsize.remote())

    def node_id(self) -> str:
        """The node the queue's actor runs on: whether a part's calls to it cross a link."""
        return ray.get(self.actor.node_id.remote())

    def shutdown(self) -> None:
        ray.kill(self.actor)


@ray.remote(num_cpus=0)
class _MailboxActor:
    def __init__(self) -> None:
        self._value: Any = None

    def post(self, value: Any) -> None:
        self._value = value

    def take(self) -> Any:
        return self._value


class Mailbox:
    """One value a Ray Train worker hands back to the driver in memory (a summary,
    weights as bytes): a restarted worker's post replaces its earlier life's, and
    none waits for the driver, which reads it once the workers are done. It lives
    on the driver's node, so what it holds crosses no link on its way there."""

    def __init__(self) -> None:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = _MailboxActor.options(scheduling_strategy=here).remote()

    def post(self, value: Any) -> None:
        ray.get(self.actor.post.remote(value))

    def take(self) -> Any:
        """What was posted last; None if nothing was."""
        return ray.get(self.actor.take.remote())

    def shutdown(self) -> None:
        ray.kill(self.actor)
