"""scripts/bench_async.py's CPU meter: who used the CPUs during a window."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylocal.bench import async_bench


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the CPU meter reads Linux's /proc")
def test_cpu_meter_charges_cpu_time_to_the_process_that_used_it():
    class Meter(async_bench.CpuMeter):
        def group(self, pid: int, comm: str, cmdline: str) -> str:  # the child stands in for a part actor
            if pid == child.pid:
                return "part actors"
            found = super().group(pid, comm, cmdline)  # another Ray job's actors on this machine are not ours
            return "other" if found in ("part actors", "queue actors") else found

    # A child that burns ~0.8 CPU-s when told to, says when it is done, then stays alive
    # (idle) until the window has closed: the window holds its burn however slow the machine.
    burn = "import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
    burn += "while time.process_time() - t < 0.8: pass\nprint('done', flush=True)\ntime.sleep(60)\n"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with Meter(interval=0.1) as meter:
            start = time.time()
            time.sleep(0.3)  # past the first sample after start
            child.stdin.write("go\n")
            child.stdin.flush()
            t = time.process_time()
            while time.process_time() - t < 0.4:  # the driver (this process) burns ~0.4 CPU-s
                pass
            assert child.stdout.readline().strip() == "done"
            time.sleep(0.5)  # a few samples after both burns
            end = time.time()
        split = meter.split(start, end)
    finally:
        child.kill()
        child.wait()
    assert split["seconds"] == pytest.approx(end - start, abs=0.3)
    assert 0.3 <= split["driver"] <= 0.6
    assert 0.6 <= split["part actors"] <= 1.2  # the child's 0.8 CPU-s, and nobody else's
    assert split["queue actors"] == 0.0
    # the accounting closes: every CPU-second of the window is used, idle or stolen
    capacity = split.pop("seconds") * len(open("/proc/stat").read().split("\ncpu")[1:])
    assert sum(split.values()) == pytest.approx(capacity, rel=0.15)


def test_cpu_meter_groups_ray_processes():
    meter = async_bench.CpuMeter()
    assert meter.group(1, "python", "ray::PartActor.run") == "part actors"
    assert meter.group(1, "python", "ray::_ChannelActor.get") == "queue actors"
    assert meter.group(1, "raylet", "/x/ray/core/src/ray/raylet/raylet --flags") == "raylet"
    assert meter.group(1, "python", "/usr/bin/python /x/site-packages/ray/dashboard/agent.py") == "other Ray"
    assert meter.group(1, "python", "/work/raylocal/.venv/bin/python -c pass") == "other"
