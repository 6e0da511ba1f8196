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
with its last synced (stale) copy of the upstream weights.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from raylocal.config import RunConfig
from raylocal.data import BatchStream
from raylocal.errors import ConfigError
from raylocal.objectives import preprocess
from raylocal.train import PartTrainer, build_glow


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


@dataclass(frozen=True)
class LinkModel:
    """When the link from part k to part k+1 is up, as a function of the sender's step.

    Spec (one per boundary, separated by ``|``; a single spec applies to all):
      ``up``                      always up
      ``p=0.9``                   up with probability 0.9 at each step (seeded)
      ``outage=100:20,300:50``    down for steps 100-119 and 300-349
    """

    kind: str = "up"
    p: float = 1.0
    outages: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    @classmethod
    def parse(cls, text: str, boundary: int = 0, seed: int = 0) -> LinkModel:
        specs = [s.strip() for s in text.split("|")]
        spec = specs[0] if len(specs) == 1 else (specs[boundary] if boundary < len(specs) else None)
        if spec is None:
            raise ConfigError(f"link {text!r} has {len(specs)} boundaries, boundary {boundary + 1} has none")
        if spec == "up":
            return cls()
        m = re.fullmatch(r"p=([0-9.eE+-]+)", spec)
        if m:
            try:
                p = float(m.group(1))
            except ValueError:
                p = -1.0
            if not 0 < p <= 1:
                raise ConfigError(f"link {spec!r}: p must be in (0, 1]")
            return cls("random", p=p, seed=seed * 1_000_003 + boundary)
        m = re.fullmatch(r"outage=((?:\d+:\d+)(?:,\d+:\d+)*)", spec)
        if m:
            outages = tuple(tuple(int(v) for v in o.split(":")) for o in m.group(1).split(","))
            if any(length <= 0 or start <= 0 for start, length in outages):
                raise ConfigError(f"link {spec!r}: outages need a start >= 1 and a length >= 1")
            return cls("outage", outages=outages)  # type: ignore[arg-type]
        raise ConfigError(f"link {spec!r} is not 'up', 'p=<probability>' or 'outage=START:LEN,...'")

    def is_up(self, step: int) -> bool:
        if self.kind == "random":
            return random.Random(self.seed * 7_919 + step).random() < self.p
        if self.kind == "outage":
            return not any(start <= step < start + length for start, length in self.outages)
        return True


def check_links(text: str, n_parts: int) -> None:
    for b in range(max(n_parts - 1, 1)):
        LinkModel.parse(text, b)
    if "|" in text and len(text.split("|")) != n_parts - 1:
        raise ConfigError(
            f"link {text!r} names {len(text.split('|'))} boundaries, {n_parts} parts have {n_parts - 1}"
        )


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
    start_time: float = 0.0
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


def run_part(
    worker: PartWorker,
    inbox: Any,
    outbox: Any,
    store_put: Callable[[Any], Any],
    store_get: Callable[[Any], Any],
    n_steps: int,
    on_step: Callable[[PartWorker], None] | None = None,
    lock: Any = None,
) -> WorkerStats:
    """A part's whole life in the pipeline (see the module doc).

    The first part trains ``n_steps`` steps on its data; every other part
    trains one step per data packet until the end packet. ``lock`` (optional)
    is held during each step so that another thread can read consistent weights.
    """
    st = worker.stats
    st.start_time = time.time()
    k = worker.index
    sync_every = worker.config.sync_every
    last_sync = -math.inf
    down_since_sync = False

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
                worker.load_upstream(j, version, store_get(ref))
                st.wait_s += time.perf_counter() - t0
                worker.weight_refs[j] = [version, ref]

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

    # -- initialisation: ActNorms see the real output of the part before them
    if k == 0:
        x = worker.init_batch()
    else:
        packet = receive()
        assert packet["kind"] == "init", packet["kind"]
        apply_weights(packet)
        x = store_get(packet["latent"])
    y = worker.initialize(x)
    if outbox is not None:
        st.bytes_forward += tensor_bytes(y)
        send({"kind": "init", "latent": store_put(y), "weights": own_weights(0)})
        last_sync = 0

    # -- training: one step per batch (part 1) or per packet (the others)
    step = 0
    while True:
        if k == 0:
            if step >= n_steps:
                break
            t0 = time.perf_counter()
            x = worker.data_batch()
            st.compute_s += time.perf_counter() - t0
        else:
            packet = receive()
            if packet["kind"] == "end":
                break
            apply_weights(packet)
            if packet["latent"] is not None:
                t0 = time.perf_counter()
                x = store_get(packet["latent"])
                st.wait_s += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                x = worker.stale_input()
                st.compute_s += time.perf_counter() - t0
                st.stale_steps += 1
                st.staleness.append(packet["step"] - worker.versions.get(k - 1, 0))
        t0 = time.perf_counter()
        if lock is not None:
            with lock:
                result = worker.trainer.step(x)
        else:
            result = worker.trainer.step(x)
        st.compute_s += time.perf_counter() - t0
        step += 1
        st.steps = step
        st.losses.append(result.loss)
        st.rollbacks = worker.trainer.rollbacks
        if outbox is not None:
            up = worker.link is None or worker.link.is_up(step)
            packet = {"kind": "data", "step": step, "latent": None, "weights": None}
            if up:
                st.bytes_forward += tensor_bytes(result.output)
                packet["latent"] = store_put(result.output)
                if down_since_sync or step - last_sync >= sync_every:
                    packet["weights"] = own_weights(step)
                    last_sync, down_since_sync = step, False
            else:
                down_since_sync = True
            send(packet)
        if on_step is not None:
            on_step(worker)
    if lock is not None:
        with lock:
            worker.trainer.validate()
    else:
        worker.trainer.validate()
    st.rollbacks = worker.trainer.rollbacks
    if outbox is not None:
        send({"kind": "end", "step": step})
    st.end_time = time.time()
    return st
