#!/usr/bin/env python
"""Throughput of the async part trainer against end-to-end baselines, side by side.

    python scripts/bench_async.py                  # 2 parts, CPU threads
    python scripts/bench_async.py --gpu            # one GPU per actor (a share of one if too few)

Measures on MNIST (1x28x28, L=2, K=8 by default (--depth), width 64, batch 64):
  - one end-to-end process with 1 thread, and with 2 threads (images/s, optimizer included),
    before and again after the async run (the ratios use the mean: the host's speed drifts)
  - K part actors of 1 thread each (or 1 GPU each): images/s through the whole model
  - the latent queue's own overhead per step (put + get of one latent, no contention)
    against a part's mean step time
  - end-to-end DDP on K Ray Train workers: images/s and bytes all-reduced per step,
    against the bytes parts send forward per step
  - on Linux, where the machine's CPU time went during the async steady state: the
    part actors, the queue actors, the driver, Ray's own processes, anything else,
    idle, and time the hypervisor took (steal)
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch

from raylocal.bench.glow_bench import step_rate
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.core.tensors import tensor_bytes
from raylocal.model.objectives import preprocess
from raylocal.run.run import Run
from raylocal.training.trainer import PartTrainer, build_glow, initialize, resolve_device


class CpuMeter:
    """Samples every process's CPU time and the machine's idle and steal time
    from /proc (Linux) on a background thread, so that the CPU time of a window
    can be split by who used it. Elsewhere it records nothing."""

    GROUPS = ("part actors", "queue actors", "driver", "raylet", "gcs_server", "other Ray", "other", "idle", "steal")

    def __init__(self, interval: float = 0.5) -> None:
        self.available = Path("/proc/stat").is_file()
        self.ticks = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.samples: list[tuple[float, dict[int, tuple[str, float]], tuple[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def __enter__(self) -> CpuMeter:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(interval)
        self.samples.append(self.sample())

    def group(self, pid: int, comm: str, cmdline: str) -> str:
        if pid == os.getpid():
            return "driver"
        if cmdline.startswith("ray::PartActor"):
            return "part actors"
        if cmdline.startswith("ray::_ChannelActor"):
            return "queue actors"
        if comm in ("raylet", "gcs_server"):
            return comm
        # Ray's agents and monitors are Python scripts inside the ray package
        return "other Ray" if cmdline.startswith("ray::") or "/ray/" in cmdline else "other"

    def sample(self) -> tuple[float, dict[int, tuple[str, float]], tuple[float, float]]:
        now = time.time()
        procs: dict[int, tuple[str, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # the process ended while we looked
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
            cpu = (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime
            procs[int(entry.name)] = (self.group(int(entry.name), comm, cmdline), cpu)
        total = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle, steal = (total[3] + total[4]) / self.ticks, total[7] / self.ticks  # idle + iowait, steal
        return now, procs, (idle, steal)

    def split(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per group between the first sample at or after ``start`` and the
        last at or before ``end``, and their distance (``"seconds"``); empty without
        two samples in the window. (A sample after ``end`` may already miss the
        processes that worked in it: the parts' actors end with their phase.)"""
        times = [t for t, _, _ in self.samples]
        i = min(bisect.bisect_left(times, start), len(times) - 1)
        j = bisect.bisect_right(times, end) - 1
        if j <= i:
            return {}
        (t0, before, (idle0, steal0)), (t1, after, (idle1, steal1)) = self.samples[i], self.samples[j]
        used = dict.fromkeys(self.GROUPS, 0.0)
        for pid, (group, cpu) in after.items():
            used[group] += cpu - (before[pid][1] if pid in before else 0.0)  # new processes count from 0
        used["idle"], used["steal"] = idle1 - idle0, steal1 - steal0
        used["seconds"] = t1 - t0
        return used


def random_images(n: int = 1280) -> torch.Tensor:
    """``n`` MNIST-shaped images of random bytes (seed 0): what the host-speed probe
    and the step timings train on, so that they need no dataset."""
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def training_batches(
    images: torch.Tensor, noise: torch.Generator, device: torch.device, n: int = 20
) -> list[torch.Tensor]:
    """The first ``n`` batches of 64 of ``images``, dequantised as training does."""
    return [preprocess(images[i * 64 : (i + 1) * 64].to(device), 8, noise) for i in range(n)]


def e2e_throughput(config: RaylocalConfig, images: torch.Tensor, threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # (--compile) inductor's kernels fix their thread count when compiled
    device = resolve_device(config.cluster.device)
    glow = build_glow(config, tuple(images.shape[1:])).to(device)
    noise = torch.Generator().manual_seed(1)
    initialize([glow.whole()], preprocess(images[:512].to(device), 8, noise))
    trainer = PartTrainer(glow.whole(), 1e-3, config)
    batches = training_batches(images, noise, device)
    for b in batches[:3]:
        trainer.step(b)  # (with --compile, the first of these compiles)
    cycle = itertools.cycle(batches)

    def step() -> None:
        trainer.step(next(cycle))
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step_rate(step, 64, seconds)


def queue_overhead(latent: torch.Tensor, n: int = 200) -> float:
    """Seconds per step of ray.put + queue put + queue get + ray.get, uncontended."""
    import ray

    from raylocal.cluster.queue import LatentQueue

    q = LatentQueue(4)
    start = time.perf_counter()
    for i in range(n):
        q.put({"kind": "data", "step": i, "latent": ray.put(latent), "weights": None})
        ray.get(q.get()["latent"])
    per_step = (time.perf_counter() - start) / n
    q.shutdown()
    return per_step


class AsyncBench:
    """One side-by-side measurement: the e2e baselines, the async parts between
    two rounds of them, the latent queue alone, and DDP on as many workers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.k, self.gpu, self.seconds = args.parts, args.gpu, args.seconds
        base = dict(
            n_levels=2, depth=args.depth, hidden=64, batch_size=64, schedule="async", parts=self.k,
            split="across-blocks", balance="measure", epochs=1, warmup_steps=50, device="cuda" if args.gpu else "cpu",
            train_subset=args.train_subset, progress=True, queue_size=4, part_spec=args.part_spec,
            compile=args.compile, samples=0,
        )  # fmt: skip
        # --gpu: one GPU per part, or an equal share of one when there are fewer GPUs than parts
        self.config = RaylocalConfig(**base, threads=1, cpus_per_part=1.0, gpus_per_part=None if args.gpu else 0.0)
        self.data = load_dataset("mnist").subset(args.train_subset, 1000)

    def baselines(self) -> tuple[float, float]:
        """images/s of one e2e process with 1 and with 2 threads."""
        one = e2e_throughput(self.config, self.data.train, 1, self.seconds)
        print(f"e2e, 1 process, 1 thread:  {one:.0f} images/s", flush=True)
        two = e2e_throughput(self.config, self.data.train, 2, self.seconds)
        print(f"e2e, 1 process, 2 threads: {two:.0f} images/s", flush=True)
        return one, two

    def run_parts(self) -> None:
        """The async run's parts (a parts-only ``Run``, its model service in this
        process), with the CPU meter on; keeps what the reports need."""
        from raylocal.cluster.placement import PartBundles  # (imports Ray: only the cells that use it do)

        with tempfile.TemporaryDirectory() as tmp, CpuMeter() as meter:
            config = self.config.replace(storage_path=tmp, run_name="run")
            run = Run(config, self.data, service_here=True, monitor=self._announce)
            run.execute()
        parts, self.plan = run.carry.parts, run.carry.plan
        self.stats, self.report, wall = parts.stats, parts.report, parts.wall
        # steady state: images through the last part between the end of its first step and its last
        last = self.stats[-1]
        self.steady = (last["steps"] - 1) * 64 / (last["end_time"] - last["first_step_time"])
        self.cpu = meter.split(last["first_step_time"], last["end_time"])
        self.step_time = [st["compute_s"] / max(st["steps"], 1) for st in self.stats]
        unit = f"{PartBundles.plan(self.config, self.k).part_gpus:.3g} GPU" if self.gpu else "thread"
        print(
            f"async, {self.k} actors x 1 {unit}: {self.steady:.0f} images/s through the whole model in steady "
            f"state ({self.report['images_per_s_pipeline']:.0f} including start-up: {last['steps']} steps in "
            f"{wall:.1f}s)"
        )

    def _announce(self, service: Any, plan: dict[str, Any]) -> None:
        # --balance measure timed the layers on the service's device: the one the parts train on
        print(f"parts: {plan['canonical']}", flush=True)

    def print_ratios(self, before: tuple[float, float], after: tuple[float, float]) -> None:
        # The host's speed drifts over minutes: the baselines were measured before and
        # after the async run, and the ratios use their mean, so that drift does not bias them.
        e2e1, e2e2 = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        print(
            f"  ratio to e2e 1 thread: {self.steady / e2e1:.2f}x, to e2e 2 threads: {self.steady / e2e2:.2f}x "
            "(against the mean of the baselines before and after)"
        )
        print(f"  part compute per step (s): {', '.join(f'{t:.4f}' for t in self.step_time)}")
        cpu = dict(self.cpu)
        if cpu:
            capacity = cpu.pop("seconds") * (os.cpu_count() or 1)
            print(
                f"  where the {os.cpu_count()} CPUs went in the steady state (% of {capacity:.0f} CPU-s): "
                + ", ".join(f"{name} {100 * v / capacity:.1f}" for name, v in cpu.items())
            )
        sends = [st["put_s"] / max(st["steps"], 1) for st in self.stats[:-1]]
        recvs = [st["wait_s"] / max(st["steps"], 1) for st in self.stats[1:]]
        print(
            "  training thread blocked per step on sending (ms): "
            + ", ".join(f"{1e3 * v:.2f} ({100 * v / t:.1f}%)" for v, t in zip(sends, self.step_time))
            + "; on receiving (ms, includes waiting for a slower upstream): "
            + ", ".join(f"{1e3 * v:.2f} ({100 * v / t:.1f}%)" for v, t in zip(recvs, self.step_time[1:]))
        )

    def print_traffic(self) -> None:
        """The queue's own cost per step, and the bytes parts and DDP send per step."""
        with torch.no_grad():
            a, b = self.plan["bounds"][0]
            glow = build_glow(self.config, self.data.shape)
            y, _ = glow.part(a, b)(preprocess(self.data.train[:64], 8))
        overhead = queue_overhead(y)
        print(
            f"queue round trip without overlap (ray.put + put + get + ray.get): {overhead * 1e3:.2f} ms "
            f"per step (latent {tensor_bytes(y) / 1e3:.0f} kB) = {100 * overhead / min(self.step_time):.1f}% "
            "of the fastest part's step; the trainer overlaps it with compute (above)"
        )
        print(
            f"bytes per step: parts send {tensor_bytes(y) / 1e3:.0f} kB forward per boundary, 0 backward; "
            f"DDP all-reduces {self.report['ddp_bytes_per_step'] / 1e3:.0f} kB per worker "
            f"({sum(p.numel() for p in glow.parameters())} parameters)"
        )

    def ddp_config(self, storage: str) -> RaylocalConfig:
        """DDP on as many workers as there are parts, one epoch at Adam 1e-3, a CPU
        each, or a GPU each where there are enough (``--gpu``; else on CPUs, said
        so by the placement: never refused at the end). The batch is the parts'
        rounded down to a multiple of the workers (64 over 3 workers: 63)."""
        m, s = self.config.model, self.config.schedule
        return RaylocalConfig(
            n_levels=m.n_levels, depth=m.depth, hidden=m.hidden, batch_size=s.batch_size // self.k * self.k,
            warmup_steps=s.warmup_steps, train_subset=self.config.data.train_subset, samples=0, progress=False,
            schedule="data-parallel", workers=self.k, cpus_per_part=1.0, epochs=1, lr=[1e-3],
            device="auto" if self.gpu else "cpu", storage_path=storage, run_name="ddp",
        )  # fmt: skip

    def run_ddp(self) -> None:
        """The DDP baseline: a data-parallel ``Run``, as the race's cells are."""
        with tempfile.TemporaryDirectory() as tmp:
            run = Run(self.ddp_config(tmp), self.data)
            summary = run.execute()
        history = summary["history"]
        ips = history[-1]["ddp_images_per_s"] if history else float("nan")
        where = "a GPU each" if run.placement.workers.use_gpu else "1 thread"
        print(f"DDP e2e, {self.k} workers x {where}: {ips:.0f} images/s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30.0, help="timing window of the e2e baselines")
    p.add_argument("--train-subset", type=int, default=12800, help="images the async run trains on")
    p.add_argument("--gpu", action="store_true", help="parts on GPUs (one each, or a share of one)")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--depth", type=int, default=8, help="flow steps per block (K)")
    p.add_argument("--part-spec", default=None, help="explicit parts (default: balanced on measured layer times)")
    p.add_argument("--compile", action="store_true", help="torch.compile the e2e and part steps alike")
    args = p.parse_args(argv)

    import ray

    bench = AsyncBench(args)
    name = torch.cuda.get_device_name() if args.gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"# bench_async on {name}, torch {torch.__version__}, ray {ray.__version__}")
    before = bench.baselines()
    bench.run_parts()
    print("e2e again after the async run:")
    after = bench.baselines()
    bench.print_ratios(before, after)
    bench.print_traffic()
    if not args.skip_ddp:
        bench.run_ddp()
    ray.shutdown()


if __name__ == "__main__":
    main()
