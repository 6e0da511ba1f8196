"""A Ray Train run whose workers hand their result back in memory: the one way
this project starts a ``TorchTrainer`` (a DDP or local-SGD run, a one-worker
fine-tune), its failures said in one line."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from raylocal.cluster.placement import train_worker_env
from raylocal.cluster.queue import Mailbox
from raylocal.errors import ClusterError, DivergedError


def fit_train_run(trainer: Any) -> Any:
    """``trainer.fit()`` of a Ray Train trainer, then the SIGINT handler that was
    there before it. Ray Train (2.60) installs its own on the main thread, to
    abort the run on Ctrl-C, and leaves it installed: its closure keeps the
    finished run's controller actor alive (for minutes, until the next fit), and
    a later Ctrl-C would abort that finished run and exit 0 instead of stopping
    ours.

    Ray Train's preemption watcher is left off: its own actor costs a process
    start per fit and prints a core-worker error line (Ray issue 53727), and our
    checkpoints already cover a lost worker. The controller reads it from the
    driver's environment at ``fit``."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def run_on_ray_train(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    what: str,
    name: str,
    storage: Path,
    workers: int,
    resources: dict[str, float],
    use_gpu: bool,
    max_failures: int = 0,
) -> dict[str, Any]:
    """Run ``loop`` on ``workers`` Ray Train workers (each granted ``resources``,
    and a GPU with ``use_gpu``; those granted none see none); returns what a
    worker posted last to ``loop_config["mailbox"]``. A worker's divergence,
    raised (``DivergedError``) or posted (``{"diverged": reason}``: not rerun
    ``max_failures`` times to diverge again), is raised as such; any other
    failure as one line that names ``what`` ran."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    mailbox = Mailbox()
    try:
        trainer = TorchTrainer(
            loop,
            train_loop_config=loop_config | {"mailbox": mailbox},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=TrainRunConfig(
                name=name,
                storage_path=str(storage.resolve()),
                failure_config=FailureConfig(max_failures=max_failures),
                worker_runtime_env=train_worker_env(use_gpu),
            ),
        )
        try:
            fit_train_run(trainer)
        except Exception as e:  # Ray Train wraps worker errors in several types
            _raise_in_one_line(e, what)
        record = mailbox.take()
    finally:
        mailbox.shutdown()
    if record is None:
        raise ClusterError(f"{what} ended without its result")
    if "diverged" in record:
        raise DivergedError(record["diverged"])
    return record


def _raise_in_one_line(e: Exception, what: str) -> NoReturn:
    for failure in getattr(e, "worker_failures", {}).values():
        reason = getattr(failure, "cause", None) or failure  # a worker's own error, unwrapped
        if isinstance(reason, DivergedError):
            raise DivergedError(str(reason)) from None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ClusterError(f"{what} failed: {first[:200]}") from None
