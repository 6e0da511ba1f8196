"""Where a packet's time goes between two parts (``--trace-packets N``).

The sender's link thread and the receiver's thread each note the times of the
first N packets of a link, hop by hop; the driver pairs them by (kind, step)
and reports how long each hop took. On one host every process reads the same
clock (``time.time``), so the hop between processes (the queue) is measured
too; across hosts it holds their clocks' offset.

A sent row is ``[step, kind, bytes, weight syncs, *SENT_HOPS]``, a received row
``[step, kind, weight syncs, *RECEIVED_HOPS]``; a hop never reached is None (a
latent lost to an outage was never stored; one superseded by a newer latent,
``--full drop-oldest``, was never taken). ``handed``: the part hands the packet
to its link; ``picked``: the link's thread takes it up.
"""

from __future__ import annotations

import math
from typing import Any

SENT_HOPS = ("handed", "picked", "wired", "stored", "queued")
RECEIVED_HOPS = ("got", "arrived", "latent_fetched", "weights_fetched", "ready", "taken")
SENT_AT = {name: 4 + i for i, name in enumerate(SENT_HOPS)}
RECEIVED_AT = {name: 3 + i for i, name in enumerate(RECEIVED_HOPS)}

# (segment, from, to): the hops of one side, or from one side to the other. The
# sender's put and the receiver's get overlap (the queue may answer the get
# before the put returns), so the queue's segment starts where the put does.
SEGMENTS = (
    ("waiting for the link thread", "handed", "picked"),
    ("on the emulated wire", "picked", "wired"),
    ("off the device, into the object store", "wired", "stored"),
    ("the sender's put", "stored", "queued"),
    ("from put to get", "stored", "got"),
    ("waiting out the emulated latency", "got", "arrived"),
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
    groups: dict[str, dict[str, list[float]]] = {"latent only": {}, "with weights": {}}
    for match, row in paired(sent, received):
        group = groups["with weights" if row[2] else "latent only"]  # what the receiver fetched
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


def _once(rows: list[list[Any]]) -> dict[tuple[str, int], list[Any]]:
    """Rows by (kind, step), leaving out a key that occurs twice: a restarted
    sender sends its steps again, and a restarted receiver gets the end again."""
    seen: dict[tuple[str, int], list[Any] | None] = {}
    for row in rows:
        key = (row[1], row[0])
        seen[key] = None if key in seen else row
    return {key: row for key, row in seen.items() if row is not None}


def paired(sent: list[list[Any]], received: list[list[Any]]) -> list[tuple[list[Any], list[Any]]]:
    """The packets both ends traced once, as (sent row, received row). A packet
    dropped on its way (an outage, a full queue) has no received row."""
    by_packet = _once(sent)
    return [(by_packet[key], row) for key, row in _once(received).items() if key in by_packet]


def packet_trace(sent: list[list[Any]], received: list[list[Any]]) -> dict[str, Any]:
    """One boundary's report: both ends' rows and the delays they show."""
    return {
        "sent_hops": ["step", "kind", "bytes", "weight syncs", *SENT_HOPS],
        "received_hops": ["step", "kind", "weight syncs", *RECEIVED_HOPS],
        "sent": sent,
        "received": received,
        "paired": len(paired(sent, received)),
        "delays": packet_delays(sent, received),
    }
