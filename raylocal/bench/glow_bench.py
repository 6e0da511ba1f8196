#!/usr/bin/env python
"""Glow throughput (forward + backward images/s) for fixed configs, and the test
BPD reached on MNIST after a fixed wall-clock budget, on the current device.

    python scripts/bench_glow.py --threads 2 --budget 300
    python scripts/bench_glow.py --threads 2 --budget 0 --compile --rounds 3   # eager and compiled, interleaved
    python scripts/bench_glow.py --budget 0 --shape 3x32x32 --levels 3 --depth 32 --width 512 --full  # reference size
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raylocal.core.config import RaylocalConfig
from raylocal.core.runlog import peak_rss_mb
from raylocal.model.glow import Glow
from raylocal.model.objectives import local_nll, nll_bits, wait_for
from raylocal.run.launch import load_data
from raylocal.run.run import Run
from raylocal.training.trainer import PartTrainer, build_glow, configure_kernels, resolve_device, training_nll

CONFIGS = [
    # (image shape, L, K, width, batch)
    ((1, 32, 32), 3, 8, 64, 64),
    ((3, 32, 32), 3, 8, 128, 64),
]


def throughput(shape, levels, depth, width, batch, device, seconds: float, compiled: bool, rounds: int, **glow_kw):
    """Median fwd+bwd images/s over ``rounds`` timing windows, eager and (if asked)
    compiled windows interleaved so that both see the same host load; and the
    seconds the first compiled step took."""
    torch.manual_seed(0)
    glow = Glow(shape, levels, depth, width, **glow_kw).to(device)
    x = torch.rand(batch, *shape, device=device) - 0.5
    with torch.no_grad():
        glow(x)  # ActNorm data init
    loss_fns = {"eager": local_nll}
    if compiled:
        loss_fns["compiled"] = training_nll(RaylocalConfig(compile=True), device)
    whole = glow.whole()

    def step(loss_fn) -> None:
        glow.zero_grad(set_to_none=True)
        loss_fn(whole, x)[0].mean().backward()
        wait_for(device)

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
            rates[name].append(step_rate(lambda fn=fn: step(fn), batch, seconds))
    return {name: statistics.median(r) for name, r in rates.items()}, compile_s


def step_rate(step: Callable[[], object], batch: int, seconds: float) -> float:
    """Images per second of ``step`` (one batch of ``batch`` images), called for
    ``seconds`` and at least 5 times."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 5:
        step()
        n += 1
    return n * batch / (time.perf_counter() - start)


def training_step_rate(config: RaylocalConfig, shape, batch: int, device, seconds: float) -> dict[str, float]:
    """A full training step (``PartTrainer.step``: forward, backward, guard, clipping,
    Adam) of the whole model: images/s, and the peak memory it took (GPU: torch's
    allocator; CPU: the process's peak resident set)."""
    glow = build_glow(config, shape).to(device)
    x = torch.rand(batch, *shape, device=device) - 0.5
    with torch.no_grad():
        glow(x)
    trainer = PartTrainer(glow.whole(), 1e-4, config)
    for _ in range(3):
        trainer.step(x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        trainer.step(x)
        wait_for(device)

    rate = step_rate(step, batch, seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()

    @torch.no_grad()
    def evaluate() -> None:
        nll_bits(glow, x)
        wait_for(device)

    evaluation = step_rate(evaluate, batch, seconds)
    return {
        "train_step_images_per_s": rate,
        "peak_memory_mb": peak,
        "evaluation_images_per_s": evaluation,
        # what these mean for CIFAR-10: a fine-tune epoch of its 50,000 training images, an evaluation of its 10,000
        "cifar10_epoch_s": 50_000 / rate,
        "cifar10_evaluation_s": 10_000 / evaluation,
    }


def reconstruction_error(config: RaylocalConfig, shape, batch: int, device) -> dict[str, float]:
    """Max |x - inverse(forward(x))| of a model with non-zero couplings, with
    TF32 off (IEEE float32, the default) and on: what ``--tf32`` costs."""
    out = {}
    for tf32 in (False, True):
        glow = build_glow(config.replace(tf32=tf32), shape).to(device)
        for layer in glow.layers:  # trained-like couplings: zero ones would hide any error
            if hasattr(layer, "net"):
                torch.nn.init.normal_(layer.net.out.weight, std=0.02)
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device) - 0.5
        with torch.no_grad():
            glow(x)
            error = float((glow.reconstruct(x) - x).abs().max())
        out[f"reconstruction_max_error_tf32_{'on' if tf32 else 'off'}"] = error
    configure_kernels(config)  # the configured kernels again
    return out


def _shape(text: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in text.lower().split("x"))
    return c, h, w


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0, help="timing window per config (and per round)")
    p.add_argument("--rounds", type=int, default=1, help="timing windows per config; the median is printed")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (and train compiled)")
    p.add_argument("--budget", type=float, default=300.0, help="MNIST training budget (s); 0 skips")
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", type=_shape, help="one config instead of the built-in ones: image CxHxW, e.g. 3x32x32")
    p.add_argument("--levels", type=int, default=3, help="with --shape: Glow blocks L")
    p.add_argument("--depth", type=int, default=32, help="with --shape: flow steps K per block")
    p.add_argument("--width", type=int, default=512, help="with --shape: coupling width")
    p.add_argument("--batch", type=int, default=64, help="with --shape: batch size")
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--tf32", action="store_true", help="let convolutions and matmuls use TF32 (GPUs)")
    p.add_argument("--full", action="store_true", help="also a full training step, peak memory, reconstruction error")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configure_kernels(RaylocalConfig(tf32=args.tf32))  # (the timed models are built with Glow directly)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# bench_glow on {name}, torch {torch.__version__}")
    configs = [(args.shape, args.levels, args.depth, args.width, args.batch)] if args.shape else CONFIGS
    compiled = " | compiled images/s | first compiled step (s)" if args.compile else ""
    print(f"| image | L | K | width | batch | fwd+bwd images/s{compiled} |")
    print("|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    rows = []
    for shape, levels, depth, width, batch in configs:
        rates, compile_s = throughput(
            shape, levels, depth, width, batch, device, args.seconds, args.compile, args.rounds,
            bf16=args.precision == "bf16",
        )  # fmt: skip
        row = f"| {'x'.join(map(str, shape))} | {levels} | {depth} | {width} | {batch} | {rates['eager']:.0f} |"
        if args.compile:
            row += f" {rates['compiled']:.0f} | {compile_s:.1f} |"
        print(row, flush=True)
        figures = {"shape": list(shape), "levels": levels, "depth": depth, "width": width, "batch": batch}
        figures |= {"device": name, "precision": args.precision, "tf32": args.tf32}
        figures |= {"fwd_bwd_images_per_s": rates["eager"]}
        if args.full:
            config = RaylocalConfig(
                n_levels=levels, depth=depth, hidden=width, batch_size=batch, precision=args.precision,
                device=str(device.type), warmup_steps=0, tf32=args.tf32,
            )  # fmt: skip
            figures |= training_step_rate(config, shape, batch, device, args.seconds)
            figures |= reconstruction_error(config, shape, min(batch, 16), device)
            print("  " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if isinstance(v, float)), flush=True)
        rows.append(figures)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    if args.budget > 0:
        mnist_run(args.budget, args.threads, args.device, args.compile)


def mnist_run(budget: float, threads: int, device: str, compiled: bool) -> None:
    """A short MNIST training run (what the kernels' speed buys), printed in one line."""
    config = RaylocalConfig(
        n_levels=2, depth=8, hidden=64, batch_size=64, epochs=100, lr=[1e-3],
        time_budget=budget, threads=threads, device=device,
        samples=0, progress=False, eval_batch_size=1000, compile=compiled,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        config = config.replace(storage_path=tmp, run_name="run")
        s = Run(config, load_data(config)).execute()
    how = ", compiled" if compiled else ""
    print(
        f"\nMNIST (1x28x28, L=2, K=8, width 64, batch 64, Adam 1e-3{how}): test BPD "
        f"{s['test_bpd']:.4f} after {s['wall_time']:.0f}s of training "
        f"({s['steps']} steps, {s['images_per_s']:.0f} images/s incl. optimizer)"
    )


if __name__ == "__main__":
    main()
