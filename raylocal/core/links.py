"""Emulated network links between neighbouring parts (and between DDP / local-SGD workers).

A link spec is a comma-separated list of properties; ``|`` gives one spec per
boundary (a single spec applies to every boundary):

  ``up``                       an ideal link: infinite bandwidth, no latency, never down
  ``bw=10Mbit``                bandwidth (``Kbit``, ``Mbit``, ``Gbit``, ``bit``; ``inf``)
  ``lat=20ms``                 one-way latency (``us``, ``ms``, ``s``)
  ``p=0.9``                    up with probability 0.9 at each of the sender's steps (seeded)
  ``outage=100:20,300:50``     down for the sender's steps 100-119 and 300-349
  ``mtbf=60s,mttr=15s``        down at random times: exponential up and down periods (seeded)
  ``eff=0.9``                  the share of the bandwidth a message's bytes get (headers, acks, TCP)
  ``msg=1.5ms``                the time each message costs beyond its bytes (its envelope, its calls)

They compose: ``bw=10Mbit,lat=20ms,mtbf=60s,mttr=15s``. The step-based
availabilities (``p``, ``outage``) are deterministic and meant for tests; the
time-based one models a real intermittent connection. ``eff`` and ``msg`` are
a real link's costs beyond the payload's bytes, as measured on kernel-shaped
links (``raylocal.tools.wire_costs``); without them the wire carries payload
only.

``Wire`` is the timing of one direction of a link: a message of B bytes
occupies it for B/(bw·eff) + msg (messages are serialised: one wire) and arrives ``lat``
after it left. Nothing crosses while the link is down: a message that starts
in an outage, or that an outage interrupts, is lost. Time comes from a
``Clock``, so that tests can inject one and never sleep.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field

from raylocal.errors import ConfigError

_BITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}
_KEYS = ("bw", "lat", "p", "outage", "mtbf", "mttr", "eff", "msg")


class Clock:
    """Wall-clock time, shared by every process on a host (a packet's arrival
    time is set by its sender and awaited by its receiver)."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, when: float) -> None:
        self.sleep(when - self.now())


class FakeClock(Clock):
    """A clock for tests: ``sleep`` advances time at once. Threads that share
    it should wait with ``sleep_until``, which never moves time backwards."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.t += max(seconds, 0.0)

    def sleep_until(self, when: float) -> None:
        with self._lock:
            self.t = max(self.t, when)


SYSTEM_CLOCK = Clock()


def _number(text: str, key: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"link {spec!r}: {key}={text} is not a number >= 0")
    return value


def _share(text: str) -> float:
    """A number for a share in (0, 1], or NaN (which the caller refuses)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _with_unit(text: str, key: str, spec: str, units: dict[str, float], example: str) -> float:
    m = re.fullmatch(r"([0-9.eE+-]+)\s*([A-Za-z]+)", text)
    if not m or m.group(2).lower() not in units:
        raise ConfigError(f"link {spec!r}: {key}={text} needs a unit, e.g. {key}={example}")
    return _number(m.group(1), key, spec) * units[m.group(2).lower()]


@dataclass
class TimedOutages:
    """Alternating up and down periods with exponential lengths (mean ``mtbf`` up,
    ``mttr`` down), starting up at time 0; generated lazily and reproducibly."""

    mtbf: float
    mttr: float
    seed: int
    _changes: list[float] = field(default_factory=list)  # times where the state flips; even index: goes down
    _rng: random.Random | None = None

    def _extend(self, t: float) -> None:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        while not self._changes or self._changes[-1] <= t:
            last = self._changes[-1] if self._changes else 0.0
            mean = self.mtbf if len(self._changes) % 2 == 0 else self.mttr
            self._changes.append(last + self._rng.expovariate(1.0 / mean))

    def is_up(self, t: float) -> bool:
        self._extend(t)
        return bisect.bisect_right(self._changes, t) % 2 == 0

    def next_change(self, t: float) -> float:
        """The first time after ``t`` at which the link goes down or comes back."""
        self._extend(t)
        return self._changes[bisect.bisect_right(self._changes, t)]

    def down_fraction(self) -> float:
        return self.mttr / (self.mtbf + self.mttr)


@dataclass(frozen=True)
class LinkSpec:
    """What one link is: bandwidth, latency and when it is up."""

    bandwidth: float = math.inf  # bits per second
    latency: float = 0.0  # seconds, one way
    p: float = 1.0  # per-step availability
    outages: tuple[tuple[int, int], ...] = ()  # (first step, length)
    mtbf: float | None = None  # seconds
    mttr: float | None = None
    seed: int = 0
    text: str = "up"
    efficiency: float = 1.0  # the share of the bandwidth that payload gets
    per_message: float = 0.0  # seconds each message costs beyond its bytes

    @classmethod
    def parse(cls, text: str, boundary: int = 0, seed: int = 0) -> LinkSpec:
        specs = [s.strip() for s in text.split("|")]
        if len(specs) > 1 and boundary >= len(specs):
            raise ConfigError(f"link {text!r} has {len(specs)} boundaries, boundary {boundary + 1} has none")
        spec = specs[0] if len(specs) == 1 else specs[boundary]
        values: dict = {"seed": seed * 1_000_003 + boundary, "text": spec}
        if spec == "up":
            return cls(**values)
        items: list[list[str]] = []
        for token in (t.strip() for t in spec.split(",")):
            if re.fullmatch(r"\d+:\d+", token) and items and items[-1][0] == "outage":
                items[-1][1] += "," + token  # outage=100:20,300:50 continues over the comma
                continue
            key, eq, value = token.partition("=")
            if not eq or not value:
                raise ConfigError(f"link {spec!r}: {token!r} is not KEY=VALUE (keys: {', '.join(_KEYS)}; or 'up')")
            items.append([key.strip(), value.strip()])
        keys = [key for key, _ in items]
        for key in keys:
            if keys.count(key) > 1:
                raise ConfigError(f"link {spec!r}: {key} is given twice")
        for key, value in items:
            if key == "bw":
                values["bandwidth"] = math.inf if value == "inf" else _with_unit(value, key, spec, _BITS, "10Mbit")
                if values["bandwidth"] <= 0:
                    raise ConfigError(f"link {spec!r}: bw={value} must be more than 0")
            elif key == "lat":
                values["latency"] = _with_unit(value, key, spec, _SECONDS, "20ms")
            elif key == "msg":
                values["per_message"] = _with_unit(value, key, spec, _SECONDS, "1.5ms")
            elif key == "eff":
                values["efficiency"] = _share(value)
                if not 0 < values["efficiency"] <= 1:
                    raise ConfigError(f"link {spec!r}: eff={value} must be in (0, 1]")
            elif key in ("mtbf", "mttr"):
                values[key] = _with_unit(value, key, spec, _SECONDS, "60s")
                if values[key] <= 0:
                    raise ConfigError(f"link {spec!r}: {key}={value} must be more than 0")
            elif key == "p":
                values["p"] = _number(value, key, spec)
                if not 0 < values["p"] <= 1:
                    raise ConfigError(f"link {spec!r}: p must be in (0, 1]")
            elif key == "outage":
                if not re.fullmatch(r"\d+:\d+(,\d+:\d+)*", value):
                    raise ConfigError(f"link {spec!r}: outage={value} is not START:LEN,START:LEN,...")
                outages = tuple(tuple(int(v) for v in o.split(":")) for o in value.split(","))
                if any(length <= 0 or start <= 0 for start, length in outages):
                    raise ConfigError(f"link {spec!r}: outages need a start >= 1 and a length >= 1")
                values["outages"] = outages
            else:
                raise ConfigError(f"link {spec!r}: unknown property {key!r} ({', '.join(_KEYS)})")
        if ("mtbf" in values) != ("mttr" in values):
            raise ConfigError(f"link {spec!r}: random outages need both mtbf and mttr")
        return cls(**values)

    @property
    def ideal(self) -> bool:
        """Infinitely fast and never down: the wire needs no thread of its own."""
        return math.isinf(self.bandwidth) and self.latency == 0 and self.per_message == 0 and self.always_up

    @property
    def always_up(self) -> bool:
        return self.p == 1.0 and not self.outages and self.mtbf is None

    def up_at_step(self, step: int) -> bool:
        """The step-based availability at the sender's step."""
        if self.outages and any(start <= step < start + length for start, length in self.outages):
            return False
        return self.p >= 1.0 or random.Random(self.seed * 7_919 + step).random() < self.p

    def transfer_s(self, nbytes: int) -> float:
        """How long one message of ``nbytes`` occupies the wire."""
        return nbytes * 8 / (self.bandwidth * self.efficiency) + self.per_message

    def timed_outages(self) -> TimedOutages | None:
        if self.mtbf is None or self.mttr is None:
            return None
        return TimedOutages(self.mtbf, self.mttr, self.seed)


class Wire:
    """One direction of a link, used by one thread at a time. ``transmit``
    schedules a message like a discrete-event simulation: it starts when it is
    handed over or when the wire is free, whichever is later (messages are
    serialised: one wire), occupies the wire for B/(bw·eff) + msg, and arrives ``lat``
    after its last byte left. The calling thread sleeps until the wire is free
    again; waiting out the latency is the receiver's business."""

    def __init__(self, spec: LinkSpec, clock: Clock = SYSTEM_CLOCK, origin: float | None = None) -> None:
        self.spec = spec
        self.clock = clock
        # when its timed outages start counting: now, or a time the wires of one link share
        self.origin = clock.now() if origin is None else origin
        self.outages = spec.timed_outages()
        self.free_at = -math.inf  # when the last message's last byte left
        self._tried_at = -math.inf  # when the last message tried to start

    def up(self, step: int | None = None, at: float | None = None) -> bool:
        if step is not None and not self.spec.up_at_step(step):
            return False
        t = self.clock.now() if at is None else at
        return self.outages is None or self.outages.is_up(t - self.origin)

    def _start(self, at: float | None) -> float:
        return max(self.clock.now() if at is None else at, self.free_at)

    def transmit(self, nbytes: int, step: int | None = None, at: float | None = None) -> float | None:
        """Send ``nbytes`` handed over at ``at`` (default: now); the arrival time,
        or None when the link is down then or goes down before the last byte
        is out (the message is lost)."""
        start = self._start(at)
        self._tried_at = start
        if not self.up(step, start):
            return None
        end = start + self.spec.transfer_s(nbytes)
        if self.outages is not None:
            cut = self.outages.next_change(start - self.origin) + self.origin  # the next change is a failure
            if cut < end:
                self.free_at = cut
                self.clock.sleep_until(cut)
                return None
        self.free_at = end
        self.clock.sleep_until(end)
        return end + self.spec.latency

    def deliver(self, nbytes: int, at: float | None = None) -> float:
        """Like ``transmit``, but a message that an outage stops is sent again once
        the link is back (weight syncs, DDP buckets): returns its arrival time.
        Only the time-based availability applies (a step has no place here)."""
        t = self._start(at)
        while True:
            arrival = self.transmit(nbytes, at=t)
            if arrival is not None:
                return arrival
            assert self.outages is not None  # only a timed outage stops a message here
            # Try again once the outage that stopped it is over. Its end comes from the
            # outage list itself, nudged past it: a time shifted by the origin can round
            # to just before a change and would find the same outage again forever.
            tried = self._tried_at - self.origin
            down_at = tried if not self.outages.is_up(tried) else self.outages.next_change(tried)
            t = self.origin + self.outages.next_change(down_at) + 1e-5
            self.clock.sleep_until(t)


# What one message of each kind costs on a real, kernel-shaped link beyond its
# bytes (``raylocal.tools.wire_costs``; docs/benchmarks.md, "What one message
# costs"): per bandwidth in bit/s, c (its time per second of its bytes' time at
# the bandwidth) and d (ms per message).
MESSAGE_COSTS = {
    "Ray object": {1e8: (1.00, 1.6), 1e7: (1.05, 1.5), 1e6: (1.11, 15.7)},
    "actor call": {1e8: (0.49, 0.7), 1e7: (1.04, 0.6), 1e6: (1.04, 4.3)},
    "gloo all-reduce": {1e8: (1.03, 1.0), 1e7: (1.11, 0.7), 1e6: (1.17, 4.7)},
}
# What one emulated message of each schedule is on a real link, its bulk first: a
# part's or a pipeline stage's packet is fetched as a Ray object after the queue's
# put and get; a DDP bucket and a local-SGD round are one all-reduce each.
REAL_MESSAGES = {
    "async": ("Ray object", "actor call", "actor call"),
    "pipeline": ("Ray object", "actor call", "actor call"),
    "data-parallel": ("gloo all-reduce",),
}


def with_real_costs(text: str, schedule: str) -> str:
    """Each boundary of link ``text`` also charging what ``schedule``'s messages
    were measured to cost on a real link at its bandwidth: the bulk's c as
    ``eff`` = 1/c and the message's d as ``msg``. An infinite bandwidth was not
    measured and is charged nothing; another unmeasured one is refused."""
    kinds = REAL_MESSAGES.get(schedule)
    if kinds is None:
        return text
    specs = []
    for boundary, spec in enumerate(text.split("|")):
        bandwidth = LinkSpec.parse(text, boundary).bandwidth
        if math.isinf(bandwidth):
            specs.append(spec)
            continue
        measured = MESSAGE_COSTS[kinds[0]]
        if bandwidth not in measured:
            known = ", ".join(f"{b / 1e6:g}Mbit" for b in measured)
            raise ConfigError(f"link {spec.strip()!r}: no measured costs at its bandwidth (measured at {known})")
        per_message_ms = sum(MESSAGE_COSTS[kind][bandwidth][1] for kind in kinds)
        specs.append(f"{spec.strip()},eff={1 / measured[bandwidth][0]:.4f},msg={per_message_ms:g}ms")
    return "|".join(specs)


def check_links(text: str, n_parts: int, timed_by: str | None = None) -> None:
    """Every boundary's spec parses and there is one per boundary. ``timed_by``
    names what also sends over the link by the clock, not numbered by a part's
    step (a rival, a DDP fine-tune): then the step-based ``p`` and ``outage``
    are refused, as they would do nothing there."""
    for b in range(max(n_parts - 1, 1)):
        spec = LinkSpec.parse(text, b)
        if timed_by and (spec.p < 1.0 or spec.outages):
            raise ConfigError(
                f"link {text!r}: p= and outage= count a part's steps, but {timed_by} sends by the clock; "
                "use mtbf= and mttr="
            )
    if "|" in text and len(text.split("|")) != n_parts - 1:
        raise ConfigError(f"link {text!r} names {len(text.split('|'))} boundaries, {n_parts} parts have {n_parts - 1}")


def parse_link(text: str) -> str:
    """Validate every boundary of a link spec (for the config's validator)."""
    for boundary in range(len(text.split("|"))):
        LinkSpec.parse(text, boundary)
    return text
