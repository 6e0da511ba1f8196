#!/usr/bin/env python
"""Glow throughput (forward + backward images/s) for fixed configs, and the test
BPD reached on MNIST after a fixed wall-clock budget, on the current device.

    python scripts/bench_glow.py --threads 2 --budget 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from raylocal.cli import load_data  # noqa: E402
from raylocal.config import RunConfig  # noqa: E402
from raylocal.glow import Glow  # noqa: E402
from raylocal.objectives import nll_bits  # noqa: E402
from raylocal.schedules import SingleProcessRun  # noqa: E402
from raylocal.train import resolve_device  # noqa: E402

CONFIGS = [
    # (image shape, L, K, width, batch)
    ((1, 32, 32), 3, 8, 64, 64),
    ((3, 32, 32), 3, 8, 128, 64),
]


def throughput(shape, levels, depth, width, batch, device, seconds: float) -> float:
    torch.manual_seed(0)
    glow = Glow(shape, levels, depth, width).to(device)
    x = torch.rand(batch, *shape, device=device) - 0.5
    with torch.no_grad():
        glow(x)  # ActNorm data init

    def step() -> None:
        glow.zero_grad(set_to_none=True)
        nll_bits(glow, x).mean().backward()

    for _ in range(3):
        step()
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - start >= seconds and n >= 5:
            break
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0, help="timing window per config")
    p.add_argument("--budget", type=float, default=300.0, help="MNIST training budget (s); 0 skips")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# bench_glow on {name}, torch {torch.__version__}")
    print("| image | L | K | width | batch | fwd+bwd images/s |")
    print("|---|---|---|---|---|---|")
    for shape, levels, depth, width, batch in CONFIGS:
        ips = throughput(shape, levels, depth, width, batch, device, args.seconds)
        print(
            f"| {'x'.join(map(str, shape))} | {levels} | {depth} | {width} | {batch} | {ips:.0f} |",
            flush=True,
        )
    if args.budget > 0:
        config = RunConfig(
            n_levels=2, depth=8, hidden=64, batch_size=64, epochs=100, lr=[1e-3],
            time_budget=args.budget, threads=args.threads, device=args.device,
            samples=0, progress=False, eval_batch_size=1000,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            s = SingleProcessRun(config, load_data(config), Path(tmp) / "run").run()
        print(
            f"\nMNIST (1x28x28, L=2, K=8, width 64, batch 64, Adam 1e-3): test BPD "
            f"{s['test_bpd']:.4f} after {s['wall_time']:.0f}s of training "
            f"({s['steps']} steps, {s['images_per_s']:.0f} images/s incl. optimizer)"
        )


if __name__ == "__main__":
    main()
