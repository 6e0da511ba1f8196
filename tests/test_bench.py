"""scripts/bench_async.py's CPU meter: who used the CPUs during a window."""

from __future__ import annotations

import json
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
    # (idle) until the window has closed. The burns start only once the meter has sampled
    # after the window's start, and the window ends only once it has sampled after both
    # burns: the window holds them however slowly the meter samples (it reads every process).
    burn = "import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
    burn += "while time.process_time() - t < 0.8: pass\nprint('done', flush=True)\ntime.sleep(60)\n"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def sampled_after(t: float) -> None:
        while not meter.samples or meter.samples[-1][0] <= t:
            time.sleep(0.01)

    try:
        with Meter(interval=0.1) as meter:
            start, own_start = time.time(), time.process_time()
            sampled_after(start)
            burns_from = time.time()
            child.stdin.write("go\n")
            child.stdin.flush()
            t = time.process_time()
            while time.process_time() - t < 0.4:  # the driver (this process) burns ~0.4 CPU-s
                pass
            assert child.stdout.readline().strip() == "done"
            burns_to = time.time()
            sampled_after(burns_to)
            end, own_end = time.time(), time.process_time()
        split = meter.split(start, end)
    finally:
        child.kill()
        child.wait()
    assert burns_to - burns_from <= split["seconds"] <= end - start  # a window inside, around the burns
    # the driver's burn, and no more than this process used in the window by its own clock: the burn and the
    # meter's own sampling, which costs more the more processes the host runs (1/100 s ticks, twice)
    assert 0.3 <= split["driver"] <= own_end - own_start + 0.02
    assert 0.6 <= split["part actors"] <= 1.2  # the child's 0.8 CPU-s, and nobody else's
    assert split["queue actors"] == 0.0
    # the accounting closes: every CPU-second of the window is used, idle or stolen
    capacity = split.pop("seconds") * len(open("/proc/stat").read().split("\ncpu")[1:])
    assert sum(split.values()) == pytest.approx(capacity, rel=0.15)


def test_cpu_meter_counts_processes_that_ended_just_after_the_window():
    """The parts' actors end with their phase: a sample after the window's end
    no longer sees them, so the window closes on the last sample inside it."""
    meter = async_bench.CpuMeter()
    part, raylet = 11, 12
    meter.samples = [
        (0.0, {part: ("part actors", 5.0), raylet: ("raylet", 1.0)}, (100.0, 0.0)),
        (1.0, {part: ("part actors", 6.0), raylet: ("raylet", 1.1)}, (100.5, 0.0)),
        (2.0, {part: ("part actors", 7.0), raylet: ("raylet", 1.2)}, (101.0, 0.0)),
        (3.0, {raylet: ("raylet", 1.3)}, (102.5, 0.0)),  # the part's process has ended
    ]
    used = meter.split(0.0, 2.5)
    assert used["part actors"] == pytest.approx(2.0) and used["raylet"] == pytest.approx(0.2)
    assert used["idle"] == pytest.approx(1.0) and used["seconds"] == 2.0
    assert meter.split(0.5, 0.9) == {}  # no two samples inside


def test_cpu_meter_groups_ray_processes():
    meter = async_bench.CpuMeter()
    assert meter.group(1, "python", "ray::PartActor.run") == "part actors"
    assert meter.group(1, "python", "ray::_ChannelActor.get") == "queue actors"
    assert meter.group(1, "raylet", "/x/ray/core/src/ray/raylet/raylet --flags") == "raylet"
    assert meter.group(1, "python", "/usr/bin/python /x/site-packages/ray/dashboard/agent.py") == "other Ray"
    assert meter.group(1, "python", "/work/raylocal/.venv/bin/python -c pass") == "other"


def test_the_speedup_gap_takes_its_ratios_within_each_round_and_their_medians(tmp_path):
    from raylocal.tools import speedup_gap

    def round_(whole, p1, p2, pair, c1, c2, steps, one_ips, parts_ips, queue=0.1):
        cores = {"part actors": 1.8, "queue actors": queue}
        return {
            "whole": whole, "part 1": p1, "part 2": p2, "pair": pair,
            "parts cell": {"part_compute_s": [c1, c2], "steps": steps, "images_per_s": parts_ips, "cores": cores},
            "one-device cell": {"images_per_s": one_ips},
        }  # fmt: skip

    # a host twice as slow in the second round: every ratio the same as in the first
    rounds = [
        round_(0.2, 0.11, 0.09, [0.21, 0.21], 60.0, 50.0, [500, 500], 320.0, 560.0),
        round_(0.4, 0.22, 0.18, [0.42, 0.42], 60.0, 50.0, [250, 250], 160.0, 280.0),
        round_(0.2, 0.12, 0.09, [0.20, 0.22], 66.0, 50.0, [500, 500], 320.0, 480.0, queue=0.3),
    ]
    s = speedup_gap.summary(rounds)
    assert s["ms_per_step"] == {"whole": pytest.approx(200.0), "part 1": pytest.approx(120.0), "part 2": 90.0}
    assert s["parts_sum_over_whole"] == pytest.approx(1.0)  # (0.11 + 0.09) / 0.2, twice; 1.05 once
    assert s["split_bound"] == pytest.approx(0.2 / 0.11)  # median of 1.818, 1.818, 1.667
    assert s["pair_slowdown"] == pytest.approx(1.05)
    assert s["in_ray_part_ms"] == [pytest.approx(132.0), pytest.approx(100.0)]  # ms: 120, 240, 132
    assert s["in_ray_over_alone"][0] == pytest.approx(120.0 / 110.0)  # 1.0909 twice, 1.1 once
    assert s["one_device_ms"] == pytest.approx(200.0) and s["one_device_over_alone"] == pytest.approx(1.0)
    assert s["speedups"] == [1.75, 1.75, 1.5] and s["race_speedup"] == 1.75
    assert s["cores"]["part actors"] == 1.8 and s["cores"]["queue actors"] == 0.1 and s["cores"]["raylet"] == 0.0
    assert s["part_over_whole"] == [pytest.approx(0.55), pytest.approx(0.45)]  # the rounds' ratios' medians
    text = speedup_gap.table(s)
    assert "| part 2, alone | 90.0 | 0.450 of the whole's |" in text and "(median of 1.75, 1.75, 1.50)" in text
    assert "of 2 (median): part actors 1.80, queue actors 0.10, driver 0.00" in text
    # stored rounds are tabled again, nothing run: the summary and table recomputed from them
    stored = tmp_path / "speedup-gap.json"
    stored.write_text(json.dumps({"rounds": rounds, "summary": {}}))
    assert speedup_gap.main(["--table-only", "--out", str(tmp_path)]) == 0
    assert json.loads(stored.read_text())["summary"] == s
    assert (tmp_path / "speedup-gap.md").read_text() == text + "\n"


def test_the_speedup_gap_refuses_a_bad_round_count_in_one_line(capsys, tmp_path):
    from raylocal.tools import speedup_gap

    assert speedup_gap.main(["--rounds", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seconds 8.0, --cell-budget 60.0 and --rounds 0 must be positive"]
    assert not (tmp_path / "out").exists()


def test_bench_async_on_fewer_gpus_than_parts_runs_its_ddp_baseline_on_cpus(monkeypatch, capsys, tmp_path):
    """--gpu with 2 parts on one GPU: DDP cannot have a GPU per worker; it trains
    on CPUs and says so, instead of refusing after every other figure. Its
    baseline is a data-parallel ``Run``, planned as every Ray run is
    (``plan_ray_run``; here without joining Ray, on a cluster of 1 or 2 GPUs)."""
    import types

    import raylocal.bench.async_bench
    import raylocal.cluster.placement
    import raylocal.cluster.preflight
    from raylocal.bench.async_bench import AsyncBench
    from raylocal.cluster.preflight import plan_ray_run
    from raylocal.core.config import RaylocalConfig

    runs = []

    class PlannedRun:  # the run's planning, not its training
        def __init__(self, config, data):
            runs.append(config)
            self.placement = plan_ray_run(config, data)

        def execute(self):
            return {"history": [{"ddp_images_per_s": 100.0}]}

    monkeypatch.setattr(raylocal.bench.async_bench, "Run", PlannedRun)
    monkeypatch.setattr(raylocal.cluster.preflight, "connect", lambda config: None)
    bench = AsyncBench.__new__(AsyncBench)
    bench.k, bench.gpu = 2, True
    bench.data = types.SimpleNamespace(train=None, shape=(1, 8, 8))
    bench.config = RaylocalConfig(parts=2, device="cuda", cpus_per_part=1.0, n_levels=2, depth=3, warmup_steps=7)
    for gpus in (1.0, 2.0):
        monkeypatch.setattr(raylocal.cluster.placement, "live_nodes", lambda g=gpus: [{"CPU": 4.0, "GPU": g}])
        bench.run_ddp()
    bench.k = 3  # 64 images do not split into 3 workers: each takes 21, as DDP's workers did before it was a Run
    bench.run_ddp()
    assert runs[-1].schedule.batch_size == 63 and runs[-1].cluster.workers == 3
    out = capsys.readouterr()
    assert "2 data-parallel workers need a GPU each, the cluster has 1" in out.err
    assert "DDP e2e, 2 workers x 1 thread: 100" in out.out and "DDP e2e, 2 workers x a GPU each: 100" in out.out
    # the bench's model, one epoch of DDP on a worker per part
    assert all(
        c.schedule.name == "data-parallel" and c.cluster.workers == 2 and c.schedule.epochs == 1 for c in runs[:2]
    )
    assert all(
        (c.model.n_levels, c.model.depth, c.schedule.warmup_steps, c.cluster.device) == (2, 3, 7, "auto") for c in runs
    )
