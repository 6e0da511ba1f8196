"""One check of a GPU host, in a few minutes (``scripts/gpu_check.sh``).

It writes everything under ``--out`` and checks, in order:

1. what torch sees: versions, the GPU (one line and the CPU path if none);
2. Glow's throughput (``scripts/bench_glow.py --full``): forward+backward,
   full training steps and evaluation, peak memory, reconstruction error with
   TF32 off and on; on a GPU, the same again with ``--tf32`` (its speed);
3. a 3-part async run on this host's GPU (fractional shares for the parts, the
   model service and the Ray Train fine-tune on it), whose driver never
   initialises CUDA and whose summary shows where every phase ran;
4. a faults run: bfloat16 latents, a part killed by the driver, the fine-tune's
   Ray Train worker killed and resumed;
5. that every checkpoint the runs wrote loads on a CPU-only process.

Without a GPU the same steps run on the CPU, and the report says what that skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# The reference work's Glow (CIFAR-10: 3x32x32, L=3, K=32, width 512) for throughput,
# and the embedded default's model for the runs (MNIST, which L=3 cannot divide).
REFERENCE = ["--shape", "3x32x32", "--levels", "3", "--depth", "32", "--width", "512", "--batch", "64"]
TINY = ["--shape", "1x8x8", "--levels", "2", "--depth", "2", "--width", "8", "--batch", "16"]
RUN = {"n_levels": 2, "depth": 4, "hidden": 64, "train_subset": 10000, "test_subset": 2000, "epochs": 1}
# --tiny on a real dataset stays tiny: its first 256 training and 64 test images
TINY_RUN = {
    "n_levels": 2, "depth": 2, "hidden": 8, "batch_size": 16, "init_batch_size": 64, "eval_batch_size": 32, "epochs": 3,
    "samples": 4, "train_subset": 256, "test_subset": 64,
}  # fmt: skip


def versions() -> dict[str, Any]:
    import ray

    # is_available() asks the driver and creates no CUDA context (the GPU's name
    # would: bench_glow, in its own process, reports it)
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "ray": ray.__version__,
        "gpu": torch.cuda.is_available(),
    }


def bench(out: Path, gpu: bool, tiny: bool, tf32: bool = False) -> dict[str, Any]:
    """``bench_glow.py --full`` in its own process (this one stays free of CUDA)."""
    size = TINY if tiny else REFERENCE
    seconds = "0.2" if tiny else ("8" if gpu else "2")
    figures = out / f"glow{'-tf32' if tf32 else ''}.json"
    command = [sys.executable, "-m", "raylocal.bench.glow_bench", "--budget", "0", "--full", *size]
    command += ["--seconds", seconds, "--device", "cuda" if gpu else "cpu", "--json", str(figures)]
    subprocess.run(command + (["--tf32"] if tf32 else []), check=True, timeout=300)
    return json.loads(figures.read_text())["rows"][0]


def async_run(out: Path, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A run of ``scripts/run_async.py`` in this process, as its driver."""
    from raylocal.cli.train import main

    argv = ["--storage-path", str(out / "runs"), "--run-name", name, "--no-progress"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    defaults = {"schedule": "async", "parts": 3, "finetune_epochs": 1, "warmup_steps": 20, "lr": [1e-3]}
    if main(argv, defaults=defaults) != 0:
        raise SystemExit(f"gpu_check: the {name} run failed (see above)")
    return json.loads((out / "runs" / name / "summary.json").read_text())


def where(summary: dict[str, Any]) -> dict[str, Any]:
    w = summary["where"]
    return {
        "driver": w["driver"]["device"],
        "parts": [p["device"] for p in w["parts"]],
        "service": w["service"]["device"],
        "finished": w["finished"]["device"],
    }


def runs(out: Path, data: dict[str, Any], gpu: bool, tiny: bool = False) -> dict[str, Any]:
    """The plain run and the faults run; the driver must not have touched CUDA.
    (``tiny``, the test suite's CPU path: the faults run stands for both, one
    Ray instance's worth of process starts less.)"""
    # part 2 killed mid-stream (a slow part 2 keeps its upstream sending), checkpoints every 2 steps
    faults = async_run(
        out,
        "faults",
        data | {"wire_dtype": "bfloat16", "inject": "ray-kill:2@5,sigkill:4@2,slow:2@0.02", "checkpoint_every": 2},
    )
    plain = faults if tiny else async_run(out, "async", data)
    result = {
        "driver_initialised_cuda": torch.cuda.is_initialized(),
        "async": {"test_bpd": plain["test_bpd"], "wall_time": plain["wall_time"], "where": where(plain)},
        "faults": {
            "test_bpd": faults["test_bpd"],
            "restarts": faults["restarts"],
            "finetune_killed": (out / "runs" / "faults" / ".fault-sigkill-4@2").exists(),
            "where": where(faults),
        },
    }
    device = "cuda" if gpu else "cpu"
    placed = result["async"]["where"]
    every = [placed["service"], placed["finished"], *placed["parts"]]
    result["every_phase_on"] = device if all(d.startswith(device) for d in every) else f"not all on {device}: {every}"
    return result


LOAD_ON_CPU = """
import sys, torch
from pathlib import Path
from raylocal.core.checkpoint import load_checkpoint
def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)
paths = sorted(Path(sys.argv[1]).rglob("*.pt"))
bad = [str(p) for p in paths if any(t.device.type != "cpu" for t in tensors(load_checkpoint(p)))]
print(len(paths), *bad)
"""


def checkpoints_load_on_cpu(out: Path) -> dict[str, Any]:
    """Every checkpoint of the runs, loaded by a process that sees no GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ON_CPU, str(out / "runs")], env=env, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        return {"loaded": 0, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    count, *bad = done.stdout.split()
    return {"loaded": int(count), "not_on_cpu": bad}


def check(out: Path, tiny: bool, data_root: str | None) -> dict[str, Any]:
    report: dict[str, Any] = versions()
    gpu = report["gpu"]
    report["skipped"] = [] if gpu else ["GPU throughput and memory", "TF32 against IEEE float32", "runs on a GPU"]
    if not gpu:
        print(f"gpu_check: torch {report['torch']} (CUDA {report['torch_cuda']}) sees no GPU: the CPU path", flush=True)
    report["glow"] = bench(out, gpu, tiny)
    if gpu:  # what --tf32 gains in speed (its cost in exactness is in both rows)
        report["glow_tf32"] = bench(out, gpu, tiny, tf32=True)
    data = dict(TINY_RUN if tiny else RUN) | ({"data_root": data_root} if data_root else {})
    if not gpu:
        data["device"] = "cpu"
    report |= runs(out, data, gpu, tiny)
    report["checkpoints"] = checkpoints_load_on_cpu(out)
    return report


def failures(report: dict[str, Any], gpu: bool) -> list[str]:
    """What the report shows to be wrong."""
    wrong = []
    if report["driver_initialised_cuda"]:
        wrong.append("the driver initialised CUDA")
    if report["every_phase_on"] != ("cuda" if gpu else "cpu"):
        wrong.append(f"phases: {report['every_phase_on']}")
    if not report["faults"]["restarts"][1] or not report["faults"]["finetune_killed"]:
        wrong.append("the faults run did not kill and restart what it should")
    if not report["checkpoints"].get("loaded") or report["checkpoints"].get("not_on_cpu"):
        wrong.append(f"checkpoints: {report['checkpoints']}")
    return wrong


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="where everything goes ($OUT)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (the test suite's CPU path)")
    p.add_argument("--data-root", help="MNIST directory for the runs (default: the bundled one)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = check(out, args.tiny, args.data_root)
    wrong = failures(report, report["gpu"])
    report["failures"] = wrong
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    for line in wrong:
        print(f"error: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
