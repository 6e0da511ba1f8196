"""The fair distributed baseline: end-to-end training, data-parallel on K Ray Train workers.

Ray Train's ``TorchTrainer`` runs ``train_loop`` on K workers with
DistributedDataParallel (gloo on CPU, nccl on GPU): every step all-reduces
every gradient. Each worker takes every K-th batch of the same shuffled
stream, with batch_size // K images, so the global batch matches the
single-process runs. Used for ``scripts/bench_async.py`` and, with
``--finetune-workers K``, for the fine-tune phase.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raylocal.config import RunConfig
from raylocal.data import BatchStream
from raylocal.errors import ClusterError
from raylocal.objectives import nll_bits, preprocess
from raylocal.train import build_glow, initialize, scheduled_lr

WEIGHTS = "weights.pt"
HISTORY = "history.json"


class NLL(nn.Module):
    """Wraps a Glow so that DDP sees every parameter used inside ``forward``."""

    def __init__(self, glow: nn.Module) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, x: Tensor) -> Tensor:
        return nll_bits(self.glow, x).mean()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = RunConfig.model_validate_json(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    images: Tensor = loop_config["images"]
    glow = build_glow(config, tuple(images.shape[1:])).to(device)
    if loop_config.get("state"):
        glow.load_state_dict(loop_config["state"])
    else:
        noise = torch.Generator().manual_seed(config.seed + 1)
        x0 = preprocess(images[: config.init_batch_size].to(device), config.n_bits, noise)
        initialize([glow.whole()], x0)  # identical on every worker: same data, same seed
    model = ray.train.torch.prepare_model(NLL(glow))
    opt_cls = torch.optim.Adamax if config.optimizer == "adamax" else torch.optim.Adam
    lr = loop_config["lr"]
    optimizer = opt_cls(model.parameters(), lr=lr)
    per_worker = max(config.batch_size // world, 1)
    stream = BatchStream(images, per_worker, config.seed)
    noise = torch.Generator().manual_seed(config.seed + 1 + rank)
    steps_per_epoch = len(stream) // world
    step = 0
    history = []
    total = loop_config.get("lr_total") or steps_per_epoch * loop_config["epochs"]  # of the LR decay
    for epoch in range(loop_config["epochs"]):
        start = time.perf_counter()
        for i in range(len(stream)):
            batch = stream.next()
            if i % world != rank or i // world >= steps_per_epoch:
                continue  # every K-th batch is this worker's
            position = loop_config.get("lr_clock", 0) + step
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(lr, step, config.warmup_steps, total, config.lr_schedule, position)
            loss = model(preprocess(batch.to(device), config.n_bits, noise))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the gradients here
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            optimizer.step()
            step += 1
        metrics = {
            "epoch": epoch + 1,
            "loss": float(loss.detach()),
            "epoch_time": time.perf_counter() - start,
            "images_per_s": steps_per_epoch * per_worker * world / (time.perf_counter() - start),
        }
        history.append(metrics)
        if rank == 0 and epoch == loop_config["epochs"] - 1:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({k: v.cpu() for k, v in glow.state_dict().items()}, Path(tmp) / WEIGHTS)
                (Path(tmp) / HISTORY).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def train_ddp(
    config: RunConfig,
    images: Tensor,
    workers: int,
    epochs: int,
    lr: float,
    storage: Path,
    state: dict[str, Tensor] | None = None,
    cpus_per_worker: float | None = None,
    lr_clock: int = 0,
    lr_total: int = 0,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Train end to end on ``workers`` DDP workers; returns (weights, per-epoch metrics).

    ``lr_clock`` and ``lr_total`` place this phase on a run-wide LR decay
    (``cosine-run``): the first update is at ``lr_clock`` of ``lr_total`` steps."""
    import ray
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) >= workers and config.device != "cpu"
    cpus = cpus_per_worker or max(total.get("CPU", 1) / workers, 0.01)
    threads = config.threads or max(1, int(cpus))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump_json(),
            "images": images,
            "epochs": epochs,
            "lr": lr,
            "threads": threads,
            "state": state,
            "lr_clock": lr_clock,
            "lr_total": lr_total,
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=TrainRunConfig(name="ddp", storage_path=str(storage.resolve())),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train wraps worker errors in several types
        raise ClusterError(f"DDP training failed: {str(e).strip().splitlines()[0][:200]}") from None
    if result.checkpoint is None:
        raise ClusterError("DDP training returned no checkpoint")
    with result.checkpoint.as_directory() as d:
        weights = torch.load(Path(d) / WEIGHTS, weights_only=True)
        history = json.loads((Path(d) / HISTORY).read_text())
    return weights, history
