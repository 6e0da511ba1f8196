"""raylocal/cluster/ledger.py: each connection across a namespaced link, its bytes and its processes."""

from __future__ import annotations

import os
import sys

import pytest

from raylocal.cluster import netns
from raylocal.cluster.ledger import (
    ConnectionLedger,
    Names,
    by_role,
    ledger_table,
    parse_connections,
    parse_listeners,
    process_name,
)

SS = """\
LISTEN 0 4096 *:46871 *:* users:(("raylet",pid={pid},fd=40))
\t cubic rto:1000 mss:536
ESTAB 0 0 [::ffff:198.51.100.2]:45687 [::ffff:198.51.100.1]:57824 users:(("raylet",pid={pid},fd=49))
\t cubic wscale:7,7 bytes_sent:1500 bytes_retrans:300 bytes_acked:1201 bytes_received:5000 segs_out:9 segs_in:7
ESTAB 0 0 [::ffff:198.51.100.2]:45688 [::ffff:198.51.100.2]:44760 users:(("raylet",pid={pid},fd=47))
\t cubic bytes_sent:99 bytes_received:99 segs_out:1 segs_in:1
ESTAB 0 0 127.0.0.1:43173 127.0.0.1:58734 users:(("x",pid={pid},fd=41))
\t cubic bytes_sent:7 segs_out:1
ESTAB 0 0 198.51.100.2:40000 198.51.100.1:6379
\t cubic bytes_received:30 segs_in:2
ESTAB 0 0 198.51.100.2:40001 198.51.100.3:6379 users:(("raylet",pid={pid},fd=50))
\t cubic bytes_received:70 segs_in:2
TIME-WAIT 0 0 198.51.100.2:40002 198.51.100.1:6379
"""


def test_ss_text_gives_the_connections_across_the_link_with_their_counters_and_processes():
    names = Names()
    found = parse_connections(SS.format(pid=os.getpid()), "198.51.100.2", "198.51.100.1", names)
    # only to the peer: not the node's own address, loopback, a third node or a socket in TIME-WAIT (no counts);
    # a socket without a process is the kernel's
    assert set(found) == {("198.51.100.2", 45687, "198.51.100.1", 57824), ("198.51.100.2", 40000, "198.51.100.1", 6379)}
    first = found[("198.51.100.2", 45687, "198.51.100.1", 57824)]
    assert first == {"process": process_name(os.getpid()), "bytes_acked": 1201, "bytes_received": 5000,
                     "bytes_retrans": 300, "segs_out": 9, "segs_in": 7}  # fmt: skip
    assert found[("198.51.100.2", 40000, "198.51.100.1", 6379)]["bytes_received"] == 30
    assert found[("198.51.100.2", 40000, "198.51.100.1", 6379)]["process"] == "kernel"
    assert parse_listeners(SS.format(pid=os.getpid()), names) == {46871: process_name(os.getpid())}


def test_a_process_is_named_by_its_module_and_keeps_its_name_once_gone():
    assert process_name(os.getpid()) == "pytest"  # python -m pytest (or .../pytest's script)
    names = Names({2**22 + 1: "PartActor"})
    assert names.see(2**22 + 1) == "PartActor"  # no such process any more: the last name stays


def test_a_long_python_c_program_is_named_by_its_interpreter():
    import subprocess

    code = "import sys; print('up', flush=True); sys.stdin.readline()  # " + "x" * 400  # longer than a file name
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"  # (it runs: its command line is its own)
        assert process_name(child.pid) == os.path.basename(sys.executable)
    finally:
        child.communicate(b"\n", timeout=10)


def _counts(process: str, acked: int, received: int, retrans: int = 0) -> dict:
    return {"process": process, "bytes_acked": acked, "bytes_received": received, "bytes_retrans": retrans,
            "segs_out": 1, "segs_in": 1}  # fmt: skip


def test_the_ledger_counts_from_the_block_start_keeps_a_closed_socket_and_a_reused_ports_old_counts(monkeypatch):
    """Scripted samples of node 1 and node 0 (ss's view of each, keyed by each node's own end)."""
    from raylocal.cluster import ledger as ledger_module

    old, new, reused = ("198.51.100.2", 5000, "198.51.100.1", 80), ("198.51.100.2", 5001, "198.51.100.1", 80), \
        ("198.51.100.2", 5002, "198.51.100.1", 81)  # fmt: skip
    flip = lambda k: (k[2], k[3], k[0], k[1])  # noqa: E731  (node 0's view of a connection)
    far_samples = [
        {old: _counts("a", 1_001, 50)},  # before the block: old is open, with counts
        {old: _counts("a", 3_001, 70), new: _counts("a", 401, 9, retrans=3), reused: _counts("b", 901, 0)},
        {old: _counts("kernel", 3_001, 70), reused: _counts("b", 51, 5)},  # old let go; 5002 reused
    ]
    near_samples = [{flip(old): _counts("srv", 50, 1_000)}, {flip(new): _counts("srv", 9, 400, retrans=2)}, {}]
    calls = {"n": 0}

    def snapshot(net, k, peer, names):
        i = calls["n"] // 2
        calls["n"] += 1
        return (far_samples[i], {}) if k == 1 else (near_samples[i], {80: "srv", 81: "srv"})

    monkeypatch.setattr(ledger_module, "snapshot", snapshot)
    with ConnectionLedger(None, every_s=3600) as led:  # type: ignore[arg-type]
        led.sample()
    ports = {("198.51.100.1", 81): "raylet's node manager"}  # (a raylet's ports, told apart)
    rows = {(r["far"], r["near"]): r for r in led.rows(ports)}
    assert rows[("a", "srv")]["service"] == "node 0's srv" and rows[("b", "closed")]["service"] == (
        "node 0's raylet's node manager"
    )
    assert 0 < led.seconds < 60
    # old: from its counts at the block's start, kept with its process when let go; new: from its SYN (node 1 opened
    # it: node 0's end listens); 5002: 900 bytes, then a new connection on the same port, 50
    assert rows[("a", "srv")]["to_near"] == (3_001 - 1_001) + (401 - 1)
    assert rows[("a", "srv")]["to_far"] == (70 - 50) + 9
    assert rows[("a", "srv")]["retransmitted"] == 3 + 2
    assert rows[("b", "closed")]["to_near"] == (901 - 1) + (51 - 1) and rows[("b", "closed")]["connections"] == 2


def test_a_ledger_that_stops_sampling_fails_its_block_in_one_line(monkeypatch):
    from raylocal.cluster import ledger as ledger_module
    from raylocal.errors import ClusterError

    calls = {"n": 0}

    def snapshot(net, k, peer, names):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("ss: gone")
        return {}, {}

    monkeypatch.setattr(ledger_module, "snapshot", snapshot)
    with pytest.raises(ClusterError, match="^the connection ledger stopped sampling: ss: gone$"):
        with ConnectionLedger(None, every_s=0.001) as led:  # type: ignore[arg-type]
            led._thread.join(timeout=10)  # the thread ends on its error


def test_the_table_sets_the_payload_per_step_and_against_the_kernel():
    rows = [{"far": "raylet", "near": "raylet", "service": "node 0's raylet", "connections": 2, "to_near": 3000,
             "to_far": 1000, "retransmitted": 40, "segments": 9}]  # fmt: skip
    text = ledger_table(rows, kernel_bytes=5000, steps=8)
    assert "| raylet | raylet | node 0's raylet | 2 | 3,000 | 1,000 | 500 | 40 | 9 |" in text
    assert "4,000 B, against 5,000 B counted by the kernel (80.0%" in text
    ours = ledger_table(rows, kernel_bytes=5000, steps=8, ours=2400).splitlines()[-1]
    assert (
        ours == "Per step: the kernel's 625 B; payload 500 B, of which the busiest pair's 500 B against the "
        "project's count of 300 B."
    )


SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 29600)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); n = 0
while n < int(sys.argv[2]): n += len(c.recv(65536))
c.sendall(b"y" * int(sys.argv[3])); sys.stdin.readline()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 29600)); c.sendall(b"x" * int(sys.argv[2])); n = 0
while n < int(sys.argv[3]): n += len(c.recv(65536))
print("done", flush=True); sys.stdin.readline()
"""


@pytest.mark.skipif(netns.available() is not None, reason=netns.available() or "")
def test_the_ledger_counts_one_connections_bytes_each_way_and_names_both_ends():
    sent, answered = 300_000, 5_000
    with netns.Network([None, None]) as net:
        io = {"stdin": -1, "stdout": -1, "text": True}
        server = net.popen(0, [sys.executable, "-c", SERVER, net.address(0), str(sent), str(answered)], **io)
        assert server.stdout.readline().strip() == "ready"
        with ConnectionLedger(net, every_s=60) as ledger:  # (no sample of its own between these)
            client = net.popen(1, [sys.executable, "-c", CLIENT, net.address(0), str(sent), str(answered)], **io)
            assert client.stdout.readline().strip() == "done"
            ledger.sample()  # the connection, open, with its counts
            for p in (client, server):  # the client closes first: its end waits in TIME-WAIT, counters gone
                p.communicate("\n", timeout=10)
        # (the last sample, at the block's end, saw it closed: the counts it showed open stay)
    rows = [r for r in ledger.rows() if r["to_near"] or r["to_far"]]
    program = os.path.basename(sys.executable)  # python -c: named by its program
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["far"], r["near"], r["service"], r["connections"]) == (program, program, f"node 0's {program}", 1)
    assert (r["to_near"], r["to_far"]) == (sent, answered)  # payload, exactly
    assert r["segments"] >= 2


def test_each_connection_is_put_to_one_role_and_the_calibration_tables_them_per_step():
    from raylocal.tools import calibrate

    def row(far: str, near: str, to_near: int, to_far: int) -> dict:
        return {"far": far, "near": near, "service": "", "connections": 1, "to_near": to_near, "to_far": to_far,
                "retransmitted": 10, "segments": 1}  # fmt: skip

    rows = [row("raylet", "raylet", 2_000_000, 5_000), row("PartActor", "_ChannelActor", 3_000, 1_000),
            row("PartActor", "PartActor", 900, 100), row("DashboardAgent", "gcs_server", 700, 0),
            row("PartActor", "gcs_server", 500, 300), row("raylet", "raylet", 40, 60),
            row("PartActor", "calibrate", 20, 80)]  # fmt: skip
    roles = by_role(rows)
    assert list(roles.values()) == [2_005_000, 4_000, 1_000, 100, 800, 700, 100]  # in ROLES' order
    assert sum(roles.values()) == sum(r["to_near"] + r["to_far"] for r in rows)
    real = {"kernel_bytes": 2_100_000, "connections": rows, "steps": [10, 9], "bytes_received": [2_000_000],
            "seconds": 5.0, "idle_bytes_per_s": 0.0}  # fmt: skip
    table = calibrate.roles_table({("1mbit", "parts", "real"): real, ("1mbit", "parts", "emulated"): {}})
    per_step = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |") for line in table.splitlines()[2:]}
    assert per_step["the kernel's count"] == "210,000" and per_step["the project's count"] == "200,000"
    assert per_step["the bulk's payload beyond the project's count"] == "500"  # 2,005,000 - 2,000,000, a tenth
    assert per_step["the latent queue's calls"] == "400"
    assert per_step["beyond all payload: headers, missed connections"] == str(f"{(2_100_000 - 2_011_700) // 10:,}")
    assert per_step["retransmitted (not in the kernel's count where dropped before the wire)"] == "7"
    assert per_step["the driver, Ray Train, the GCS and the agents, in all"] == "1,600"  # 100 + 800 + 700
