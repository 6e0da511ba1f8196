#!/usr/bin/env python
"""Memory stays bounded when a downstream part is slow: the queue bound holds.

    python scripts/bench_memory.py --queue-size 4 --slow 0.2

Runs the same 2-part async job twice (MNIST, L=2, K=4, width 64, batch 64):
normally, and with part 2 sleeping --slow seconds after every step. Samples,
every 0.1 s: the bytes in Ray's object store, the summed RSS of the Ray
worker processes and the driver, and how many steps part 1 is ahead of part 2
(the latents in flight). Prints the peaks of both runs and their difference
against the queue bound's worth of latents.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from raylocal.bench.links import own_ray
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.run.run import Run


def rss_bytes() -> int:
    """Summed resident memory of this process and every Ray process on the machine."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if int(pid) != os.getpid() and not cmd.startswith(b"ray::"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def store_bytes() -> int:
    """Bytes in Ray's object store, from the raylet's own accounting."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def settled_store_bytes(timeout: float = 10.0) -> int:
    """The object store's bytes once an earlier run's objects are freed (Ray frees
    them shortly after their last reference goes): the idle level to measure above."""
    gc.collect()
    last, deadline = store_bytes(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = store_bytes()
        if now == last:
            return now
        last = now
    return last


def measure(config: RaylocalConfig, data) -> dict[str, float]:
    """Peaks of a parts-only ``Run`` (its model service in this process)."""
    peaks = {"shm": 0, "rss": 0, "lag": 0}
    stop = threading.Event()
    base_store = settled_store_bytes()

    def sample() -> None:
        while not stop.is_set():
            peaks["shm"] = max(peaks["shm"], store_bytes() - base_store)
            peaks["rss"] = max(peaks["rss"], rss_bytes())
            time.sleep(0.1)

    def monitor(_actors, polled) -> None:
        peaks["lag"] = max(peaks["lag"], polled[0]["steps"] - polled[1]["steps"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        config = config.replace(storage_path=tmp, run_name="run")
        Run(config, data, service_here=True, monitor=lambda service, plan: monitor).execute()
    stop.set()
    sampler.join()
    return peaks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queue-size", type=int, default=4)
    p.add_argument("--slow", type=float, default=0.2, help="seconds part 2 sleeps after each step")
    p.add_argument("--train-subset", type=int, default=3200)
    args = p.parse_args(argv)
    import ray

    base = dict(
        n_levels=2, depth=4, hidden=64, batch_size=64, schedule="async", parts=2, part_spec="1|2",
        epochs=1, train_subset=args.train_subset, queue_size=args.queue_size, threads=1,
        cpus_per_part=1.0, progress=False, samples=0,
    )  # fmt: skip
    normal = RaylocalConfig(**base)
    slow = RaylocalConfig(**base, inject=f"slow:2@{args.slow}")
    data = load_dataset("mnist").subset(args.train_subset, 1000)
    own_ray()
    latent = 64 * 2 * 14 * 14 * 4  # part 1's output per step: 2x14x14 float32 per image
    a = measure(normal, data)
    b = measure(slow, data)
    mb = 1 / 2**20
    print(f"# bench_memory: queue bound {args.queue_size}, latent {latent / 1e3:.0f} kB per step")
    print("| run | peak object store (above idle) | peak RSS, Ray + driver | max steps part 1 ahead of part 2 |")
    print("|---|---|---|---|")
    print(f"| normal | {a['shm'] * mb:.1f} MiB | {a['rss'] * mb:.0f} MiB | {a['lag']} |")
    print(f"| part 2 slowed by {args.slow} s/step | {b['shm'] * mb:.1f} MiB | {b['rss'] * mb:.0f} MiB | {b['lag']} |")
    # in flight at most: the queue, two on the sender's side (the hand-off slot and
    # the sending thread), two on the receiver's (fetched, and being fetched), one in training
    in_flight = args.queue_size + 5
    bound = in_flight * latent
    print(
        f"\nslow - normal: object store {(b['shm'] - a['shm']) * mb:+.1f} MiB, "
        f"RSS {(b['rss'] - a['rss']) * mb:+.0f} MiB; "
        f"the bound's worth of latents ({in_flight} = queue + 5 in flight): {bound * mb:.1f} MiB"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
