"""The asynchronous parts pipeline as plain Python: workers, packets, links.

Nothing here imports Ray. A ``PartWorker`` holds one part (and a possibly
stale copy of the parts upstream of it); ``run_part`` is its whole life in the
pipeline: initialise on the first packet, then train one step per packet and
send one packet on. Packets travel through any object with ``put``/``get``
(a ``queue.Queue`` in tests, a Ray queue in ``ray_trainer``); tensors travel
through ``store_put``/``store_get`` (identity in tests, Ray's object store in
production), so a packet only carries references.

Packets (dicts, so that they pickle anywhere):
    {"kind": "init", "latent": ref, "weights": {j: [version, ref]}}
    {"kind": "data", "step": t, "latent": ref | None, "weights": {...} | None}
    {"kind": "end", "step": t}
A data packet without a latent means the link was down at the sender's step t:
the receiver then trains on latents it computes itself, from its own data,
with its last synced (stale) copy of the upstream weights. The same happens
after the end packet for steps the receiver is still short of (their latents
were in flight when the parts were checkpointed and restored), so that every
part ends at the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from raylocal.config import RunConfig
from raylocal.data import BatchStream
from raylocal.errors import CheckpointError
from raylocal.links import LinkModel
from raylocal.objectives import preprocess
from raylocal.train import PartTrainer, build_glow, decay_steps


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


@dataclass
class WorkerStats:
    """What a part measured about itself; all plain numbers (sent to the driver)."""

    steps: int = 0
    compute_s: float = 0.0  # training steps (and stale upstream recomputation)
    wait_s: float = 0.0  # blocked on the inbound queue (upstream slower)
    put_s: float = 0.0  # putting into the object store and queue (backpressure included)
    bytes_forward: int = 0  # latents sent to the next part
    bytes_weights: int = 0  # weights sent downstream for syncs
    bytes_backward: int = 0  # anything sent upstream: by design always 0
    stale_steps: int = 0
    staleness: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rollbacks: int = 0
    restarts: int = 0  # times this part's process died and was restored from its checkpoint
    resumed_at: int = -1  # step this part continued from after a driver restart (--resume)
    lost_packets: int = 0  # latents lost with a crashed part or in flight at a restore (trained on stale instead)
    start_time: float = 0.0
    first_step_time: float = 0.0  # end of the first step: steady state starts here
    end_time: float = 0.0


class PartWorker:
    """One part of the pipeline, testable without Ray.

    Builds the full Glow from the config (weights depend only on the seed, so
    every worker starts from the same model), trains ``layers[start:stop]`` and
    keeps the layers upstream of it as a copy that is refreshed by weight syncs.
    """

    def __init__(
        self,
        config: RunConfig,
        bounds: list[tuple[int, int]],
        index: int,
        image_shape: tuple[int, int, int],
        train_images: Tensor,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config
        self.index = index
        self.n_parts = len(bounds)
        self.device = torch.device(device)
        self.glow = build_glow(config, image_shape).to(self.device)
        self.part = self.glow.part(*bounds[index])
        self.upstream = [self.glow.part(*bounds[j]) for j in range(index)]
        lr = config.part_lrs(len(bounds))[index]
        self.trainer = PartTrainer(self.part, lr, config, index)
        # Part 1's data stream and noise are exactly those of the single-process
        # schedules; the others' (used only while their link is down) differ.
        offset = 7_919 * index
        self.stream = BatchStream(train_images, config.batch_size, config.seed + offset)
        self.noise = torch.Generator().manual_seed(config.seed + 1 + offset)
        self.train_images = train_images
        self.link = LinkModel.parse(config.link, index, config.seed) if index < len(bounds) - 1 else None
        self.versions: dict[int, int] = {}  # upstream part -> version of our copy of it
        self.weight_refs: dict[int, list[Any]] = {}  # upstream part -> [version, ref] to forward
        self.stats = WorkerStats()
        self.initialized = False  # ActNorm data init done (skipped when restored)
        self.step = 0
        self.last_sync: float = -math.inf  # step of the last weights sent downstream
        self.down_since_sync = False

    # ------------------------------------------------------------ data

    def data_batch(self) -> Tensor:
        return preprocess(self.stream.next().to(self.device), self.config.n_bits, self.noise)

    def init_batch(self) -> Tensor:
        x = self.train_images[: self.config.init_batch_size].to(self.device)
        return preprocess(x, self.config.n_bits, self.noise)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> Tensor:
        """ActNorm data init of this part on its real input; returns the output."""
        y, _ = self.part(x)
        self.initialized = True
        return y

    @torch.no_grad()
    def stale_input(self) -> Tensor:
        """An input computed locally: own data through the synced upstream copy."""
        x = self.data_batch()
        for up in self.upstream:
            x, _ = up(x)
        return x

    # ------------------------------------------------------------ weights

    def weights(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.part.state_dict().items()}

    def load_upstream(self, j: int, version: int, state: dict[str, Tensor]) -> None:
        self.upstream[j].load_state_dict(state)
        self.versions[j] = version

    # ------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this part after its process died
        (tensors and plain values only, for weights_only loading)."""
        stats = asdict(self.stats)
        return {
            "format": 1,
            "index": self.index,
            "model": {k: v.detach().cpu() for k, v in self.glow.state_dict().items()},
            "trainer": self.trainer.state_dict(),
            "stream": self.stream.state(),
            "noise": self.noise.get_state(),
            "step": self.step,
            "last_sync": self.last_sync if math.isfinite(self.last_sync) else -1,
            "down_since_sync": self.down_since_sync,
            "versions": {str(j): v for j, v in self.versions.items()},
            "stats": json.dumps(stats),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        if int(state["index"]) != self.index:
            found = int(state["index"]) + 1
            raise CheckpointError(f"part checkpoint is for part {found}, not {self.index + 1}")
        self.glow.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        self.stream.restore(state["stream"])
        self.noise.set_state(state["noise"])
        self.step = int(state["step"])
        self.last_sync = float(state["last_sync"])
        self.down_since_sync = bool(state["down_since_sync"])
        self.versions = {int(j): int(v) for j, v in state["versions"].items()}
        self.stats = WorkerStats(**json.loads(state["stats"]))
        self.initialized = True


class _Background:
    """A daemon thread that forwards items between two blocking endpoints, in
    order, through a local buffer of one; errors surface on the caller's side."""

    def __init__(self, pull: Callable[[], Any], push: Callable[[Any], None], name: str) -> None:
        self._pull, self._push = pull, push
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                item = self._pull()
                self._push(item)
                if item.get("kind") == "end":
                    return
        except BaseException as e:  # handed to the training thread
            self.error = e
            self._push({"kind": "error"})

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


class PrefetchingInbox:
    """Takes the next packet from the queue, and fetches its latent, on a
    background thread while the part trains on the current one: communication
    overlaps compute, and packets keep their order."""

    def __init__(self, inbox: Any, store_get: Callable[[Any], Any]) -> None:
        self._ready: queue.Queue = queue.Queue(maxsize=1)

        def pull() -> dict[str, Any]:
            packet = dict(inbox.get())
            if packet.get("latent") is not None:
                packet["latent"] = store_get(packet["latent"])
                packet["resolved"] = True
                packet["lost"] = packet["latent"] is None
            return packet

        self._worker = _Background(pull, self._ready.put, "raylocal-inbox")

    def get(self) -> dict[str, Any]:
        packet = self._ready.get()
        if packet["kind"] == "error":
            self._worker.join()
        return packet


class BackgroundOutbox:
    """Puts packets into the queue on a background thread. ``put`` returns at
    once unless the previous packet is still waiting for room in the queue,
    so the queue's bound still throttles the producer."""

    def __init__(self, outbox: Any) -> None:
        self._pending: queue.Queue = queue.Queue(maxsize=1)
        self._worker = _Background(self._pending.get, self._send(outbox), "raylocal-outbox")

    @staticmethod
    def _send(outbox: Any) -> Callable[[Any], None]:
        def push(packet: dict[str, Any]) -> None:
            if packet.get("kind") != "error":
                outbox.put(packet)

        return push

    def put(self, packet: dict[str, Any]) -> None:
        if self._worker.error is not None:
            self._worker.join()
        self._pending.put(packet)

    def close(self) -> None:
        """Wait until every packet (the end packet last) is in the queue."""
        self._worker.join()


def run_part(
    worker: PartWorker,
    inbox: Any,
    outbox: Any,
    store_put: Callable[[Any], Any],
    store_get: Callable[[Any], Any],
    n_steps: int,
    on_step: Callable[[PartWorker], None] | None = None,
    lock: Any = None,
    overlap: bool = True,
) -> WorkerStats:
    """A part's whole life in the pipeline (see the module doc).

    The first part trains ``n_steps`` steps on its data; every other part
    trains one step per data packet until the end packet. ``lock`` (optional)
    is held during each step so that another thread can read consistent weights.
    With ``overlap`` the queues are served by background threads, so that
    sending and receiving overlap the training steps.
    """
    if overlap and inbox is not None:
        inbox = PrefetchingInbox(inbox, store_get)
    if overlap and outbox is not None:
        outbox = BackgroundOutbox(outbox)
    st = worker.stats
    st.start_time = st.start_time or time.time()
    k = worker.index
    # every part trains n_steps steps, so its own steps are the run's clock; a
    # run-wide decay runs on through the fine-tune phase
    run_steps = n_steps + worker.config.finetune_epochs * len(worker.stream)
    worker.trainer.total_steps = decay_steps(worker.config, n_steps, run_steps)
    sync_every = worker.config.sync_every
    guard = lock if lock is not None else contextlib.nullcontext()

    def receive() -> dict[str, Any]:
        t0 = time.perf_counter()
        packet = inbox.get()
        st.wait_s += time.perf_counter() - t0
        return packet

    def apply_weights(packet: dict[str, Any]) -> None:
        for j, (version, ref) in (packet.get("weights") or {}).items():
            j = int(j)
            if worker.versions.get(j, -1) < version:
                t0 = time.perf_counter()
                state = store_get(ref)
                st.wait_s += time.perf_counter() - t0
                if state is not None:  # None: lost with a crashed sender; the next sync will do
                    worker.load_upstream(j, version, state)
                    worker.weight_refs[j] = [version, ref]

    def latent_of(packet: dict[str, Any]) -> Tensor:
        return packet["latent"] if packet.get("resolved") else store_get(packet["latent"])

    def send(packet: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        outbox.put(packet)
        st.put_s += time.perf_counter() - t0

    def own_weights(version: int) -> dict[int, list[Any]]:
        state = worker.weights()
        st.bytes_weights += tensor_bytes(state)
        refs = dict(worker.weight_refs)
        refs[k] = [version, store_put(state)]
        return refs

    # -- initialisation: ActNorms see the real output of the part before them.
    # A worker restored from a checkpoint skips it: its neighbours already did.
    if not worker.initialized:
        if k == 0:
            x = worker.init_batch()
        else:
            packet = receive()
            assert packet["kind"] == "init", packet["kind"]
            apply_weights(packet)
            x = latent_of(packet)
        y = worker.initialize(x)
        if outbox is not None:
            st.bytes_forward += tensor_bytes(y)
            send({"kind": "init", "latent": store_put(y), "weights": own_weights(0)})
            worker.last_sync = 0
        if on_step is not None:
            on_step(worker)  # step 0: e.g. a checkpoint, so that a restart never redoes the init

    # -- training: one step per batch (part 1) or per packet (the others)
    upstream_end: int | None = None  # the step the part before this one ended at
    while True:
        if k == 0:
            if worker.step >= n_steps:
                break
            t0 = time.perf_counter()
            x = worker.data_batch()
            st.compute_s += time.perf_counter() - t0
        else:
            if upstream_end is None:
                packet = receive()
                if packet["kind"] == "end":
                    upstream_end = packet["step"]
                    continue
            elif worker.step < upstream_end:
                # Latents in flight when the parts were checkpointed (a restart,
                # --resume, a PBT restore) are gone; make up those steps on local
                # inputs so that every part trains the same number of steps.
                packet = {"kind": "data", "step": worker.step + 1, "latent": None, "weights": None}
                st.lost_packets += 1
            else:
                break
            apply_weights(packet)
            x = None
            if packet["latent"] is not None:
                t0 = time.perf_counter()
                x = latent_of(packet)
                st.wait_s += time.perf_counter() - t0
                if x is None:  # the latent died with a crashed sender
                    st.lost_packets += 1
            if x is None:
                t0 = time.perf_counter()
                x = worker.stale_input()
                st.compute_s += time.perf_counter() - t0
                st.stale_steps += 1
                st.staleness.append(packet["step"] - worker.versions.get(k - 1, 0))
        t0 = time.perf_counter()
        with guard:
            result = worker.trainer.step(x)
        st.compute_s += time.perf_counter() - t0
        if worker.step == 0:
            st.first_step_time = time.time()
        worker.step += 1
        step = worker.step
        st.steps = step
        st.losses.append(result.loss)
        st.rollbacks = worker.trainer.rollbacks
        if outbox is not None:
            up = worker.link is None or worker.link.is_up(step)
            packet = {"kind": "data", "step": step, "latent": None, "weights": None}
            if up:
                st.bytes_forward += tensor_bytes(result.output)
                packet["latent"] = store_put(result.output)
                if worker.down_since_sync or step - worker.last_sync >= sync_every:
                    packet["weights"] = own_weights(step)
                    worker.last_sync, worker.down_since_sync = step, False
            else:
                worker.down_since_sync = True
            send(packet)
        if on_step is not None:
            on_step(worker)
    with guard:
        worker.trainer.validate()
    st.rollbacks = worker.trainer.rollbacks
    if outbox is not None:
        send({"kind": "end", "step": worker.step})
        if isinstance(outbox, BackgroundOutbox):
            outbox.close()
    st.end_time = time.time()
    return st
