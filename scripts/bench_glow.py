#!/usr/bin/env python
"""Glow throughput (forward + backward images/s) for fixed configs, and the test
BPD reached on MNIST after a fixed wall-clock budget, on the current device.

    python scripts/bench_glow.py --threads 2 --budget 300
    python scripts/bench_glow.py --threads 2 --budget 0 --compile --rounds 3   # eager and compiled, interleaved
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from raylocal.cli import load_data  # noqa: E402
from raylocal.config import RunConfig  # noqa: E402
from raylocal.glow import Glow  # noqa: E402
from raylocal.objectives import local_nll  # noqa: E402
from raylocal.schedules import SingleProcessRun  # noqa: E402
from raylocal.train import resolve_device, training_nll  # noqa: E402

CONFIGS = [
    # (image shape, L, K, width, batch)
    ((1, 32, 32), 3, 8, 64, 64),
    ((3, 32, 32), 3, 8, 128, 64),
]


def throughput(shape, levels, depth, width, batch, device, seconds: float, compiled: bool, rounds: int):
    """Median fwd+bwd images/s over ``rounds`` timing windows, eager and (if asked)
    compiled windows interleaved so that both see the same host load; and the
    seconds the first compiled step took."""
    torch.manual_seed(0)
    glow = Glow(shape, levels, depth, width).to(device)
    x = torch.rand(batch, *shape, device=device) - 0.5
    with torch.no_grad():
        glow(x)  # ActNorm data init
    loss_fns = {"eager": local_nll}
    if compiled:
        loss_fns["compiled"] = training_nll(RunConfig(compile=True), device)
    whole = glow.whole()

    def step(loss_fn) -> None:
        glow.zero_grad(set_to_none=True)
        loss_fn(whole, x)[0].mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    compile_s = 0.0
    for name, fn in loss_fns.items():
        start = time.perf_counter()
        step(fn)
        if name == "compiled":
            compile_s = time.perf_counter() - start
        for _ in range(2):
            step(fn)
    rates: dict[str, list[float]] = {name: [] for name in loss_fns}
    for _ in range(rounds):
        for name, fn in loss_fns.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or n < 5:
                step(fn)
                n += 1
            rates[name].append(n * batch / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}, compile_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0, help="timing window per config (and per round)")
    p.add_argument("--rounds", type=int, default=1, help="timing windows per config; the median is printed")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (and train compiled)")
    p.add_argument("--budget", type=float, default=300.0, help="MNIST training budget (s); 0 skips")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# bench_glow on {name}, torch {torch.__version__}")
    compiled = " | compiled images/s | first compiled step (s)" if args.compile else ""
    print(f"| image | L | K | width | batch | fwd+bwd images/s{compiled} |")
    print("|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for shape, levels, depth, width, batch in CONFIGS:
        rates, compile_s = throughput(
            shape, levels, depth, width, batch, device, args.seconds, args.compile, args.rounds
        )
        row = f"| {'x'.join(map(str, shape))} | {levels} | {depth} | {width} | {batch} | {rates['eager']:.0f} |"
        if args.compile:
            row += f" {rates['compiled']:.0f} | {compile_s:.1f} |"
        print(row, flush=True)
    if args.budget > 0:
        config = RunConfig(
            n_levels=2, depth=8, hidden=64, batch_size=64, epochs=100, lr=[1e-3],
            time_budget=args.budget, threads=args.threads, device=args.device,
            samples=0, progress=False, eval_batch_size=1000, compile=args.compile,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            s = SingleProcessRun(config, load_data(config), Path(tmp) / "run").run()
        how = ", compiled" if args.compile else ""
        print(
            f"\nMNIST (1x28x28, L=2, K=8, width 64, batch 64, Adam 1e-3{how}): test BPD "
            f"{s['test_bpd']:.4f} after {s['wall_time']:.0f}s of training "
            f"({s['steps']} steps, {s['images_per_s']:.0f} images/s incl. optimizer)"
        )


if __name__ == "__main__":
    main()
