"""Who sent what across a namespaced link: every TCP connection between two
nodes, its bytes and the processes at its ends.

The kernel's interface counters say how many bytes crossed; they do not say
for what. This reads each connection's own counters (``ss -tinp``: payload
bytes sent and received, segments) on both nodes, at intervals while a cell
runs, and names each end by its process: Ray's raylet and GCS, the driver, a
part's actor, the latent queue's actor. A connection opened and closed between
two samples is missed; the payload summed here, against the interface's
count, says how much was (what remains is the TCP/IP headers and such
connections).

    with ConnectionLedger(net, far=1) as ledger:
        ...                      # the traffic
    rows = ledger.rows()         # per pair of processes: bytes each way
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylocal.cluster.netns import Network
from raylocal.errors import ClusterError

# a connection's line: state, queues, its end and the peer's (IPv4 maybe shown as ``[::ffff:a.b.c.d]``), process
_END = r"\[?(?:::ffff:)?([^\s\]]+)\]?:(\d+)"
_ENDS = re.compile(rf"^\S+\s+\d+\s+\d+\s+{_END}\s+{_END}\s*(.*)$")
_PID = re.compile(r"pid=(\d+)")
_COUNTER = re.compile(r"\b(bytes_acked|bytes_received|bytes_retrans|segs_out|segs_in):(\d+)")
_FRESH = {"bytes_acked": 0, "bytes_received": 0, "bytes_retrans": 0, "segs_out": 0, "segs_in": 0}


def process_name(pid: int) -> str:
    """What a process is, from its command line: Ray's titles (``ray::PartActor.run``)
    by their class, its daemons by their program, a Python module by its name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0].removeprefix("ray::").split(".")[0] or "ray worker"
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # the interpreter's own flags
        rest = rest[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return rest[1].split(".")[-1]
    script = bool(rest) and (rest[0].endswith(".py") or _is_file(rest[0]))  # not ``-c``'s code
    return Path(rest[0]).stem if script else Path(words[0]).name


def idle_priority() -> None:
    """This thread, and every process it starts, runs only on a CPU that would
    otherwise idle (SCHED_IDLE): an instrument must not take the CPU from the niced
    Ray workers it measures (on 2 cores its ss processes cost the parts 5% of theirs)."""
    os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def _children_cpu_s() -> float:
    """CPU seconds of this process's ended (and reaped) child processes so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _is_file(word: str) -> bool:
    try:
        return Path(word).is_file()
    except OSError:  # a name too long to be a path (``-c``'s code)
        return False


_LISTENING = re.compile(r"^LISTEN\s+\d+\s+\d+\s+\S*:(\d+)\s+\S+\s+(.*)$")


class Names(dict):
    """pid → what the process is, kept up to date: a Ray worker is ``IDLE`` until
    it becomes an actor, and a process that has exited keeps its last name."""

    def see(self, pid: int) -> str:
        now = process_name(pid)
        if now not in ("gone", "IDLE") or pid not in self:
            self[pid] = now
        return self[pid]


Connections = dict[tuple[str, int, str, int], dict[str, Any]]


def snapshot(net: Network, k: int, peer: int, names: Names) -> tuple[Connections, dict[int, str]]:
    """Node k's TCP connections to node ``peer``, (address, port, peer, peer's port) →
    its process and counters (payload bytes and segments, each way); and its
    listening ports → the process listening there."""
    shown = net.run(k, ["ss", "-tainpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    return parse_connections(shown, net.address(k), net.address(peer), names), parse_listeners(shown, names)


def parse_listeners(shown: str, names: Names) -> dict[int, str]:
    """``ss -tainpH``'s text → the listening ports and their processes."""
    found: dict[int, str] = {}
    for line in shown.splitlines():
        ends, pid = _LISTENING.match(line), _PID.search(line)
        if ends and pid:
            found[int(ends.group(1))] = names.see(int(pid.group(1)))
    return found


def parse_connections(shown: str, address: str, peer_address: str, names: Names) -> Connections:
    """``ss -tainpH``'s text → the connections from ``address`` to ``peer_address``.
    A socket in TIME-WAIT has neither process nor counters: it is left out (the
    connection's last counts are those seen while it was open)."""
    found: Connections = {}
    key = None
    for line in shown.splitlines():
        if not line[:1].isspace():
            key = None
        ends = _ENDS.match(line)
        if ends and not line.startswith("TIME-WAIT"):
            here, port, peer, peer_port, users = ends.groups()
            if here == address and peer == peer_address:
                key = (here, int(port), peer, int(peer_port))
                pid = _PID.search(users)
                name = names.see(int(pid.group(1))) if pid else "kernel"  # kernel: its process has let it go
                found[key] = {"process": name, **_FRESH}
        elif key is not None:
            found[key].update({c: int(v) for c, v in _COUNTER.findall(line)})
    return found


@dataclass
class Seen:
    """One connection as sampled: its counters before the block (None: opened in
    it), and its counters and process as last seen."""

    base: dict[str, int] | None
    last: dict[str, Any]


@dataclass
class ConnectionLedger:
    """Samples the connections between node 0 and node ``far`` every ``every_s``
    seconds in a thread, from the start of the ``with`` block to its end."""

    net: Network
    far: int = 1
    every_s: float = 0.5
    names: Names = field(default_factory=Names)
    conns: dict[tuple[str, int, str, int], Seen] = field(default_factory=dict)  # node far's ends
    near_conns: dict[tuple[str, int, str, int], Seen] = field(default_factory=dict)  # node 0's, by the same key
    retired: list[tuple[tuple[str, int, str, int], Seen, Seen | None]] = field(default_factory=list)
    near_listeners: dict[int, str] = field(default_factory=dict)
    far_listeners: dict[int, str] = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of the ss processes it ran while sampling
    _started: bool = False

    def sample(self) -> None:
        far, far_listening = snapshot(self.net, self.far, 0, self.names)
        near, near_listening = snapshot(self.net, 0, self.far, self.names)
        near = {(peer, peer_port, here, port): conn for (here, port, peer, peer_port), conn in near.items()}
        for seen, conns in ((far, self.conns), (near, self.near_conns)):
            for key, conn in seen.items():
                known = conns.get(key)
                if known is not None and any(conn[c] < known.last[c] for c in _FRESH):  # the port, reused
                    if conns is self.conns:  # the old connection's counts stay, and its node-0 end's
                        self.retired.append((key, self.conns.pop(key), self.near_conns.pop(key, None)))
                    known = None
                if known is None:
                    conns[key] = Seen(None if self._started else dict(conn), conn)
                else:  # a socket its process has let go keeps the process it showed
                    known.last = conn | ({"process": known.last["process"]} if conn["process"] == "kernel" else {})
        self.near_listeners |= near_listening
        self.far_listeners |= far_listening

    def service(self, key: tuple[str, int, str, int], port_names: dict[tuple[str, int], str]) -> str:
        """Which end listens, and what: the service this connection calls
        (``port_names``, (address, port) → service, tells a raylet's services apart)."""
        if (key[2], key[3]) in port_names:
            return f"node 0's {port_names[(key[2], key[3])]}"
        if (key[0], key[1]) in port_names:
            return f"node {self.far}'s {port_names[(key[0], key[1])]}"
        if key[3] in self.near_listeners:
            return f"node 0's {self.near_listeners[key[3]]}"
        return f"node {self.far}'s {self.far_listeners.get(key[1], '?')}"

    def _loop(self) -> None:
        try:
            idle_priority()
            while not self._stop.wait(self.every_s):
                before = _children_cpu_s()
                self.sample()
                self.cpu_s += _children_cpu_s() - before  # its ss processes: CPU the cell's host lends it
        except Exception as e:  # raised by __exit__: a ledger that stopped sampling would undercount
            self.error = e

    def __enter__(self) -> ConnectionLedger:
        self.sample()
        self._started, self.seconds = True, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise ClusterError(f"the connection ledger stopped sampling: {self.error}") from self.error
        self.sample()
        self.seconds = time.perf_counter() - self.seconds  # the block's

    def _fresh(self, key: tuple[str, int, str, int]) -> dict[str, int]:
        """The counters of a connection opened in the block, at its start: the
        opener's acknowledged bytes count its SYN (node far opened it when node 0's
        end listens)."""
        return _FRESH | {"bytes_acked": 1 if key[3] in self.near_listeners else 0}

    def rows(self, port_names: dict[tuple[str, int], str] | None = None) -> list[dict[str, Any]]:
        """Per pair of processes (node ``far``'s, node 0's) and service, the
        delivered payload each way, the retransmitted bytes and the segments, over
        the block (a connection open before it counts from there); ``port_names``
        as ``service``'s."""
        pairs: dict[tuple[str, str, str], dict[str, Any]] = {}
        every = [(k, c, self.near_conns.get(k)) for k, c in self.conns.items()] + self.retired
        for key, conn, near in every:
            base = conn.base or self._fresh(key)
            near_base = (near.base or _FRESH) if near else _FRESH
            near_last = near.last if near else {"process": "closed", **_FRESH}
            called = self.service(key, port_names or {})
            zero = {"connections": 0, "to_near": 0, "to_far": 0, "retransmitted": 0, "segments": 0}
            row = pairs.setdefault((conn.last["process"], near_last["process"], called), {
                "far": conn.last["process"], "near": near_last["process"], "service": called, **zero})  # fmt: skip
            row["connections"] += 1
            # delivered payload each way: acknowledged, and received (a retransmitted byte counts once)
            row["to_near"] += conn.last["bytes_acked"] - base["bytes_acked"]
            row["to_far"] += conn.last["bytes_received"] - base["bytes_received"]
            row["retransmitted"] += conn.last["bytes_retrans"] - base["bytes_retrans"]
            row["retransmitted"] += near_last["bytes_retrans"] - near_base["bytes_retrans"]
            row["segments"] += sum(conn.last[s] - base[s] for s in ("segs_out", "segs_in"))
        return sorted(pairs.values(), key=lambda r: -(r["to_near"] + r["to_far"]))


def ledger_table(rows: list[dict[str, Any]], kernel_bytes: float, steps: int, ours: float | None = None) -> str:
    """The rows as a Markdown table, per step and in all, against the kernel's
    count and (given) the project's own count of what crossed."""
    lines = [
        "| node 1's process | node 0's process | the service called | connections | to node 0 | to node 1 | "
        "per step | retransmitted | segments |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        both = r["to_near"] + r["to_far"]
        lines.append(
            f"| {r['far']} | {r['near']} | {r['service']} | {r['connections']} | {r['to_near']:,} | {r['to_far']:,} | "
            f"{both / max(steps, 1):,.0f} | {r.get('retransmitted', 0):,} | {r['segments']:,} |"
        )
    payload = sum(r["to_near"] + r["to_far"] for r in rows)
    lines.append(f"\nPayload in all {payload:,} B, against {kernel_bytes:,.0f} B counted by the kernel "
                 f"({payload / kernel_bytes:.1%}; the rest: headers, and connections opened and closed "
                 "between samples).")  # fmt: skip
    if ours is not None and rows:
        n = max(steps, 1)
        lines.append(f"Per step: the kernel's {kernel_bytes / n:,.0f} B; payload {payload / n:,.0f} B, of which the "
                     f"busiest pair's {(rows[0]['to_near'] + rows[0]['to_far']) / n:,.0f} B against the project's "
                     f"count of {ours / n:,.0f} B.")  # fmt: skip
    return "\n".join(lines)


AGENTS = {"DashboardAgent", "log_monitor", "RuntimeEnvAgent"}
ROLES = (
    "the bulk: objects between the raylets, or gloo",
    "the latent queue's calls",
    "workers: objects' owners, borrowers, leases",
    "the driver and Ray Train's control",
    "the GCS: task events, heartbeats, pubsub",
    "agents: metrics and logs",
    "raylets: other",
)


def role(row: dict[str, Any], bulk: dict[str, Any]) -> str:
    """What a row's traffic is for, by the processes at its ends; ``bulk`` is the
    cell's busiest row (the latents' or the gradients' connection)."""
    names = {row["far"], row["near"]}
    if row is bulk:
        return ROLES[0]
    if names & AGENTS:
        return ROLES[5]
    if "gcs_server" in names:
        return ROLES[4]
    if "_ChannelActor" in names:
        return ROLES[1]
    if names & {"TrainController", "SynchronizationActor", "calibrate"}:
        return ROLES[3]
    return ROLES[6] if names == {"raylet"} else ROLES[2]


def by_role(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Payload (both ways) per role; ``rows`` busiest first, as ``ConnectionLedger.rows``."""
    out = dict.fromkeys(ROLES, 0)
    for r in rows:
        out[role(r, rows[0])] += r["to_near"] + r["to_far"]
    return out
