"""Where a packet's time goes between two parts (``--trace-packets N``).

The sender's link thread and the receiver's thread each note the times of the
first N packets of a link, hop by hop; the driver pairs them by (kind, step)
and reports how long each hop took. On one host every process reads the same
clock (``time.time``), so the hop between processes (the queue) is measured
too; across hosts it holds their clocks' offset.

A sent row is ``[step, kind, bytes, weight syncs, *SENT_HOPS]``, a received row
``[step, kind, weight syncs, *RECEIVED_HOPS]``; a hop never reached is None (a
latent lost to an outage was never stored; one superseded by a newer latent,
``--full drop-oldest``, was never taken).
"""

from __future__ import annotations

import math
from typing import Any

SENT_HOPS = ("handed", "wired", "stored", "queued")
RECEIVED_HOPS = ("got", "arrived", "latent_fetched", "weights_fetched", "ready", "taken")
SENT_AT = {name: 4 + i for i, name in enumerate(SENT_HOPS)}
RECEIVED_AT = {name: 3 + i for i, name in enumerate(RECEIVED_HOPS)}

# (segment, from, to): each a hop's time on its own side, or across the queue
SEGMENTS = (
    ("on the emulated wire", "handed", "wired"),
    ("into the object store", "wired", "stored"),
    ("into the queue", "stored", "queued"),
    ("in the queue", "queued", "got"),
    ("emulated latency", "got", "arrived"),
    ("fetching the latent", "arrived", "latent_fetched"),
    ("fetching the weights", "latent_fetched", "weights_fetched"),
    ("waiting for the ready slot", "weights_fetched", "ready"),
    ("until the part took it", "ready", "taken"),
    ("handed to taken", "handed", "taken"),
)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (0 when there are no values)."""
    ordered = sorted(values)
    return ordered[min(int(math.ceil(q * len(ordered))) - 1, len(ordered) - 1)] if ordered else 0.0


def _time(sent: list[Any], received: list[Any], hop: str) -> float | None:
    return sent[SENT_AT[hop]] if hop in SENT_AT else received[RECEIVED_AT[hop]]


def packet_delays(sent: list[list[Any]], received: list[list[Any]]) -> dict[str, Any]:
    """Each segment's seconds (count, mean, min, p50, p95, max) over the packets both
    ends traced, apart for packets that carry weight syncs and those that do not."""
    by_packet = {(row[1], row[0]): row for row in sent}
    groups: dict[str, dict[str, list[float]]] = {"latent only": {}, "with weights": {}}
    for row in received:
        match = by_packet.get((row[1], row[0]))
        if match is None:
            continue
        group = groups["with weights" if match[3] else "latent only"]
        for name, start, end in SEGMENTS:
            t0, t1 = _time(match, row, start), _time(match, row, end)
            if t0 is not None and t1 is not None:
                group.setdefault(name, []).append(t1 - t0)
    return {
        label: {
            name: {
                "count": len(values),
                "mean": sum(values) / len(values),
                "min": min(values),
                "p50": percentile(values, 0.5),
                "p95": percentile(values, 0.95),
                "max": max(values),
            }
            for name, values in segments.items()
        }
        for label, segments in groups.items()
        if segments
    }


def packet_trace(sent: list[list[Any]], received: list[list[Any]]) -> dict[str, Any]:
    """One boundary's report: both ends' rows and the delays they show."""
    return {
        "sent_hops": ["step", "kind", "bytes", "weight syncs", *SENT_HOPS],
        "received_hops": ["step", "kind", "weight syncs", *RECEIVED_HOPS],
        "sent": sent,
        "received": received,
        "delays": packet_delays(sent, received),
    }
