"""The asynchronous part trainer on Ray: one actor per part, object-store latent queues.

A thin layer over ``raylocal.pipeline.worker``: ``PartActor`` wraps a ``PartWorker``
and runs its ``PartLoop`` with a ``LatentQueue`` on each side. Latents go into the
object store (``ray.put``); the bounded queue (one small Ray actor) carries only
packets of references, and its bound is the backpressure: a producer blocks
when its consumer is ``queue_size`` packets behind.

``PartsPhase`` places the K actors in one placement group (PACK, or
STRICT_SPREAD with ``--placement spread``), starts them all and shows per-part
progress; ``train_parts`` is the parts phase every entry point runs (the async
run, Tune trials, the benchmarks): it returns a ``PartsResult``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylocal.cluster.connect import errors_in_one_line
from raylocal.cluster.placement import PartBundles, actor_device
from raylocal.cluster.queue import LatentQueue
from raylocal.core.checkpoint import load_checkpoint, save_checkpoint
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData, NodeImages, training_images
from raylocal.core.faults import apply_worker_faults, parse_faults
from raylocal.core.runlog import Progress, peak_rss_mb, write_json
from raylocal.errors import CheckpointError, ClusterError
from raylocal.pipeline.trace import packet_trace
from raylocal.pipeline.worker import PartLoop, PartWorker, staleness_summary
from raylocal.training.schedules import PARTS_RESULT, PartsResult


def get_or_none(ref: Any) -> Any:
    """ray.get, or None when the object died with the process that made it (an
    upstream part that crashed after sending): the receiver then treats the
    packet as a dropped one and trains on its own stale latents."""
    try:
        return ray.get(ref)
    except ray.exceptions.ObjectLostError:
        return None


def part_checkpoint_path(run_dir: Path, index: int) -> Path:
    return run_dir / "parts" / f"part{index + 1}.pt"


STARTUP_WAIT_S = 120.0  # how long weights() may wait for a (restarted) part's run() to build its worker


# Threads: run(), and others that answer weights(), checkpoint_state() and progress() meanwhile
# (on a restarted actor the first two may wait for the replayed run(): it must still find one)
@ray.remote(max_concurrency=3)
class PartActor:
    """A thin shell around ``PartWorker`` (all logic lives there)."""

    def __init__(
        self,
        config_json: str,
        index: int,
        image_shape: tuple[int, int, int],
        threads: int,
        run_dir: str,
    ) -> None:
        # Nothing here comes from the object store: Ray warns about (and cannot
        # always restart) an actor whose constructor arguments live there. The
        # layers and the images come with run(), which builds the worker, so the
        # actor can start while the parts are still being planned.
        torch.set_num_threads(threads)
        self.config = RaylocalConfig.model_validate_json(config_json)
        self.index, self.image_shape = index, image_shape
        self.device = str(actor_device(self.config))
        self.worker: PartWorker | None = None
        self.started = threading.Event()  # set once run() has built the worker
        self.lock = threading.Lock()
        self.threads = threads
        self.faults = parse_faults(self.config.run.inject or "")
        self.checkpoint_path = part_checkpoint_path(Path(run_dir), index)
        with warnings.catch_warnings():
            # Ray 2.60's own property reads its deprecated ``actor_id``: keep that
            # warning (three lines per actor) out of the user's output
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.first_life = not self.restarted

    def _build(self, bounds: list[tuple[int, int]], train_images: torch.Tensor | NodeImages) -> PartWorker:
        """The part's worker; Ray reruns __init__ and replays run() when it restarts
        this actor: continue from the last checkpoint (also when the driver itself
        was restarted with --resume)."""
        config = self.config
        worker = PartWorker(config, bounds, self.index, self.image_shape, training_images(train_images), self.device)
        if (self.restarted or config.run.resume) and self.checkpoint_path.is_file():
            worker.restore_state(load_checkpoint(self.checkpoint_path, kind="part"))
            if config.run.resume and not self.restarted:
                worker.stats.resumed_at = worker.step
        if self.restarted:
            worker.stats.restarts += 1
        self.checkpoint_every = config.run.checkpoint_every or len(worker.stream)
        return worker

    def _after_step(self, worker: PartWorker) -> None:
        if worker.step % self.checkpoint_every == 0:
            with self.lock:
                save_checkpoint(self.checkpoint_path, worker.checkpoint_state(), kind="part")
        apply_worker_faults(self.faults, worker, self.first_life)

    def run(
        self,
        bounds: list[tuple[int, int]],
        train_images: torch.Tensor | NodeImages,
        inbox: LatentQueue | None,
        outbox: LatentQueue | None,
        n_steps: int,
    ) -> dict[str, Any]:
        # run() executes on one of the actor's threads; OpenMP's thread count is per thread
        torch.set_num_threads(self.threads)
        worker = self._build(bounds, train_images)
        with self.lock:
            self.worker = worker
        self.started.set()
        stats = PartLoop(
            worker, inbox, outbox, ray.put, get_or_none, n_steps, on_step=self._after_step, lock=self.lock
        ).run()
        return {**asdict(stats), "peak_rss_mb": peak_rss_mb()}

    def _built(self) -> PartWorker:
        """The worker, once run() has built it. A call that reaches an actor Ray has
        just restarted can come before the replayed run(): it waits for it."""
        if not self.started.wait(timeout=STARTUP_WAIT_S):
            raise ClusterError(f"part {self.index + 1} has not started in {STARTUP_WAIT_S:g}s")
        assert self.worker is not None
        return self.worker

    def weights(self) -> dict[str, torch.Tensor]:
        worker = self._built()  # (waits without the lock, which run() needs to start)
        with self.lock:
            return worker.weights()

    def checkpoint_state(self) -> dict[str, Any]:
        """This part's checkpoint as of its last finished step (Tune's PBT saves it)."""
        worker = self._built()
        with self.lock:
            return worker.checkpoint_state()

    def progress(self) -> dict[str, Any]:
        if not self.started.is_set():  # run() has not built the worker yet (this call does not wait)
            return {"started": False}
        worker = self._built()
        st = worker.stats
        recent = st.losses[-20:]
        return {
            "started": True,
            "steps": st.steps,
            "restarts": st.restarts,
            "loss": sum(recent) / len(recent) if recent else float("nan"),
            "rollbacks": worker.trainer.rollbacks,
            "stale_steps": st.stale_steps,
        }

    def info(self) -> dict[str, Any]:
        storage_error = None
        try:  # checkpoints go here: it must be reachable from this node too
            probe = self.checkpoint_path.parent / f".probe-{os.getpid()}"
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            storage_error = f"{e.strerror or e}"
        return {
            "storage_error": storage_error,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "threads": torch.get_num_threads(),
            "device": self.device,
            "gpu_ids": ray.get_gpu_ids(),
        }


def _progress_line(progress: list[dict[str, Any]], n_steps: int) -> str:
    parts = [
        # a part's own local loss (bits/dim of its objective), not the model's BPD
        f"part {k + 1}: {p['steps']}/{n_steps} local "
        + (f"{p['loss']:.3f}" if math.isfinite(p["loss"]) else "–")
        + (f" rb {p['rollbacks']}" if p["rollbacks"] else "")
        + (f" stale-input steps {p['stale_steps']}" if p["stale_steps"] else "")
        + (f" restarts {p['restarts']}" if p["restarts"] else "")
        for k, p in enumerate(progress)
    ]
    return " | ".join(parts)


def _poll(actors: list[Any]) -> list[dict[str, Any]] | None:
    """Every part's progress, or None while one of them is starting or being restarted."""
    try:
        polled = ray.get([a.progress.remote() for a in actors], timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None
    return polled if all(p["started"] for p in polled) else None


def gather_weights(actors: list[Any]) -> dict[str, torch.Tensor]:
    """The assembled model's state dict, from every part's current weights."""
    state: dict[str, torch.Tensor] = {}
    for w in ray.get([a.weights.remote() for a in actors]):
        state.update(w)
    return state


def gather_part_states(actors: list[Any]) -> list[dict[str, Any]]:
    """Every part's checkpoint state, each taken between two of its steps."""
    return ray.get([a.checkpoint_state.remote() for a in actors])


Monitor = Callable[[list[Any], list[dict[str, Any]]], None]


class PartsPhase:
    """The parts phase on Ray: a placement group, one actor per part and a latent
    queue per boundary, started at construction so that their processes start
    (and import torch) while the caller still plans the parts; ``run`` trains
    them, ``close`` releases them (``with`` does it too). The caller has checked
    the run, joined Ray and planned its placement (``plan_ray_run``)."""

    def __init__(
        self, config: RaylocalConfig, data: ImageData, run_dir: Path, bundles: PartBundles, train_ref: Any
    ) -> None:
        self.config, self.n_parts, self.run_dir = config, bundles.n_parts, run_dir
        self.n_steps = config.schedule.epochs * (len(data.train) // config.schedule.batch_size)
        self.train_ref = train_ref  # the images each part is sent (``Placement.train_images``)
        n_parts = self.n_parts
        self.actors: list[Any] = []
        self.queues: list[LatentQueue] = []
        self.pg, first_bundle, self.own_pg = place_parts(bundles)
        try:  # a start that fails half way releases what it started
            for k in range(1, n_parts):  # part k's inbox, on part k's node: its blocking get() stays on the node
                inbox = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first_bundle + k)
                self.queues.append(LatentQueue(config.links.queue_size, scheduling_strategy=inbox))
            for k in range(n_parts):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first_bundle + k)
                self.actors.append(
                    PartActor.options(
                        num_cpus=bundles.part_cpus,
                        num_gpus=bundles.part_gpus,
                        max_restarts=config.cluster.max_restarts,
                        max_task_retries=config.cluster.max_restarts,  # replay run() on the restarted actor
                        scheduling_strategy=strategy,
                        **bundles.shown_gpus(bundles.part_gpus),
                    ).remote(config.model_dump_json(), k, data.shape, bundles.threads, str(run_dir))
                )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PartsPhase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        for q in self.queues:
            q.shutdown()
        if self.own_pg:
            remove_placement_group(self.pg)
        self.actors, self.queues, self.own_pg = [], [], False

    def infos(self) -> list[dict[str, Any]]:
        """Each part actor's process, node and device, once it runs; fails in one
        line when a part's node cannot write the run's checkpoints."""
        infos = ray.get([a.info.remote() for a in self.actors])
        bad = [(k, i) for k, i in enumerate(infos) if i["storage_error"]]
        if bad:
            k, i = bad[0]
            raise ClusterError(
                f"storage_path {self.config.run.storage_path!r} is not writable from node {i['node_id'][:12]} "
                f"(part {k + 1}: {i['storage_error']}); use a path every node can reach"
            )
        for k, queue in enumerate(self.queues):  # part k + 1's inbox
            infos[k + 1]["queue_node_id"] = queue.node_id()
        return infos

    def run(
        self, bounds: list[tuple[int, int]], progress: Progress, monitor: Monitor | None = None
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, Any]], float]:
        """Train every part its ``n_steps``; returns (assembled state dict, per-part
        stats, per-part actor info, wall time). ``monitor(actors, progress)`` is
        called at every poll with the live part actors (for ``gather_weights`` /
        ``gather_part_states``): evaluation while the parts train, and Ray
        Tune's reports and checkpoints."""
        if len(bounds) != self.n_parts:
            raise ClusterError(f"the plan has {len(bounds)} parts, the phase started {self.n_parts}")
        actors, queues, n_steps, k_last = self.actors, self.queues, self.n_steps, self.n_parts - 1
        driver_faults = [f for f in parse_faults(self.config.run.inject or "") if f.kind == "ray-kill"]
        with errors_in_one_line():
            infos = self.infos()
            start = time.perf_counter()
            runs = [
                a.run.remote(
                    bounds, self.train_ref, queues[k - 1] if k > 0 else None, queues[k] if k < k_last else None, n_steps
                )
                for k, a in enumerate(actors)
            ]
            pending = list(runs)
            while pending:
                poll_s = 0.05 if driver_faults else 1.0
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
                ray.get(ready)  # a part that failed for good fails the run now, not at the end
                polled = _poll(actors) if pending else None
                if polled:
                    progress.update(_progress_line(polled, n_steps))
                    if monitor is not None:
                        monitor(actors, polled)
                    for f in list(driver_faults):
                        if polled[f.part]["steps"] >= f.at:
                            ray.kill(actors[f.part], no_restart=False)  # Ray restarts it
                            driver_faults.remove(f)
            stats = ray.get(runs)
            wall = time.perf_counter() - start
            progress.update(_progress_line(_poll(actors) or [], n_steps), force=True)
            return gather_weights(actors), stats, infos, wall


def place_parts(bundles: PartBundles) -> tuple[PlacementGroup, int, bool]:
    """The parts' placement group (see ``PartBundles.reserve_parts``): a seam for tests."""
    return bundles.reserve_parts()


def train_parts(
    phase: PartsPhase, plan: dict[str, Any], progress: Progress, monitor: Monitor | None = None
) -> PartsResult:
    """The parts phase of every entry point: train the planned parts (``plan`` is
    ``ModelService.plan``'s) on the phase's actors and return their
    ``PartsResult``: assembled weights, per-part stats, the monitor's curve (when
    it keeps one) and the pipeline report. A monitor with a ``finish`` method
    has it called once the parts are done (a last evaluation still in flight)."""
    config, bounds = phase.config, [tuple(b) for b in plan["bounds"]]
    if config.run.resume and not all(part_checkpoint_path(phase.run_dir, k).is_file() for k in range(len(bounds))):
        raise CheckpointError(f"--resume: {phase.run_dir / 'parts'} does not hold a checkpoint of every part")
    progress.update(
        f"async: {len(bounds)} parts {plan['canonical']}, {config.schedule.epochs} epoch(s), "
        f"queue bound {config.links.queue_size}, link {config.links.link}"
        + (", resuming" if config.run.resume else ""),
        force=True,
    )
    state, stats, infos, wall = phase.run(bounds, progress, monitor)
    if hasattr(monitor, "finish"):
        monitor.finish()
    report = pipeline_report(config, stats, infos, wall, plan["param_bytes"])
    for st in stats:  # the traced rows live on once, paired, in the report
        for key in ("sent_trace", "received_trace"):
            st.pop(key, None)
    return PartsResult(state, wall, stats, list(getattr(monitor, "curve", [])), report)


def pipeline_report(
    config: RaylocalConfig,
    stats: list[dict[str, Any]],
    infos: list[dict[str, Any]],
    wall: float,
    param_bytes: int,
) -> dict[str, Any]:
    """Communication and throughput figures of the async phase (``param_bytes``:
    the whole model's, for what DDP would all-reduce)."""
    n = len(stats)
    bs = config.schedule.batch_size
    params = param_bytes
    steps = stats[-1]["steps"]
    forward = [st["bytes_forward"] for st in stats[:-1]]
    behind = [staleness_summary(stats[k - 1]["step_times"], stats[k]["inputs"]) for k in range(1, n)]
    report = {
        "part_images_per_s": [st["steps"] * bs / max(st["end_time"] - st["start_time"], 1e-9) for st in stats],
        "images_per_s_pipeline": steps * bs / max(wall, 1e-9),
        "bytes_forward": forward,
        "bytes_backward": sum(st["bytes_backward"] for st in stats),
        "bytes_weight_sync": sum(st["bytes_weights"] for st in stats),
        # what a model-parallel end-to-end pipeline would send: activations
        # forward and gradients of the same size back, at every boundary
        "e2e_pipeline_bytes": [2 * f for f in forward],
        # data-parallel e2e: every worker all-reduces every gradient each step
        "ddp_bytes_per_step": params * 2 * (n - 1) / n if n > 1 else 0,
        # per part from part 2 on: steps on fresh and on stale inputs, and how far
        # behind its upstream part's training each input was
        "fresh_steps": [st["fresh_steps"] for st in stats[1:]],
        "stale_steps": [st["stale_steps"] for st in stats[1:]],
        "behind_steps": [b["steps"] for b in behind],
        "behind_s": [b["seconds"] for b in behind],
        # per boundary: latents that never reached the next part
        "dropped_latents": [st["dropped_latents"] for st in stats[:-1]],
        # per boundary: latents that arrived but a newer one replaced before the part took them
        "superseded_latents": [st.get("superseded_latents", 0) for st in stats[1:]],
        # per boundary: the bytes the next part fetched (latents and weights), what really crossed
        "bytes_received": [st.get("bytes_received", 0) for st in stats[1:]],
        "outage_latents": [st["outage_latents"] for st in stats[:-1]],
        "idle_s": [st["wait_s"] + st["put_s"] for st in stats],
        "idle_fraction": [(st["wait_s"] + st["put_s"]) / max(st["end_time"] - st["start_time"], 1e-9) for st in stats],
        "queue_overhead": [(st["wait_s"] + st["put_s"]) / max(st["compute_s"], 1e-9) for st in stats],
        "wait_s": [st["wait_s"] for st in stats],
        "compute_s": [st["compute_s"] for st in stats],
        "actor_pids": [i["pid"] for i in infos],
        "actor_nodes": [i["node_id"] for i in infos],
        "queue_nodes": [i.get("queue_node_id") for i in infos[1:]],  # per boundary: where its queue's actor ran
        "actor_devices": [i["device"] for i in infos],
        "async_wall_time": wall,
        "restarts": [st["restarts"] for st in stats],
        "resumed_at": [st["resumed_at"] for st in stats],
        "peak_rss_mb": [st["peak_rss_mb"] for st in stats],
    }
    if config.links.trace_packets:  # per boundary: its sender's and its receiver's rows, paired
        pairs = [(stats[b]["sent_trace"], stats[b + 1]["received_trace"]) for b in range(n - 1)]
        report["packet_trace"] = [packet_trace(sent, received) for sent, received in pairs]
    return report


def parts_where(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each part ran, from the parts phase's pipeline report."""
    keys = zip(report["actor_nodes"], report["actor_pids"], report["actor_devices"])
    return [{"node_id": n, "pid": p, "device": d} for n, p, d in keys]


def keep_parts_result(run_dir: Path, parts: PartsResult, where: dict[str, Any]) -> None:
    """The parts phase's record in the run directory (what ``--resume`` continues
    from, and its pipeline report), and where each part ran."""
    write_json(run_dir / "pipeline.json", parts.report)
    parts.save(run_dir / PARTS_RESULT)
    where["parts"] = parts_where(parts.report)


__all__ = ["LatentQueue", "PartActor", "PartsPhase", "keep_parts_result", "parts_where", "train_parts"]
