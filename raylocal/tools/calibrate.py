"""The link emulator against real links.

Each method runs twice at each rate, back to back (which first rotates from
one method and rate to the next): over a real link, on two
Ray nodes in network namespaces joined by veths that ``tbf`` shapes in the
kernel (``raylocal.cluster.netns``), and beside it as its emulated twin, on one
Ray node of this host with the link emulated at the same bandwidth and no
latency (the kernel here cannot delay: no ``netem``). With ``--costs`` a third
twin charges, beside the bandwidth, what a real link's messages of that kind
were measured to cost (``eff=`` and ``msg=``, from ``raylocal.tools.wire_costs``).
With ``--apart`` another twin runs on the real cell's two namespaced nodes, over
unshaped veths, its bandwidth the emulator's: real against it is the shaped
link's own share of a difference, it against the one-node twin the two nodes'.

    python -m raylocal.tools.calibrate                        # 100, 10 and 1 Mbit, 30 s per cell
    python -m raylocal.tools.calibrate --rates 10mbit --methods parts --budget 20
    python -m raylocal.tools.calibrate --costs --out /work/calib    # and a twin with the link's costs
    python -m raylocal.tools.calibrate --methods ddp --rates 10mbit --variant cap0.1MB-bf16   # the race's tuned DDP
    python -m raylocal.tools.calibrate --methods parts --rates 10mbit --apart   # and the twin on two nodes
    python -m raylocal.tools.calibrate --methods parts --rates 10mbit --worker-niceness 0   # Ray's workers at nice 0

A cell is one of the race's own contestants (``raylocal.bench.links``):

- ``parts``: 2 async parts; on the real network one per node (``--placement
  spread``), so that latents and weight syncs cross Ray's object manager over
  the shaped veth;
- ``ddp``: 2 DDP workers, one per node, gloo all-reducing over the veth;
- ``local-sgd``: 2 workers averaging every 50 steps over it.

Each node offers one CPU, so the two workers or parts sit one per node, and
each loads its training images from this host's disk (``images_from="node"``),
so that what crosses the link is the training's own traffic. The
kernel's interface counters on both nodes count what really crossed; over the
same seconds before the cell, the idle cluster's own traffic (Ray's control
messages) is measured and reported beside it. While a real cell runs, every TCP
connection across the link is sampled (``raylocal.cluster.ledger``): its
delivered payload each way, its retransmissions and the processes at its ends,
tabled per step by what the traffic was for. ``--queue-ms`` sets how much the
links' token buckets queue before they drop (100 ms by default). Each cell
records its host (the commit, the CPU, and the race's host-speed probe, once
per invocation), and where the host's CPU went while it ran, by process role
and over the parts' training (``raylocal.tools.cpu_account``). Results:
``OUT/calibration/``, one JSON per cell and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from raylocal.bench import links  # noqa: E402
from raylocal.bench.links import BENCH_MODEL, cell_link, host_figures  # noqa: E402 (after the auth setting, as links.py's own)
from raylocal.bench.race import SCHEDULES  # noqa: E402
from raylocal.bench.sweep import SWEEP_GRID  # noqa: E402
from raylocal.cluster import netns  # noqa: E402
from raylocal.cluster.ledger import ROLES, ConnectionLedger, by_role, ledger_table  # noqa: E402
from raylocal.core.links import MESSAGE_COSTS  # noqa: E402
from raylocal.errors import ClusterError, ConfigError  # noqa: E402
from raylocal.tools.cpu_account import CpuAccount  # noqa: E402

RATES = ("100mbit", "10mbit", "1mbit")
METHODS = ("parts", "ddp", "local-sgd")
PROBE_S = 10.0  # seconds of the race's host-speed probe, once per invocation that runs a cell
IDLE_S = 10.0  # seconds of the idle cluster's traffic measured before each real cell
TRACE_PACKETS = 5000  # the parts' packets timed hop by hop: every one of a 30 s cell
KINDS = ("real", "emulated", "costed", "apart")
TWO_NODE_KINDS = ("real", "apart")  # on the namespaced nodes: shaped veths, and unshaped ones
# how often (ms) Ray's dashboard agent on each node publishes its node's stats to the GCS (Ray's default: 5000),
# traffic that shares the shaped link with the training's
AGENT_REPORT_ENV = "REPORTER_UPDATE_INTERVAL_MS"
# the nice value a raylet starts its workers at, the parts and DDP's workers among them (Ray's default: 15),
# below its own and the GCS's 0
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def ray_env(agent_report_ms: int | None = None, worker_niceness: int | None = None) -> dict[str, str]:
    """The environment a cell's Ray processes start with beyond this one's: how often the
    dashboard agents report, and the workers' nice value (None: Ray's default for either)."""
    env = {AGENT_REPORT_ENV: str(agent_report_ms)} if agent_report_ms else {}
    return env | ({WORKER_NICENESS_ENV: str(worker_niceness)} if worker_niceness is not None else {})


def emulated_link(rate: str) -> str:
    """The emulator's twin of a ``tbf`` rate: the same bandwidth, no latency."""
    netns.rate_bits(rate)  # refuses what tc would not take
    rate = rate.lower()
    return f"bw={rate[:-4]}{rate[-4].upper()}bit,lat=0ms"


def costed_link(rate: str, method: str) -> str:
    """The costed twin's link: ``emulated_link(rate)``, also charging what ``method``'s
    messages were measured to cost on a real link (the race's own ``cell_link``)."""
    try:
        return cell_link({"link_spec": emulated_link(rate), "link_costs": "measured"}, SCHEDULES[method])
    except ConfigError:
        measured = ", ".join(f"{b / 1e6:g}mbit" for b in MESSAGE_COSTS["Ray object"])
        raise ClusterError(f"no measured costs at {rate} (measured at {measured})") from None


def charged_link(method: str, rate: str, kind: str) -> str:
    """What a cell's link is charged with, read off the arguments it runs with
    (``cell_args``): nothing of the emulator's on the real network."""
    return cell_link(cell_args(method, rate, kind, 0.0, 0), SCHEDULES[method])


def cell_args(
    method: str, rate: str, kind: str, budget: float, seed: int, variant: str | None = None
) -> dict[str, Any]:
    """What ``raylocal.bench.links``' contestant runs with: the race's model and
    settings (a ``variant`` of the race's sweep, else its first), over no emulated
    link when the ``kind`` of cell is real; the real and ``apart`` cells join the
    two-node cluster, one worker or part per node."""
    two_nodes = kind in TWO_NODE_KINDS
    chosen = SWEEP_GRID[method][variant] if variant else {}
    return {
        "method": method, "link_spec": "up" if kind == "real" else emulated_link(rate), "seed": seed,
        "budget": budget, "link_costs": "measured" if kind == "costed" else None,  # charged by the race's cell_link
        "train_subset": None, "test_subset": 2000, "split": None, "join": two_nodes,
        "placement": "spread" if two_nodes else "pack",
        "average_every": 50 if method == "local-sgd" else 0, "outer_lr": None, "average_overlap": False,
        "bucket_cap_mb": None, "ddp_compression": "none", "sync_every": 50, "queue_size": 1,
        # every worker and part loads its images on its own node, in both twins: only training crosses the link
        "images_from": "node",
        "trace_packets": TRACE_PACKETS if method == "parts" else 0,
    } | chosen  # fmt: skip


def run_contestant(args: dict[str, Any]) -> dict[str, Any]:
    """One contestant in this process (it joins RAY_ADDRESS when set, else starts its own Ray)."""
    if args["method"] == "parts":
        result = links.run_parts(args)
    else:
        result = links.run_data_parallel(args, args["average_every"])
    result.pop("state", None)
    return result | ({"nodes": cluster_nodes()} if args["join"] else {})


def cluster_nodes() -> dict[str, dict[str, Any]]:
    """Each node of the cluster at RAY_ADDRESS: its address and its raylet's two
    ports (which connections of the ledger are objects and which are calls)."""
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
    try:
        return {n["NodeID"]: {"address": n["NodeManagerAddress"], "node_manager_port": n["NodeManagerPort"],
                              "object_manager_port": n["ObjectManagerPort"]} for n in ray.nodes()}  # fmt: skip
    finally:
        ray.shutdown()


def raylet_ports(nodes: dict[str, dict[str, Any]]) -> dict[tuple[str, int], str]:
    """(address, port) → which of its raylet's services listens there."""
    ports = {}
    for n in nodes.values():
        ports[(n["address"], n["object_manager_port"])] = "raylet's object manager"
        ports[(n["address"], n["node_manager_port"])] = "raylet's node manager"
    return ports


def interface_bytes(net: Any) -> int:
    """Bytes sent by every node's veth so far (what crossed the bridge), from the kernel."""
    total = 0
    for k in range(len(net.rates)):
        shown = subprocess.run(
            ["ip", "-n", net.node(k), "-s", "-j", "link", "show", "dev", net.veth(k)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        total += json.loads(shown.stdout)[0]["stats64"]["tx"]["bytes"]
    return total


def real_cell(
    args: dict[str, Any],
    rate: str | None,
    queue_ms: float = netns.QUEUE_MS,
    congestion: str | None = None,
    agent_report_ms: int | None = None,
    worker_niceness: int | None = None,
) -> dict[str, Any]:
    """The cell ``args`` (``cell_args``) over a real ``rate`` link between two namespaced
    Ray nodes, whose token buckets queue at most ``queue_ms`` of traffic (None: unshaped),
    whose TCP runs ``congestion`` (None: the host's default), whose Ray dashboard agents
    publish their node's stats every ``agent_report_ms`` and whose workers run at nice
    ``worker_niceness`` (None: Ray's default for either)."""
    method, budget = args["method"], args["budget"]
    network = netns.Network([rate, rate], queue_ms=queue_ms, congestion=congestion)
    nodes_env = ray_env(agent_report_ms, worker_niceness)
    with network as net, netns.ray_cluster(net, cpus=1, ray_env=nodes_env) as env:
        ran_congestion = net.congestion_control()
        idle_from = interface_bytes(net)
        time.sleep(IDLE_S)
        idle = (interface_bytes(net) - idle_from) / IDLE_S
        start = interface_bytes(net)
        argv = [sys.executable, "-m", "raylocal.tools.calibrate", "--cell", json.dumps(args)]
        with ConnectionLedger(net) as ledger, CpuAccount() as cpu:
            done = net.run(0, argv, env=env, capture_output=True, text=True, timeout=int(budget) + 600)
        crossed = interface_bytes(net) - start
    cell = with_cpu(_result(done, method), cpu, ledger_s=ledger.cpu_s)
    connections = ledger.rows(raylet_ports(cell.get("nodes", {})))
    return cell | {"kernel_bytes": crossed, "idle_bytes_per_s": idle, "connections": connections,
                   "ledger_seconds": ledger.seconds, "queue_ms": queue_ms, "congestion": ran_congestion,
                   "agent_report_ms": agent_report_ms}  # fmt: skip


def emulated_cell(args: dict[str, Any], worker_niceness: int | None = None) -> dict[str, Any]:
    """The cell ``args`` (``cell_args``) as a real cell's twin: one Ray node of this
    host, the link emulated (and charged a real link's costs when ``link_costs``), its
    Ray's workers at nice ``worker_niceness`` (None: Ray's default)."""
    argv = [sys.executable, "-m", "raylocal.tools.calibrate", "--cell", json.dumps(args)]
    env = os.environ | ray_env(worker_niceness=worker_niceness)  # the cell starts its own Ray, which inherits it
    with CpuAccount() as cpu:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=int(args["budget"]) + 600, env=env)
    return with_cpu(_result(done, args["method"]), cpu)


def with_cpu(cell: dict[str, Any], cpu: CpuAccount, **extra: float) -> dict[str, Any]:
    """The cell and where the host's CPU went: over its process, and over its parts'
    training where it has parts (``extra``: figures of the whole process)."""
    window = cell.get("part_window")
    return cell | {"cpu": cpu.figures() | extra, "cpu_training": cpu.between(*window) if window else None}


def _result(done: subprocess.CompletedProcess, method: str) -> dict[str, Any]:
    line = next((x for x in done.stdout.splitlines() if x.startswith("CELL ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: the {method} cell failed: " + " | ".join(tail))
    return json.loads(line.removeprefix("CELL "))


def figures(method: str, cell: dict[str, Any]) -> dict[str, float]:
    """What the calibration compares of a cell: its rate, and its time waiting on the link."""
    # a step of the whole model: for the parts, of the slower part (the rate its images/s is)
    if method == "parts":
        per_step = BENCH_MODEL["batch_size"] / cell["images_per_s"] if cell["images_per_s"] else float("inf")
    else:
        per_step = cell["seconds"] / max(cell["steps"], 1)
    out = {"images/s": cell["images_per_s"], "s per step": per_step}
    if method == "parts":
        out["idle %"] = 100 * cell["idle"]
        behind = cell.get("behind_steps") or [{"mean": float("nan")}]
        out["upstream steps behind"] = behind[0]["mean"]
    elif method == "ddp":  # how much later the last worker began (its first broadcast, in the wrap, holds each)
        out["start spread s"] = cell.get("start_spread_s", float("nan"))
        if cell.get("allreduce_s") is not None:  # DDP's reducer's own timing (cells from 2026-12-07 on)
            out["all-reduce ms per step"] = 1e3 * cell["allreduce_s"]
            out["all-reduce exposed ms per step"] = 1e3 * cell["allreduce_exposed_s"]
            if cell.get("allreduce_exposed_least_s") is not None:  # (cells from 2026-12-07 13:45 on)
                least = cell["allreduce_exposed_least_s"]
                out["all-reduce exposed ms, least worker"] = 1e3 * least
                # the early worker's wait for the late one's bucket, inside its all-reduce
                out["all-reduce skew ms, most - least worker"] = 1e3 * (cell["allreduce_exposed_s"] - least)
                out |= skew_terms(cell)
        out |= steady_step(cell) | head_rank_lag(cell)
    elif method == "local-sgd":  # its averaging, over the link (DDP's real all-reduce has no hook to time it)
        out["averaging %"] = 100 * cell["idle"]
        if "rounds" in cell:  # taken apart (cells from 2026-12-07 on): the rounds after their meeting, the waits
            out["rounds after meeting %"] = 100 * cell["rounds"]
            out["waiting for the other %"] = 100 * cell["sync"]
    return out


def head_rank_lag(cell: dict[str, Any]) -> dict[str, float]:
    """A two-node DDP cell's steps after the first (cells that record each worker's node, from
    2026-12-07 19:10 on): how much later the rank on the head node (node 0, where Ray's GCS runs)
    ended its update than the other rank, ms a step, and in what share of the steps it ended later."""
    workers, nodes = kept_every_step(cell), cell.get("nodes") or {}
    head = [w for w in workers if nodes.get(w.get("node_id"), {}).get("address") == netns.Network.address(0)]
    if len(head) != 1:
        return {}
    other = workers[1 - workers.index(head[0])]
    lags = [h[1] - o[1] for h, o in list(zip(head[0]["steps"], other["steps"]))[1:]]
    return {
        "the head node's rank ended later by, ms": 1e3 * sum(lags) / len(lags),
        "steps the head node's rank ended later, %": 100 * sum(lag > 0 for lag in lags) / len(lags),
    }


def kept_every_step(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """A DDP cell's two workers where both kept every one of its two or more steps' times (a
    cell of more steps than ``TIMELINE_STEPS`` kept only its first), else none."""
    workers = cell.get("workers") or []
    whole = len(workers) == 2 and cell["steps"] >= 2 and all(len(w["steps"]) == cell["steps"] for w in workers)
    return workers if whole else []


def steady_step(cell: dict[str, Any]) -> dict[str, float]:
    """A DDP cell's seconds per step after its first (cells that kept every step's times): the
    first holds DDP's first broadcast of the model, which the twin and a real link time apart."""
    workers = kept_every_step(cell)
    if not workers:
        return {}
    rows = workers[0]["steps"]
    return {"s per step after the first": (rows[-1][2] - rows[1][0]) / (len(rows) - 1)}


def skew_terms(cell: dict[str, Any]) -> dict[str, float]:
    """The two DDP workers' skew taken apart, ms a step (cells from 2026-12-07 18:15 on, every
    step kept): the early worker (the most exposed) waits inside its all-reduce while the late
    one is still computing, so its exposed time less the late one's is how much later the late
    worker began its steps, plus how much longer its forward and backward pass took (each one's
    reducer timing), plus how much later the early worker's update ended (its all-reduce landing
    after the late one's). The three need not add up to the skew exactly: a step's batch before
    its forward and its optimizer after its all-reduce are in none of them."""
    workers = kept_every_step(cell)
    if not workers or any(w["allreduce_exposed_s"] is None for w in workers):
        return {}
    early, late = sorted(workers, key=lambda w: -w["allreduce_exposed_s"])
    steps = list(zip(early["steps"], late["steps"]))
    began = sum(b[0] - a[0] for a, b in steps) / len(steps)
    ended = sum(a[1] - b[1] for a, b in steps) / len(steps)
    computed = (late["forward_s"] + late["backward_s"]) - (early["forward_s"] + early["backward_s"])
    terms = {
        "skew: the late worker began later by, ms": 1e3 * began,
        "skew: its forward and backward took longer by, ms": 1e3 * computed,
        "skew: the early worker's update ended later by, ms": 1e3 * ended,
    }
    return terms | {"skew: the three terms' sum, ms": sum(terms.values())}


def byte_terms(method: str, cell: dict[str, Any], twin: dict[str, Any]) -> tuple[int, float, float, float]:
    """A real cell's steps, the project's own count of the bytes that crossed its
    link, the one-off bytes that count holds (a first broadcast of the model), and
    the idle cluster's traffic over its seconds: what the kernel's count is
    compared with. The count is the cell's own where it keeps one: what the
    parts' second part fetched (a sender's count also holds latents dropped in
    the queue, which never cross), local SGD's averaging rounds and its first
    broadcast of the model. The real DDP has no hook to count: its twin's bytes
    per step (every step all-reduces the same gradient) for as many steps, and
    the first broadcast once; so too the parts of cells stored before they
    counted what they fetched."""
    # the parts' steps are the first part's: the sender's, whose rate the twin's bytes per step are of
    steps = cell["steps"] if isinstance(cell["steps"], int) else cell["steps"][0]
    if method == "parts" and "bytes_received" in cell:
        once, counted = 0.0, float(sum(cell["bytes_received"]))
    elif method == "local-sgd" and cell["bytes_per_step"]:
        once = cell.get("start_bytes", 0)
        counted = cell["bytes_per_step"] * steps * 2 + once
    else:
        once = twin.get("start_bytes", 0)
        counted = twin["bytes_per_step"] * steps * (2 if method != "parts" else 1) + once
    return steps, counted, once, cell["idle_bytes_per_s"] * cell["seconds"]


def overhead_fit(runs: list[dict[tuple[str, str, str], dict[str, Any]]]) -> str:
    """The kernel's bytes beyond ours and the idle traffic, split into a part per
    cell and a part per step: beyond = F + p · steps, least squares over the real
    cells of several runs (budgets), per method and rate and per method over every
    rate (unweighted: the fast rates' many steps weigh most); with how far
    ours + idle + F + p · steps then is from each cell's kernel count, relative to
    that count and to the part beyond ours and idle (the worst cell of each). The
    idle traffic is charged over the training seconds only, so the cluster's idle
    bytes around them fall into F."""
    points: dict[tuple[str, str], list[tuple[int, float, float, float, float]]] = {}
    for run, cells in enumerate(runs):
        for (rate, method, kind), cell in cells.items():
            twin = cells.get((rate, method, "emulated"))
            if kind == "real" and twin is not None:
                steps, counted, once, control = byte_terms(method, cell, twin)
                beyond = cell["kernel_bytes"] - counted - control
                ours = counted - once  # per step: without a one-off broadcast
                for key in ((method, rate), (method, "every rate")):
                    points.setdefault(key, []).append((run, steps, beyond, ours, cell["kernel_bytes"]))
    rows = [
        "| method | rate | cells | F: bytes per cell | p: bytes per step | p / ours per step | "
        "worst cell: kernel against ours + idle + F + p·steps | the same, of the part beyond ours and idle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, rate), pts in sorted(points.items()):
        if len({run for run, *_ in pts}) < 2:
            continue  # cells of one run (one budget): a part per cell and a part per step cannot be told apart
        steps, beyond, ours, kernel = (np.array(column, dtype=float) for column in list(zip(*pts))[1:])
        (fixed, per_step), *_ = np.linalg.lstsq(np.stack([np.ones_like(steps), steps], 1), beyond, rcond=None)
        missed = np.abs(beyond - fixed - per_step * steps)
        rows.append(
            f"| {method} | {rate} | {len(pts)} | {fixed:,.0f} | {per_step:,.0f} | "
            f"{per_step * np.sum(steps) / np.sum(ours):.3f} | {100 * np.max(missed / kernel):.1f}% | "
            f"{100 * np.max(missed / np.abs(beyond)):.1f}% |"
        )
    return "\n".join(rows)


def stored_cells(out: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The cells a calibration stored under ``out`` (``OUT/calibration/``), by (rate, method, kind)."""
    cells = {}
    for path in sorted(out.glob("*.json")):
        method = next((m for m in METHODS if path.stem.startswith(m + "-")), None)
        if method is None:
            continue
        rate, _, kind = path.stem.removeprefix(f"{method}-").partition("-")
        if kind in KINDS:
            cells[(rate, method, kind)] = json.loads(path.read_text())
    return cells


# the twins beside the plain one, where they ran: their columns, and what a real cell is divided by
EXTRA_TWINS = {
    "costed": ("emulated with the link's costs", "real / that"),
    "apart": ("emulated on the two nodes", "real / that | that / emulated"),
}


def _blank(kind: str) -> str:
    """The columns of an extra twin, empty: its figure and its ratios."""
    return " |" * (2 + EXTRA_TWINS[kind][1].count("|"))


def table(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Per rate and method, each figure real against emulated (and against the twin
    that charges the real link's measured costs, and the twin on the two nodes,
    where they ran), and the kernel's bytes against the project's."""
    extras = [k for k in EXTRA_TWINS if any(kind == k for _, _, kind in cells)]
    blank = "".join(_blank(k) for k in extras)  # the extra columns of a row without them
    rows = [
        "| rate | method | figure | real link | emulated | real / emulated |"
        + "".join(f" {EXTRA_TWINS[k][0]} | {EXTRA_TWINS[k][1]} |" for k in extras),
        "|---|---|---|---|---|---|" + "---|" * blank.count("|"),
    ]
    for (rate, method, kind), cell in cells.items():
        if kind != "real" or (rate, method, "emulated") not in cells:
            continue
        twin = cells[(rate, method, "emulated")]
        ours, theirs = figures(method, cell), figures(method, twin)
        others = {k: figures(method, other) if (other := cells.get((rate, method, k))) else None for k in extras}
        for name, value in ours.items():
            twin_value = theirs.get(name, math.nan)  # (a stored twin from before the figure)
            row = f"| {rate} | {method} | {name} | {value:.3g} | {twin_value:.3g} | {_ratio(value, twin_value)} |"
            for k, other in others.items():
                that = other.get(name) if other else None
                if that is None:
                    row += _blank(k)
                    continue
                row += f" {that:.3g} | {_ratio(value, that)} |"
                row += f" {_ratio(that, twin_value)} |" if k == "apart" else ""
            rows.append(row)
        steps, counted, _, control = byte_terms(method, cell, twin)
        rows.append(
            f"| {rate} | {method} | bytes: kernel (Ray's idle traffic {control / 1e3:.0f} kB of it) against "
            f"ours | {cell['kernel_bytes'] / 1e6:.3g} MB | {counted / 1e6:.3g} MB | "
            f"{_ratio(cell['kernel_bytes'], counted)} |" + blank
        )
        # everything else that crossed during the cell, per step: start-up (Ray's exports, the actors'
        # arguments), the parts' weight gathers, and the framing, per-object messages and acks of it all
        beyond = (cell["kernel_bytes"] - control - counted) / max(steps, 1)
        rows.append(f"| {rate} | {method} | kernel bytes per step beyond ours and the idle traffic | {beyond:.0f} | | |"
                    + blank)  # fmt: skip
    return "\n".join(rows)


def _ratio(value: float, of: float) -> str:
    return f"{value / of:.2f}" if of else "nan"


def host_line(host: dict[str, Any]) -> str:
    probe = host["probe_images_per_s"]
    speed = f", probe {probe:.0f} images/s" if probe else ""
    tcp = f", host TCP {host['tcp_congestion']}" if host.get("tcp_congestion") else ""
    return f"commit {host['commit']}, {host['cpu']}{tcp}{speed}"


def hosts_lines(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Where the cells ran: each host record (commit, CPU, speed probe) and its cells,
    so that a table mixing days says so; a namespaced cell names the TCP congestion
    control its links ran where it recorded one."""
    groups: dict[str, list[str]] = {}
    for (rate, method, kind), cell in cells.items():
        host = cell.get("host")
        tcp = f" (TCP {cell['congestion']})" if cell.get("congestion") else ""
        groups.setdefault(host_line(host) if host else "host not recorded", []).append(f"{method} {rate} {kind}{tcp}")
    return "\n".join(f"- {where}: {', '.join(names)}" for where, names in groups.items())


def _ms(delay: dict[str, float]) -> str:
    return f"{1e3 * delay['p50']:.1f} ({1e3 * delay['p95']:.1f})"


def hops_table(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Per rate, where the parts' packets spent their time: each hop's median
    (and 95th percentile) in ms, real against emulated (``raylocal.pipeline.trace``)."""
    rows = [
        "| rate | packets | hop | real: p50 (p95) ms | emulated: p50 (p95) ms | packets real / emulated |",
        "|---|---|---|---|---|---|",
    ]
    for (rate, method, kind), cell in cells.items():
        twin = cells.get((rate, method, "emulated"), {})
        if method != "parts" or kind != "real" or not cell.get("packet_delays") or not twin.get("packet_delays"):
            continue
        ours, theirs = cell["packet_delays"][0], twin["packet_delays"][0]
        for group, hops in ours.items():
            for hop, d in hops.items():
                e = theirs.get(group, {}).get(hop)
                count = f"{d['count']} / {e['count'] if e else 0}"
                rows.append(f"| {rate} | {group} | {hop} | {_ms(d)} | {_ms(e) if e else '-'} | {count} |")
    return "\n".join(rows)


def where_parts(cell: dict[str, Any]) -> str:
    """ "; part 1 on 198.51.100.1, ...": each part's node address, where the cell recorded both."""
    nodes = cell.get("nodes", {})
    if not nodes or not cell.get("actor_nodes"):
        return ""
    return "; " + ", ".join(f"part {k + 1} on {nodes[n]['address']}" for k, n in enumerate(cell["actor_nodes"]))


def connections_tables(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Per real cell that sampled its connections: who sent what across the link."""
    text = ""
    for (rate, method, kind), cell in cells.items():
        if kind == "real" and "connections" in cell:
            steps, counted, _, _ = byte_terms(method, cell, cells[(rate, method, "emulated")])
            text += f"\n\nWho sent what, {method} at {rate} (per step: of {steps} steps{where_parts(cell)}):\n\n"
            text += ledger_table(cell["connections"], cell["kernel_bytes"], steps, ours=counted)
    return text


def roles_table(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Per real cell with a ledger, bytes per step: the kernel's, the project's count,
    the bulk connection's payload beyond it, each other role's payload, and what the
    kernel carried beyond all payload (headers; connections missed between samples)."""
    sampled = [(k, c) for k, c in cells.items() if k[2] == "real" and "connections" in c]
    if not sampled:
        return ""
    head = "| bytes per step | " + " | ".join(f"{m} {r}" for (r, m, _), _ in sampled) + " |"
    lines = [head, "|---|" + "---|" * len(sampled)]
    columns = []
    for (rate, method, _), cell in sampled:
        steps, counted, _, _ = byte_terms(method, cell, cells[(rate, method, "emulated")])
        roles, payload = by_role(cell["connections"]), sum(r["to_near"] + r["to_far"] for r in cell["connections"])
        retrans = sum(r.get("retransmitted", 0) for r in cell["connections"])
        column = {"the kernel's count": cell["kernel_bytes"], "the project's count": counted,
                  "the bulk's payload beyond the project's count": roles[ROLES[0]] - counted}  # fmt: skip
        column |= {r: roles[r] for r in ROLES[1:]}
        column |= {"beyond all payload: headers, missed connections": cell["kernel_bytes"] - payload,
                   "retransmitted (not in the kernel's count where dropped before the wire)": retrans}  # fmt: skip
        background = sum(roles[r] for r in ROLES[3:6])  # grows with the cell's seconds, not its steps
        columns.append({k: v / max(steps, 1) for k, v in column.items()} | {
            "steps": steps, "the driver, Ray Train, the GCS and the agents, in all": background})  # fmt: skip
    for name in columns[0]:
        lines.append(f"| {name} | " + " | ".join(f"{c[name]:,.0f}" for c in columns) + " |")
    return "\n".join(lines)


def cpu_table(cells: dict[tuple[str, str, str], dict[str, Any]], over: str = "cpu") -> str:
    """Per cell that accounted its CPU (``raylocal.tools.cpu_account``): the cores
    each role used on average (CPU seconds per second) and the kernel's states over
    the whole host, ``over`` the cell's process ("cpu") or its parts' training
    ("cpu_training")."""
    accounted = [(key, cell[over]) for key, cell in cells.items() if cell.get(over)]
    if not accounted:
        return ""
    roles: dict[str, float] = {}
    for _, cpu in accounted:
        for role, seconds in cpu["roles"].items():
            roles[role] = roles.get(role, 0.0) + seconds
    lines = ["| cores used on average | " + " | ".join(f"{m} {r} {k}" for (r, m, k), _ in accounted) + " |",
             "|---|" + "---|" * len(accounted)]  # fmt: skip
    for role in sorted(roles, key=lambda r: -roles[r]):
        lines.append(
            f"| {role} | " + " | ".join(f"{c['roles'].get(role, 0.0) / c['wall_s']:.3f}" for _, c in accounted) + " |"
        )
    if any("ledger_s" in c for _, c in accounted):  # not a process the sampler sees: short-lived
        ledger = [f"{c.get('ledger_s', 0.0) / c['wall_s']:.3f}" for _, c in accounted]
        lines.append("| the connection ledger's ss processes | " + " | ".join(ledger) + " |")
    for state in ("user", "nice", "system", "softirq", "idle"):  # Ray's workers run niced (RAY_worker_niceness)
        lines.append(
            f"| host: {state} | " + " | ".join(f"{c['kernel'][state] / c['wall_s']:.3f}" for _, c in accounted) + " |"
        )
    span = "the training" if over == "cpu_training" else "the cell's process"
    lines.append(f"| seconds of {span} | " + " | ".join(f"{c['wall_s']:.1f}" for _, c in accounted) + " |")
    return "\n".join(lines)


def refusal(
    rates: list[str],
    methods: list[str],
    queue_ms: float,
    out: Path,
    costs: bool = False,
    variant: str | None = None,
    congestion: str | None = None,
    agent_report_ms: int | None = None,
    worker_niceness: int | None = None,
) -> str | None:
    """Why a calibration cannot run, before anything starts; None if it can."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        return f"{bad[0]!r} is not a method ({', '.join(METHODS)})"
    if agent_report_ms is not None and agent_report_ms <= 0:
        return f"--agent-report-ms must be a positive number of ms, not {agent_report_ms}"
    if worker_niceness is not None and not 0 <= worker_niceness <= 19:
        return f"--worker-niceness must be a nice value from 0 to 19, not {worker_niceness}"
    if WORKER_NICENESS_ENV in os.environ:  # the cells would run at it and record Ray's default
        shown = os.environ[WORKER_NICENESS_ENV]
        return f"{WORKER_NICENESS_ENV}={shown} is set here: unset it and give --worker-niceness, which the cells record"
    if variant and (len(methods) != 1 or variant not in SWEEP_GRID[methods[0]]):
        known = ", ".join(SWEEP_GRID[methods[0]]) if len(methods) == 1 else "one --methods only"
        return f"--variant {variant}: not one of the race's settings for --methods {','.join(methods)} ({known})"
    try:
        netns.check_congestion(congestion)
        for rate in rates:
            netns.tbf_args(rate, queue_ms)
            for method in methods if costs else []:
                costed_link(rate, method)
    except ClusterError as e:
        return str(e)
    why = netns.available()
    if why is not None:
        return why
    return stored_refusal(out, queue_ms, costs, variant, congestion, agent_report_ms, worker_niceness, methods)


def stored_refusal(
    out: Path,
    queue_ms: float,
    costs: bool,
    variant: str | None,
    congestion: str | None,
    agent_report_ms: int | None,
    worker_niceness: int | None,
    methods: list[str],
) -> str | None:
    """Why the cells stored under ``out`` cannot be tabled with the ones asked for (each
    calibration runs one queue, congestion control, agents' period, workers' nice value,
    variant and set of costs); None if they can."""
    stored = stored_cells(out)
    for (rate, method, kind), cell in stored.items():  # one queue per calibration
        ran = cell.get("queue_ms", netns.QUEUE_MS)
        if kind == "real" and ran != queue_ms:
            path = out / f"{method}-{rate}-real.json"
            return f"{path} ran with a {ran:g} ms queue, not --queue-ms {queue_ms:g}: give another --out"
    now = congestion or netns.host_congestion()
    for (rate, method, kind), cell in stored.items():  # one congestion control per calibration
        ran = cell.get("congestion")
        if kind in TWO_NODE_KINDS and ran != now and (ran is not None or congestion is not None):
            path = out / f"{method}-{rate}-{kind}.json"
            return f"{path} ran TCP's {ran or 'unrecorded'} congestion control, not {now}: give another --out"
    ray_settings = (  # one agents' report period (where the nodes are namespaced), one workers' nice value
        ("agent_report_ms", agent_report_ms, TWO_NODE_KINDS, "with Ray's agents reporting ",
         lambda ms: f"every {ms} ms" if ms else "at Ray's default period"),
        ("worker_niceness", worker_niceness, KINDS, "Ray's workers ",
         lambda n: f"at nice {n}" if n is not None else "at Ray's default nice"),
    )  # fmt: skip
    for key, now, kinds, what, said in ray_settings:
        for (rate, method, kind), cell in stored.items():
            if kind in kinds and cell.get(key) != now:
                path = out / f"{method}-{rate}-{kind}.json"
                return f"{path} ran {what}{said(cell.get(key))}, not {said(now)}: give another --out"
    for (rate, method, kind), cell in stored.items():  # one variant per calibration
        if method in methods and cell.get("variant") != variant:
            path = out / f"{method}-{rate}-{kind}.json"
            ran, now = cell.get("variant") or "default", variant or "default"
            return f"{path} ran the {ran} settings, not the {now} ones: give another --out"
    costed = [(rate, method, cell) for (rate, method, kind), cell in stored.items() if costs and kind == "costed"]
    for rate, method, cell in costed:  # the costs a costed twin charged then
        today = costed_link(rate, method)
        if cell.get("link") != today:
            path = out / f"{method}-{rate}-costed.json"
            return f"{path} charged {cell.get('link')}, not today's {today}: give another --out"
    return None


def cell_order(rate_index: int, method_index: int, costs: bool, apart: bool = False) -> list[str]:
    """The kinds of a (rate, method)'s cells, in the order they run: rotated from one
    rate (or seed) to the next and from one method to the next, so that each
    method's kinds take turns at running first on a drifting host."""
    kinds = ["real", "emulated"] + (["costed"] if costs else []) + (["apart"] if apart else [])
    shift = (rate_index + method_index) % len(kinds)
    return kinds[shift:] + kinds[:shift]


def run_cells(rates: list[str], methods: list[str], args: argparse.Namespace, out: Path) -> dict:
    """Every cell not stored under ``out`` yet, run and stored; every cell, read back."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    host = None  # probed before the first cell this invocation runs
    pairs = [(r, m, rate, method) for r, rate in enumerate(rates) for m, method in enumerate(methods)]
    for r, m, rate, method in pairs:
        for kind in cell_order(r + args.seed, m, args.costs, args.apart):  # repeats (seeds) rotate too
            path = out / f"{method}-{rate}-{kind}.json"
            if not path.is_file():
                host = host or host_figures(PROBE_S)
                print(f"-- {method} at {rate}, {kind} ({host_line(host)})", flush=True)
                ran = cell_args(method, rate, kind, args.budget, args.seed, args.variant)
                if kind in TWO_NODE_KINDS:
                    link = rate if kind == "real" else None
                    cell = real_cell(
                        ran, link, args.queue_ms, args.congestion, args.agent_report_ms, args.worker_niceness
                    )
                else:
                    cell = emulated_cell(ran, args.worker_niceness)
                cell |= {"host": host, "ran_at": time.time(), "link": charged_link(method, rate, kind)}
                cell["variant"] = args.variant  # None: the race's first (the calibration's own settings)
                cell["worker_niceness"] = args.worker_niceness  # None: Ray's default (15)
                path.write_text(json.dumps(cell, indent=1))
            cells[(rate, method, kind)] = json.loads(path.read_text())
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default=",".join(RATES), help="tbf rates, comma-separated (like 10mbit)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of training per cell")
    p.add_argument("--seed", type=int, default=0)
    queue_help = "the real links' queue, in ms of their rate (tbf's latency): what overflows is dropped"
    p.add_argument("--queue-ms", type=float, default=netns.QUEUE_MS, help=queue_help)
    congestion_help = "TCP's congestion control on the real links, e.g. cubic (default: the host's)"
    p.add_argument("--congestion", help=congestion_help)
    agents_help = ("how often Ray's dashboard agent on each namespaced node publishes its node's stats to the GCS, "
                   "in ms (default: Ray's, 5000): traffic that shares the shaped link")  # fmt: skip
    p.add_argument("--agent-report-ms", type=int, help=agents_help)
    nice_help = ("the nice value Ray starts its workers at, on every node of the real and the twin cells "
                 "(default: Ray's, 15, below the raylets' and the GCS's 0)")  # fmt: skip
    p.add_argument("--worker-niceness", type=int, help=nice_help)
    p.add_argument("--out", default="bench_runs", help="results go to OUT/calibration/")
    costs_help = "also a third twin per cell, charging the real link's measured costs (eff=, msg=)"
    p.add_argument("--costs", action="store_true", help=costs_help)
    apart_help = "also a twin on the real cell's two nodes, over unshaped veths, its bandwidth emulated"
    p.add_argument("--apart", action="store_true", help=apart_help)
    p.add_argument("--variant", help="one of the race's sweep settings for the one method (as cap0.1MB-bf16 for ddp)")
    p.add_argument("--fit", help="stored calibrations (their OUTs), comma-separated: fit their bytes")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        print("CELL " + json.dumps(run_contestant(json.loads(args.cell))), flush=True)
        return 0
    if args.fit is not None:
        dirs = [Path(d) / "calibration" if (Path(d) / "calibration").is_dir() else Path(d) for d in args.fit.split(",")]
        runs = [stored_cells(d) if d.is_dir() else {} for d in dirs]
        empty = [str(d) for d, cells in zip(dirs, runs) if not cells]
        if empty or len(runs) < 2:
            why = f"none stored in {empty[0]}" if empty else f"only {dirs[0]} given"
            print(f"error: --fit needs two or more calibrations; {why}", file=sys.stderr)
            return 2
        print(overhead_fit(runs))
        return 0
    rates, methods = args.rates.split(","), args.methods.split(",")
    out = Path(args.out) / "calibration"
    why = refusal(
        rates, methods, args.queue_ms, out, args.costs, args.variant, args.congestion, args.agent_report_ms,
        args.worker_niceness,
    )  # fmt: skip
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    cells = run_cells(rates, methods, args, out)
    text = table(cells) + "\n\n" + hosts_lines(cells)
    text += "\n\nWhere the parts' packets spent their time:\n\n" + hops_table(cells)
    roles = roles_table(cells)
    text += f"\n\nWhat crossed, per step, by what it was for:\n\n{roles}" if roles else ""
    text += connections_tables(cells)
    for over, what in (("cpu", "while each cell ran"), ("cpu_training", "while the parts trained")):
        cores = cpu_table(cells, over)
        text += f"\n\nWhere the host's CPU went {what}:\n\n{cores}" if cores else ""
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
