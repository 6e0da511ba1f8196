"""Where the CPU went: roles from command lines, /proc parsing, and the window's sums."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from raylocal.tools.cpu_account import TICK_S, CpuAccount, kernel_seconds, process_cpu, role_of


@pytest.mark.parametrize(
    "cmdline, role",
    [
        ("/venv/lib/python3.12/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "raylet"),
        ("/venv/site-packages/ray/core/src/ray/gcs/gcs_server --gcs_server_port=1", "gcs_server"),
        ("ray::PartActor.run", "part actors"),
        ("ray::PartActor", "part actors"),
        ("ray::_ChannelActor.get", "queue actors"),
        ("ray::IDLE", "other Ray workers"),
        ("/venv/bin/python -m raylocal.tools.calibrate --cell {}", "cell driver"),
        ("ray::DashboardAgent", "Ray's helpers"),
        ("ray::RuntimeEnvAgent", "Ray's helpers"),
        ("/venv/bin/python -u /venv/site-packages/ray/_private/log_monitor.py --session-dir=x", "Ray's helpers"),
        ("/usr/sbin/sshd -D", "other"),
    ],
)
def test_each_process_gets_its_role_from_its_command_line(cmdline, role):
    assert role_of(cmdline, pid=7, own_pid=1) == role
    assert role_of(cmdline, pid=1, own_pid=1) == "this process"


def _stat(comm: str, utime: int, stime: int, start: int) -> str:
    # fields 3.. of /proc/PID/stat: state, then 10 others up to utime (14) and stime (15), starttime is 22
    rest = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 6 + [str(start)] + ["0"] * 30
    return f"42 ({comm}) " + " ".join(rest)


def test_proc_stat_lines_parse_even_when_the_command_name_has_spaces_and_parens():
    assert process_cpu(_stat("ray::Part (x) y", 300, 100, 12345)) == (12345, pytest.approx(400 * TICK_S))
    host = "cpu  10 2 30 400 5 6 70 8 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n"
    seconds = kernel_seconds(host)
    assert seconds["user"] == pytest.approx(10 * TICK_S) and seconds["softirq"] == pytest.approx(70 * TICK_S)
    assert seconds["idle"] == pytest.approx(400 * TICK_S) and seconds["steal"] == pytest.approx(8 * TICK_S)


def _write(proc: Path, pid: int, cmdline: str, ticks: int, start: int = 1) -> None:
    (proc / str(pid)).mkdir(exist_ok=True)
    (proc / str(pid) / "stat").write_text(_stat("x", ticks, 0, start))
    (proc / str(pid) / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")


def test_the_window_counts_what_each_process_used_inside_it_by_its_latest_role(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu  100 0 50 1000 0 0 10 0 0 0\n")
    (proc / "self").mkdir()  # not a process directory
    _write(proc, 10, "/x/raylet/raylet --a", ticks=500)  # before the window: only its growth counts
    _write(proc, 11, "ray::IDLE", ticks=200)  # an idle worker that becomes a part
    with CpuAccount(proc, every_s=3600, own_pid=1) as account:
        _write(proc, 10, "/x/raylet/raylet --a", ticks=530)
        _write(proc, 11, "ray::PartActor.run", ticks=260)
        _write(proc, 12, "ray::PartActor.run", ticks=40)  # starts inside the window, and ends in it
        account.sample()
        _write(proc, 12, "ray::PartActor.run", ticks=80, start=2)  # a new process under the ended one's pid
        _write(proc, 11, "ray::PartActor.run", ticks=300, start=1)
        (proc / "stat").write_text("cpu  190 0 70 1010 0 0 25 0 0 0\n")
    roles = account.by_role()
    assert roles["raylet"] == pytest.approx(30 * TICK_S)
    assert roles["part actors"] == pytest.approx((100 + 40 + 80) * TICK_S)
    figures = account.figures()
    assert figures["kernel"]["user"] == pytest.approx(90 * TICK_S)
    assert figures["kernel"]["softirq"] == pytest.approx(15 * TICK_S)
    assert figures["wall_s"] > 0 and set(figures["roles"]) == {"raylet", "part actors"}


def test_on_this_host_a_childs_cpu_seconds_match_what_the_kernel_charged_it():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.2)"
    # (at normal priority: a sampler at SCHED_IDLE could miss the child's last samples on a busy host)
    with CpuAccount(every_s=0.02, idle=False) as account:
        child = subprocess.Popen([sys.executable, "-c", spin])
        assert child.wait() == 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    charged = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert charged >= 0.6
    # the child sleeps its last 0.2 s, so the last sample before it ends has all its CPU time
    assert account.seconds_of(child.pid) == pytest.approx(charged, abs=0.05)
    assert account.by_role()["other"] >= account.seconds_of(child.pid)  # its role, beside the host's others


def test_an_instruments_thread_and_the_processes_it_starts_run_only_on_idle_cpu():
    import os
    import threading

    from raylocal.cluster.ledger import idle_priority

    seen = {}

    def instrument() -> None:
        idle_priority()
        seen["thread"] = os.sched_getscheduler(0)  # (0: this thread, on Linux)
        child = "import os; print(os.sched_getscheduler(0))"
        seen["child"] = int(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)

    thread = threading.Thread(target=instrument)
    thread.start()
    thread.join()
    assert seen == {"thread": os.SCHED_IDLE, "child": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's own thread keeps its priority


def test_part_of_the_window_is_read_off_the_timeline_between_its_samples(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    now = [100.0]
    (proc / "stat").write_text("cpu  0 0 0 0 0 0 0 0 0 0\n")
    _write(proc, 20, "ray::PartActor.run", ticks=1000)
    with CpuAccount(proc, every_s=3600, own_pid=1, clock=lambda: now[0]) as account:  # a sample at 100 s
        now[0] = 110.0
        _write(proc, 20, "ray::PartActor.run", ticks=1100)  # 100 ticks from 100 s to 110 s
        (proc / "stat").write_text("cpu  0 40 0 0 0 0 0 0 0 0\n")
        account.sample()
        now[0] = 120.0
        _write(proc, 20, "ray::PartActor.run", ticks=1300)  # 200 more by 120 s (the closing sample)
        (proc / "stat").write_text("cpu  0 80 0 0 0 0 0 0 0 0\n")
    part = account.between(105.0, 115.0)  # half of each stretch: 50 + 100 ticks; nice 20 + 20
    assert part["wall_s"] == 10.0
    assert part["roles"]["part actors"] == pytest.approx(150 * TICK_S)
    assert part["kernel"]["nice"] == pytest.approx(40 * TICK_S)
    assert account.between(90.0, 130.0)["roles"]["part actors"] == pytest.approx(300 * TICK_S)  # clamped to the window
