"""What the link emulator leaves out, measured one kind of message at a time.

The emulator charges a message its payload's bytes at the link's rate and
nothing else. On two Ray nodes in network namespaces, joined by a link that
``tbf`` shapes in the kernel (``raylocal.cluster.netns``), this sends messages
of one kind at several sizes and counts what the kernel put on the wire (node
0's veth, both directions, less the idle cluster's traffic over the same
seconds):

- ``tcp``: one transfer on a new connection, per size: the rate it reaches
  (TCP's ramp-up and the token bucket's burst);
- ``ray-object``: an object an actor on node 1 put, fetched from node 0 one
  at a time (what the parts' receiver does with a latent or the weights);
- ``actor-call``: a call of an actor on node 1 with a small argument, answered
  (what a part's put into, or get from, the latent queue is);
- ``gloo``: an all-reduce between two processes, one per node (DDP's
  buckets, local SGD's rounds, the time budget's flag).

For each Ray and gloo kind it fits, over the sizes (least squares, no
intercept): kernel bytes = a · our bytes + b · messages, and seconds =
c · (our bytes at the rate, one way) + d · messages. ``a`` is what the headers and
acknowledgements add per byte, ``b`` the bytes and ``d`` the seconds each
message costs beyond its payload.

    python -m raylocal.tools.wire_costs --rate 10mbit --out bench_runs

Results: ``OUT/wire-costs/costs-RATE.json`` and ``table-RATE.md``; with
``--out`` where they are, it tables them again and runs nothing. Needs root
(namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from raylocal.cluster import netns
from raylocal.errors import ClusterError

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

KINDS = ("tcp", "ray-object", "actor-call", "gloo")
SIZES = {  # bytes of payload per message: the race's own messages among them
    "tcp": (16_384, 131_072, 1_048_576),
    "ray-object": (1_024, 16_384, 200_704, 1_048_576),  # 200,704: a part-1 latent (64 x 784 x 4 B)
    "actor-call": (0, 1_024, 16_384),
    "gloo": (8, 8_192, 104_857, 617_728),  # the flag, the buffers, a 0.1 MB bucket, the whole gradient
}
PER_SIZE_S = 4.0  # seconds of payload at the link's rate per size (fewer messages as they grow)
MOST, FEWEST = 200, 4  # messages per size
IDLE_S = 5.0  # seconds of the idle cluster's traffic measured before each kind
GLOO_PORT = 29531


def messages_per_size(size: int, bits: float) -> int:
    """As many messages of ``size`` as ``PER_SIZE_S`` at the rate carries, within [FEWEST, MOST]."""
    return int(min(MOST, max(FEWEST, bits / 8 * PER_SIZE_S // max(size, 1))))


def fit(rows: list[dict[str, float]], x: str, y: str) -> tuple[float, float, float]:
    """``y = a·x + b·messages`` by least squares over the rows; returns (a, b,
    the largest residual as a share of its row's ``y``)."""
    design = np.array([[r[x], r["messages"]] for r in rows], dtype=float)
    target = np.array([r[y] for r in rows], dtype=float)
    (a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    worst = float(np.max(np.abs(design @ np.array([a, b]) - target) / np.maximum(np.abs(target), 1e-12)))
    return float(a), float(b), worst


# ---------------------------------------------------------------- on node 0, inside the cluster


class WireCounter:
    """Bytes through one veth (both directions), less the idle traffic's rate over the same seconds."""

    def __init__(self, veth: str) -> None:
        self.stats = Path("/sys/class/net") / veth / "statistics"
        self.idle = 0.0

    def now(self) -> int:
        return sum(int((self.stats / f"{d}_bytes").read_text()) for d in ("tx", "rx"))

    def measure_idle(self, seconds: float) -> float:
        start = self.now()
        time.sleep(seconds)
        self.idle = (self.now() - start) / seconds
        return self.idle

    def count(self, send: Any) -> tuple[float, float]:
        """(bytes beyond the idle traffic, seconds) of ``send()``."""
        start, began = self.now(), time.perf_counter()
        send()
        seconds = time.perf_counter() - began
        return self.now() - start - self.idle * seconds, seconds


def _remote_classes() -> tuple[Any, Any]:
    import ray
    import torch

    @ray.remote(num_cpus=0)
    class Far:
        """On node 1: puts objects for node 0 to fetch, and answers calls."""

        def put(self, size: int, n: int) -> list[Any]:
            return [ray.put(torch.full((size // 4,), float(i))) for i in range(n)]

        def call(self, payload: bytes) -> int:
            return len(payload)

    @ray.remote(num_cpus=0)
    class Reducer:
        """One gloo rank: all-reduces of one size, timed."""

        def __init__(self, rank: int, address: str) -> None:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://{address}:{GLOO_PORT}", rank=rank, world_size=2)

        def reduce(self, size: int, n: int) -> None:
            import torch.distributed as dist

            t = torch.ones(max(size // 4, 1))
            for _ in range(n):
                dist.all_reduce(t)

    return Far, Reducer


def _sender(kind: str, size: int, n: int, far: Any, ranks: list[Any]) -> tuple[Any, float]:
    """What sends ``n`` messages of ``kind`` and ``size``, and our count of their bytes."""
    import ray

    from raylocal.baselines.projection import ring_bytes

    if kind == "ray-object":
        refs = ray.get(far.put.remote(size, n))  # put before the count: only the fetches are counted
        return (lambda: [ray.get(r) for r in refs]), size * n
    if kind == "actor-call":
        payload = b"x" * size
        return (lambda: [ray.get(far.call.remote(payload)) for _ in range(n)]), size * n
    # gloo: each rank sends its ring share, and the wire carries both ranks'
    return (lambda: ray.get([r.reduce.remote(size, n) for r in ranks])), 2 * ring_bytes(size, 2) * n


def inside(spec: dict[str, Any]) -> dict[str, Any]:
    """The Ray and gloo kinds, run from node 0 of a 2-node cluster (RAY_ADDRESS).
    ``spec``: node 0's veth and address, the rate's bits, the idle seconds, and
    (a test's) ``sizes`` per kind and ``messages`` per size in place of the defaults."""
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    counter = WireCounter(spec["veth"])
    Far, Reducer = _remote_classes()
    far = Far.options(resources={"node1": 0.01}).remote()
    ray.get(far.call.remote(b""))  # the actor up, before anything is counted
    ranks = [Reducer.options(resources={f"node{k}": 0.01}).remote(k, spec["address"]) for k in (0, 1)]
    ray.get([r.reduce.remote(8, 1) for r in ranks])  # gloo's connections made
    rows: dict[str, list[dict[str, float]]] = {}
    idle: dict[str, float] = {}
    for kind in KINDS[1:]:
        idle[kind] = counter.measure_idle(spec["idle_s"])
        # the gloo kind's sends are two actor calls a size: what those cost alone is taken off
        calls = counter.count(_sender(kind, 8, 0, far, ranks)[0]) if kind == "gloo" else (0.0, 0.0)
        rows[kind] = []
        for size in spec.get("sizes", SIZES)[kind]:
            n = spec.get("messages") or messages_per_size(size, spec["bits"])
            send, ours = _sender(kind, size, n, far, ranks)
            crossed, seconds = counter.count(send)
            rows[kind].append(
                {"size": size, "messages": n, "ours": ours, "kernel": crossed - calls[0], "seconds": seconds - calls[1]}
            )
    return {"rows": rows, "idle_bytes_per_s": idle}


# ---------------------------------------------------------------- the driver, outside


def measure(rate: str, congestion: str | None = None) -> dict[str, Any]:
    """Every kind over a 2-node ``rate`` link whose TCP runs ``congestion`` (None: the
    host's default); the Ray kinds from a process on node 0."""
    bits = netns.rate_bits(rate)
    with netns.Network([rate, rate], congestion=congestion) as net:
        ran = net.congestion_control()
        tcp = [{"size": s, "reached_bits_per_s": netns.tcp_rate(net, s)} for s in SIZES["tcp"]]
        with netns.ray_cluster(net, cpus=1) as env:
            spec = {"veth": net.veth(0), "address": net.address(0), "bits": bits, "idle_s": IDLE_S}
            argv = [sys.executable, "-m", "raylocal.tools.wire_costs", "--inside", json.dumps(spec)]
            done = net.run(0, argv, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("COSTS ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-2:]
        raise SystemExit("error: the measurement on node 0 failed: " + " | ".join(tail))
    return {"rate": rate, "bits_per_s": bits, "congestion": ran, "tcp": tcp} | json.loads(line.removeprefix("COSTS "))


def wire_seconds(kind: str, ours: float, bits: float) -> float:
    """Our bytes' time on the link: a gloo all-reduce's two ranks send at once, one
    each way on a full-duplex link, so its time is one rank's share's."""
    return ours * 8 / bits / (2 if kind == "gloo" else 1)


def fits(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per kind: bytes = a·ours + b·messages; seconds = c·(ours at the rate) + d·messages."""
    out = {}
    for kind, rows in result["rows"].items():
        timed = [r | {"wire_s": wire_seconds(kind, r["ours"], result["bits_per_s"])} for r in rows]
        a, b, worst_bytes = fit(rows, "ours", "kernel")
        c, d, worst_s = fit(timed, "wire_s", "seconds")
        out[kind] = {"a": a, "b": b, "bytes_fit_worst": worst_bytes, "c": c, "d": d, "seconds_fit_worst": worst_s}
    return out


def table(result: dict[str, Any], fitted: dict[str, dict[str, float]]) -> str:
    bits, tcp = result["bits_per_s"], result.get("congestion", "unrecorded")
    lines = [
        f"Over a {result['rate']} tbf link between two namespaced nodes (TCP {tcp}):\n",
        "| kind | message size | messages | kernel bytes per message | of our bytes | seconds per message | "
        "of our bytes' time at the rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, rows in result["rows"].items():
        for r in rows:
            share = f"{r['kernel'] / r['ours']:.3f}" if r["ours"] else "-"
            slow = f"{r['seconds'] / wire_seconds(kind, r['ours'], bits):.2f}" if r["ours"] else "-"
            lines.append(
                f"| {kind} | {r['size']:,.0f} B | {r['messages']} | {r['kernel'] / r['messages']:,.0f} | {share} | "
                f"{1e3 * r['seconds'] / r['messages']:.1f} ms | {slow} |"
            )
    lines += [
        "",
        "| kind | a: kernel bytes per byte | b: bytes per message | worst row off the fit | "
        "c: seconds per wire second | d: ms per message | worst row off the fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, f in fitted.items():
        lines.append(
            f"| {kind} | {f['a']:.3f} | {f['b']:,.0f} | {100 * f['bytes_fit_worst']:.1f}% | {f['c']:.3f} | "
            f"{1e3 * f['d']:.2f} | {100 * f['seconds_fit_worst']:.1f}% |"
        )
    lines += ["", "| TCP transfer on a new connection | reached | of the rate |", "|---|---|---|"]
    lines += [f"| {t['size']:,} B | {t['reached_bits_per_s'] / 1e6:.3g} Mbit/s | "
              f"{t['reached_bits_per_s'] / bits:.1%} |" for t in result["tcp"]]  # fmt: skip
    idle = ", ".join(f"{k} {v / 1e3:.1f} kB/s" for k, v in result["idle_bytes_per_s"].items())
    lines += ["", f"The idle cluster's own traffic, measured before each kind and taken off: {idle}."]
    return "\n".join(lines)


def _measured(rate: str, congestion: str | None) -> dict[str, Any] | None:
    from raylocal.bench.links import host_figures

    why = netns.available()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return None
    return measure(rate, congestion) | {"host": host_figures(0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="10mbit", help="the link's tbf rate (like 10mbit)")
    p.add_argument("--out", default="bench_runs", help="results go to OUT/wire-costs/")
    p.add_argument("--congestion", help="the link's TCP congestion control, e.g. cubic (default: the host's)")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inside:
        print("COSTS " + json.dumps(inside(json.loads(args.inside))), flush=True)
        return 0
    try:
        netns.rate_bits(args.rate)
        netns.check_congestion(args.congestion)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) / "wire-costs"
    stored = out / f"costs-{args.rate}.json"
    if stored.is_file():  # measured before: tabled again, nothing run
        result = json.loads(stored.read_text())
        ran = result.get("congestion")
        if args.congestion is not None and ran != args.congestion:
            print(f"error: {stored} ran TCP's {ran or 'unrecorded'} congestion control, not {args.congestion}: "
                  "give another --out", file=sys.stderr)  # fmt: skip
            return 2
    else:
        result = _measured(args.rate, args.congestion)
        if result is None:
            return 2
    fitted = fits(result)
    text = table(result, fitted)
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(result | {"fits": fitted}, indent=1) + "\n")
    (out / f"table-{args.rate}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
