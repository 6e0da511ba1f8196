"""Shared fixtures: tiny models and data, and one Ray instance per test session."""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# The suite runs on the CPU, also on a GPU host: its bit-for-bit assertions hold
# there, not under cuDNN's nondeterminism and TF32. Hidden before torch loads.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller looks at its workers every 2 s by default: each fit waits up to
# that long to see its worker finish (or die). Tiny runs finish in seconds; look often.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

torch.set_num_threads(1)


def write_idx_images(path: Path, images: np.ndarray, gz: bool = True, magic: int = 2051) -> None:
    """Write uint8 images [N, H, W] in MNIST's IDX format."""
    n, h, w = images.shape
    raw = struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def synthetic_digits(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """Simple structured grey images (bright blobs on dark background), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size), dtype=np.float64)
    for i in range(n):
        cy, cx = rng.uniform(1, size - 2, 2)
        r = rng.uniform(1.0, size / 3)
        images[i] = 230 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    images += rng.uniform(0, 20, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A tiny MNIST-format dataset of 8x8 synthetic images (64 train, 32 test)."""
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx_images(root / "train-images-idx3-ubyte.gz", synthetic_digits(64, seed=1))
    write_idx_images(root / "t10k-images-idx3-ubyte.gz", synthetic_digits(32, seed=2))
    return root


def tiny_options(mnist_dir: Path, storage: Path, **extra: object) -> list[str]:
    """Command-line options for a fast run on the tiny dataset."""
    opts = {
        "data-root": mnist_dir, "n-levels": 2, "depth": 2, "hidden": 8, "batch-size": 16,
        "init-batch-size": 64, "eval-batch-size": 32, "epochs": 1, "storage-path": storage,
        "samples": 4, "warmup-steps": 2, "threads": 1, "log-every": 1, "device": "cpu",
    }  # fmt: skip
    opts.update({k.replace("_", "-"): v for k, v in extra.items()})
    args = []
    for k, v in opts.items():
        if v is True:
            args.append(f"--{k}")
        elif v is False:
            args.append(f"--no-{k}")
        else:
            args += [f"--{k}", str(v)]
    return args


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session (2 CPUs, no GPU, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    with _fits_without_placement_group_cleaner():
        yield ray
    ray.shutdown()


@contextlib.contextmanager
def _fits_without_placement_group_cleaner():
    """Ray Train v2 gives every fit a detached PlacementGroupCleaner actor: one more process start,
    and 1 s at the fit's end while it stops (its poll period; 0.08 s without it). It frees a
    placement group whose controller died ungracefully; this session's end frees them all. Fits
    started in this process only (the callbacks are chosen in the driver)."""
    from ray.train.v2.api import data_parallel_trainer as trainer

    defaults = trainer.DataParallelTrainer._create_default_callbacks

    def without_cleaner(self):  # noqa: ANN001, ANN202
        return [c for c in defaults(self) if not isinstance(c, trainer.PlacementGroupCleanerCallback)]

    trainer.DataParallelTrainer._create_default_callbacks = without_cleaner
    try:
        yield
    finally:
        trainer.DataParallelTrainer._create_default_callbacks = defaults


def untrained_bpd(mnist_dir: Path, seed: int = 0, **model: object) -> float:
    """Test BPD of the tiny model (``tiny_options``'s) before any training, computed
    here, independently of a run: ActNorm's data init on the first 64 training
    images, as a run makes it. What a run that learnt must end below."""
    from raylocal.core.config import RaylocalConfig
    from raylocal.core.data import load_dataset
    from raylocal.model.objectives import preprocess
    from raylocal.training.trainer import build_glow, evaluate_bpd, initialize

    config = RaylocalConfig(**({"n_levels": 2, "depth": 2, "hidden": 8, "seed": seed} | model))
    data = load_dataset("mnist", str(mnist_dir))
    glow = build_glow(config, data.shape)
    initialize([glow.whole()], preprocess(data.train[:64], 8, torch.Generator().manual_seed(seed + 1)))
    return evaluate_bpd(glow, data.test, 32, torch.device("cpu"))


def lose_the_working_directory_on_joining(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: object) -> None:
    """As under `ray job submit` on nodes that share a Ray temp directory: the driver stands in the
    job's working directory, which another node's agent removes (unpacking the job's code anew)
    once the driver has joined Ray (at ``module.connect``, as ``module`` calls it)."""
    import shutil

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    join = module.connect  # type: ignore[attr-defined]
    monkeypatch.setattr(module, "connect", lambda config: join(config) or shutil.rmtree(job_dir, True))


def local_session(config: Any, data: Any, run_dir: Path, **kwargs: Any) -> Any:
    """A ``SingleProcessRun`` of ``config`` on ``data``, its records opened on ``run_dir`` (as a ``Run`` opens them)."""
    from raylocal.training.records import RunRecords
    from raylocal.training.schedules import SingleProcessRun

    return SingleProcessRun(config, data, RunRecords(config, data.test, run_dir), **kwargs)


def run_local(session: Any) -> dict[str, Any]:
    """A single-process run (a ``SingleProcessRun``) trained whole in its own directory, through the
    phases ``Run`` trains it in; returns its summary."""
    from raylocal.run.phases import Carry, local_phases

    carry = Carry()
    for phase in local_phases(session):
        phase.run(session, carry)
    return carry.result()
