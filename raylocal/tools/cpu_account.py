"""Where a host's CPU time goes while something runs: by process role and by kernel state.

On a 2-core host a CPU-second that Ray's object manager or the kernel's network
path spends is a CPU-second the parts do not train in. ``CpuAccount`` samples
``/proc`` on a thread while a calibration cell runs and adds up, per role
(the parts' actors, the raylets, the cell's driver, ...), the CPU seconds each
process used inside the window; ``/proc/stat`` gives the kernel's states
(user, nice, system, softirq, idle) over the same window: Ray starts its
workers, the parts among them, at nice 15 (``RAY_worker_niceness``), so their
time is the host's "nice", and the raylets, the GCS and a cell's driver run
before them. PID namespaces are not used by the namespaced clusters, so their
processes are all visible here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylocal.cluster.ledger import idle_priority

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
# /proc/stat's cpu line, in its order (Linux 2.6.33+)
KERNEL_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
SAMPLE_S = 0.5  # a process that ends between samples loses at most this much of its CPU time


def role_of(cmdline: str, pid: int, own_pid: int) -> str:
    """What a process is, from its command line (Ray's workers retitle themselves ``ray::Class.method``)."""
    if pid == own_pid:
        return "this process"  # the calibration: its sampling threads, and the connection ledger's parsing
    program = os.path.basename(cmdline.split(" ", 1)[0])
    if program in ("raylet", "gcs_server"):
        return program
    if cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "Ray's helpers"
    if cmdline.startswith("ray::PartActor"):
        return "part actors"
    if cmdline.startswith("ray::_ChannelActor"):
        return "queue actors"
    if cmdline.startswith("ray::"):
        return "other Ray workers"  # a model service in an actor of its own, Ray Train's, idle ones
    if "--cell" in cmdline and "raylocal" in cmdline:
        return "cell driver"  # (and a model service it runs in its own process)
    if "/ray/" in cmdline:
        return "Ray's helpers"  # log monitors, the dashboard
    return "other"


def process_cpu(stat_text: str) -> tuple[int, float]:
    """(start time in ticks, CPU seconds used so far) from ``/proc/PID/stat``."""
    fields = stat_text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15, starttime 22
    return int(fields[19]), (int(fields[11]) + int(fields[12])) * TICK_S


def kernel_seconds(stat_text: str) -> dict[str, float]:
    """Seconds in each state, summed over CPUs, from ``/proc/stat``'s first line."""
    values = stat_text.splitlines()[0].split()[1:]
    return {state: int(v) * TICK_S for state, v in zip(KERNEL_STATES, values)}


class CpuAccount:
    """CPU seconds by role and by kernel state, between ``__enter__`` and ``__exit__``."""

    def __init__(
        self, proc: Path = Path("/proc"), every_s: float = SAMPLE_S, own_pid: int | None = None,
        clock: Callable[[], float] = time.time, idle: bool = True,
    ) -> None:  # fmt: skip
        # idle: the sampling thread runs at SCHED_IDLE, off the measured processes' CPU
        self.proc, self.every_s, self.clock, self.idle = proc, every_s, clock, idle
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.first: dict[tuple[int, int], float] = {}  # (pid, start) -> CPU seconds when first seen
        self.last: dict[tuple[int, int], float] = {}
        self.roles: dict[tuple[int, int], str] = {}
        self.kernel_from: dict[str, float] = {}
        self.kernel_to: dict[str, float] = {}
        self.started, self.wall_s = 0.0, 0.0
        # per sample: (wall clock, each role's CPU seconds so far in the window, the kernel's states so far)
        self.timeline: list[tuple[float, dict[str, float], dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def sample(self, opening: bool = False) -> None:
        """Read every process once; the opening sample sets the baselines."""
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                start, cpu = process_cpu((entry / "stat").read_text())
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):  # it ended while being read
                continue
            key = (int(entry.name), start)
            # a process that appears inside the window used all its CPU inside it
            self.first.setdefault(key, cpu if opening else 0.0)
            if cmdline or key not in self.roles:  # the latest title: an idle worker may become an actor
                self.roles[key] = role_of(cmdline, key[0], self.own_pid)
            self.last[key] = cpu
        self.timeline.append((self.clock(), self.by_role(), kernel_seconds((self.proc / "stat").read_text())))

    def __enter__(self) -> CpuAccount:
        self.kernel_from = kernel_seconds((self.proc / "stat").read_text())
        self.started = time.perf_counter()
        self.sample(opening=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            if self.idle:
                idle_priority()
            while not self._stop.wait(self.every_s):
                self.sample()
        except Exception as e:  # raised by __exit__: an account that stopped sampling would undercount
            self.error = e

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the CPU account stopped sampling: {self.error}") from self.error
        self.sample()
        self.kernel_to = kernel_seconds((self.proc / "stat").read_text())
        self.wall_s = time.perf_counter() - self.started

    def by_role(self) -> dict[str, float]:
        """CPU seconds each role used inside the window."""
        totals: dict[str, float] = {}
        for key, cpu in self.last.items():
            role = self.roles[key]
            totals[role] = totals.get(role, 0.0) + cpu - self.first[key]
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def between(self, start: float, end: float) -> dict[str, Any]:
        """The same figures over part of the window, ``start`` to ``end`` on the wall
        clock (a cell's training: its part_window), each total interpolated between
        the samples around it."""
        roles = {r: self._at(end, 1, r) - self._at(start, 1, r) for r in self.by_role()}
        kernel = {s: self._at(end, 2, s) - self._at(start, 2, s) for s in KERNEL_STATES}
        return {"wall_s": end - start, "roles": roles, "kernel": kernel}

    def _at(self, when: float, column: int, name: str) -> float:
        """``name``'s running total in the timeline's ``column`` at wall-clock ``when``."""
        points = [(entry[0], entry[column].get(name, 0.0)) for entry in self.timeline]
        if when <= points[0][0]:
            return points[0][1]
        for (t0, v0), (t1, v1) in zip(points, points[1:]):
            if when <= t1:
                return v0 + (v1 - v0) * (when - t0) / (t1 - t0) if t1 > t0 else v1
        return points[-1][1]

    def seconds_of(self, pid: int) -> float:
        """CPU seconds the process ``pid`` (every process that held it) used inside the window."""
        return sum(cpu - self.first[key] for key, cpu in self.last.items() if key[0] == pid)

    def figures(self) -> dict[str, Any]:
        """What a cell records: the window, the roles' CPU seconds and the kernel's states."""
        kernel = {s: self.kernel_to[s] - self.kernel_from[s] for s in KERNEL_STATES}
        return {"wall_s": self.wall_s, "roles": self.by_role(), "kernel": kernel}
