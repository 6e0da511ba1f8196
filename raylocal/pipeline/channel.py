"""The bounded FIFO of packets between two parts, in plain Python.

It imports neither torch nor Ray: on Ray it lives in a small actor
(``raylocal.cluster.queue``) whose process then starts in a fraction of a
second instead of paying for a torch import.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


def newer_weights(*groups: dict[int, list[Any]] | None) -> dict[int, list[Any]]:
    """Merge {part: [version, payload, nbytes]} maps, keeping the newest version of each part."""
    merged: dict[int, list[Any]] = {}
    for group in groups:
        for j, entry in (group or {}).items():
            if int(j) not in merged or merged[int(j)][0] < entry[0]:
                merged[int(j)] = list(entry)
    return merged


class PacketChannel:
    """The bounded FIFO of packets between two parts: the queue whose bound is
    the pipeline's backpressure (plain Python; ``latent_queue`` keeps one in a
    small Ray actor). ``put`` waits for room; ``put_latest`` makes room by
    dropping the oldest data packets (their weights travel on with the new one)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._end: dict[str, Any] | None = None  # the sender's end packet, once a consumer has taken it

    def put(self, packet: dict[str, Any]) -> None:
        with self._cond:
            while len(self._items) >= self.maxsize:
                self._cond.wait()
            self._items.append(packet)
            self._cond.notify_all()

    def put_latest(self, packet: dict[str, Any]) -> int:
        """Put without waiting for room held by data packets; returns how many it dropped."""
        dropped = 0
        with self._cond:
            while len(self._items) >= self.maxsize:
                oldest = next((p for p in self._items if p.get("kind") == "data"), None)
                if oldest is None:  # only the init packet is there: it is taken at once
                    self._cond.wait()
                    continue
                self._items.remove(oldest)
                packet["weights"] = newer_weights(oldest.get("weights"), packet.get("weights")) or None
                dropped += 1
            self._items.append(packet)
            self._cond.notify_all()
        return dropped

    def get(self) -> dict[str, Any]:
        """The oldest packet. Once the sender's end has been taken, an empty channel
        answers with the end again: the sender is done for good, and a consumer
        restarted after its previous life took the end must not wait forever."""
        with self._cond:
            while not self._items and self._end is None:
                self._cond.wait()
            if not self._items:
                return dict(self._end)  # type: ignore[arg-type]
            packet = self._items.popleft()
            if packet.get("kind") == "end":
                self._end = packet
            self._cond.notify_all()
            return packet

    def qsize(self) -> int:
        return len(self._items)
