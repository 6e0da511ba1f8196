"""The asynchronous parts pipeline as plain Python: workers, links, the part loop.

Nothing here imports Ray. A ``PartWorker`` holds one part (and a possibly
stale copy of the parts upstream of it); ``PartLoop`` is its whole life in the
pipeline: initialise on the first packet (the upstream parts' initialised
weights, from which it computes its own init input), then train its own ``n_steps``
steps, each on the freshest latent its link delivered or, when there is none
(``--starve stale``) or the upstream has finished, on latents it computes
itself from its own data through its synced copy of the upstream weights.

Between two parts runs a link: a ``LinkSender`` on the upstream side puts
packets on an emulated wire (``raylocal.core.links``: bandwidth, latency, outages)
from a thread of its own, and a ``LinkReceiver`` on the downstream side hands
them over once they have arrived. Packets travel through a bounded
``PacketChannel`` (``raylocal.pipeline.channel``: in this process in tests, inside a
small Ray actor in ``latent_queue``); tensors travel through ``store_put``/``store_get``
(identity in tests, Ray's object store in production), so a packet only
carries references.

Packets (dicts, so that they pickle anywhere):
    {"kind": "init", "step": 0, "latent": None, "weights": {j: [version, ref, nbytes]}, "arrive_at": t}
    {"kind": "data", "step": s, "latent": ref, "weights": {...} | None, "arrive_at": t}
    {"kind": "end", "step": s, "weights": {...} | None, "arrive_at": t}
A latent sent into an outage is lost (it would be stale when the link is back);
a weight sync waits for the link and crosses with the next packet that does.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from raylocal.core.checkpoint import host_copy
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import BatchStream
from raylocal.core.faults import Straggler, parse_faults
from raylocal.core.links import SYSTEM_CLOCK, Clock, LinkSpec, Wire
from raylocal.core.tensors import tensor_bytes
from raylocal.errors import CheckpointError, ClusterError
from raylocal.model.objectives import preprocess, queued_work, to_device, wait_for
from raylocal.pipeline.channel import PacketChannel, newer_weights
from raylocal.pipeline.trace import percentile
from raylocal.training.trainer import (
    WIRE_DTYPES,
    LRClock,
    PartTrainer,
    build_glow,
    from_wire,
    over_the_wire,
    wire_payload,
)


def to_wire(x: Tensor, dtype: torch.dtype) -> tuple[Tensor | dict[str, Tensor], Any]:
    """A latent as it goes on the wire: a CPU copy at the wire's dtype (int8: with its scales), and the
    CUDA event after which that copy is complete (None on CPU). A latent put
    into the object store on the GPU would be restored on the receiver's
    ``cuda:0``, whatever GPU that process was given, and cost a synchronous
    copy; from a GPU it is copied into pinned memory without blocking, and the
    link's thread waits for the event, not the part."""
    payload = wire_payload(x.detach(), dtype)
    if x.device.type != "cuda":  # bfloat16 or int8 made new tensors; float32 is the output itself
        return (x.detach().clone() if dtype == torch.float32 else payload), None

    def pinned(t: Tensor) -> Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    host = {k: pinned(v) for k, v in payload.items()} if isinstance(payload, dict) else pinned(payload)
    return host, queued_work(x)  # recorded on the copies' stream: x's device's, not the thread's current one


@dataclass
class WorkerStats:
    """What a part measured about itself; all plain numbers (sent to the driver)."""

    steps: int = 0
    compute_s: float = 0.0  # training steps (and stale upstream recomputation)
    wait_s: float = 0.0  # idle: waiting for a latent from upstream (--starve wait)
    put_s: float = 0.0  # idle: waiting for room to send (--full block)
    bytes_forward: int = 0  # latents that crossed the link to the next part
    bytes_weights: int = 0  # weights that crossed it for syncs (this part's and forwarded ones)
    bytes_backward: int = 0  # anything sent upstream: by design always 0
    fresh_steps: int = 0  # steps trained on a latent that came over the link
    stale_steps: int = 0  # steps trained on a latent computed here through the synced upstream copy
    dropped_latents: int = 0  # sent latents replaced by newer ones in a full queue (--full drop-oldest)
    superseded_latents: int = 0  # received latents replaced by newer ones before this part took them (drop-oldest)
    bytes_received: int = 0  # latents and weights this part fetched from its upstream (what crossed its link)
    outage_latents: int = 0  # sent latents lost because the link was down
    lost_packets: int = 0  # latents that died with a crashed sender
    # per own step: [upstream step whose weights made the input, time the step began]
    inputs: list[list[float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # [i]: when step i ended (0: the init)
    losses: list[float] = field(default_factory=list)
    rollbacks: int = 0
    skipped: int = 0  # outlier batches the trainer did not learn from (part 1 only: PartTrainer.step)
    restarts: int = 0  # times this part's process died and was restored from its checkpoint
    resumed_at: int = -1  # step this part continued from after a driver restart (--resume)
    start_time: float = 0.0
    first_step_time: float = 0.0  # end of the first step: steady state starts here
    end_time: float = 0.0
    # --trace-packets N: the first N packets this part sent and received, hop by hop (raylocal.pipeline.trace)
    sent_trace: list[list[Any]] = field(default_factory=list)
    received_trace: list[list[Any]] = field(default_factory=list)


class PartWorker:
    """One part of the pipeline, testable without Ray.

    Builds the full Glow from the config (weights depend only on the seed, so
    every worker starts from the same model), trains ``layers[start:stop]`` and
    keeps the layers upstream of it as a copy that is refreshed by weight syncs.
    """

    def __init__(
        self,
        config: RaylocalConfig,
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
        self.stream = BatchStream(train_images, config.schedule.batch_size, config.schedule.seed + offset)
        self.noise = torch.Generator().manual_seed(config.schedule.seed + 1 + offset)
        self.train_images = train_images
        self.versions: dict[int, int] = {}  # upstream part -> version of our copy of it
        self.weight_refs: dict[int, list[Any]] = {}  # upstream part -> [version, ref, nbytes] to forward
        self.stats = WorkerStats()
        self.initialized = False  # ActNorm data init done (skipped when restored)
        self.step = 0
        self.last_sync: float = -math.inf  # step of the last weights sent downstream

    # ------------------------------------------------------------ data

    def data_batch(self) -> Tensor:
        return preprocess(to_device(self.stream.next(), self.device), self.config.model.n_bits, self.noise)

    def init_batch(self) -> Tensor:
        x = self.train_images[: self.config.schedule.init_batch_size].to(self.device)
        return preprocess(x, self.config.model.n_bits, self.noise)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """ActNorm data init of this part on its real input."""
        self.part(x)
        self.initialized = True

    @torch.no_grad()
    def init_input(self, wire: torch.dtype) -> Tensor:
        """This part's init input, computed here: part 1's init batch (the first
        draw of part 1's noise) through the upstream copies, which hold the
        upstream parts' initialised weights, rounded at each boundary as the wire
        rounds it; what the single-process ``initialize`` feeds this part. (Part k
        pushes the init batch through k upstream copies once: cheap beside the
        bytes it saves at the 2-3 parts of a weak link.)"""
        noise = torch.Generator().manual_seed(self.config.schedule.seed + 1)  # part 1's
        x = preprocess(
            self.train_images[: self.config.schedule.init_batch_size].to(self.device), self.config.model.n_bits, noise
        )
        for up in self.upstream:
            x = over_the_wire(up(x)[0], wire)
        return x

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
        # copies, made now: the caller (an actor's lock) may release the part before
        # the state is serialised, and the live Adam moments would move on meanwhile
        return {
            "index": self.index,
            "model": host_copy(self.glow.state_dict(), copy=True),
            "trainer": host_copy(self.trainer.state_dict(), copy=True),
            "stream": self.stream.state(),
            "noise": self.noise.get_state(),
            "step": self.step,
            "last_sync": self.last_sync if math.isfinite(self.last_sync) else -1,
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
        self.versions = {int(j): int(v) for j, v in state["versions"].items()}
        self.stats = WorkerStats(**json.loads(state["stats"]))
        self.initialized = True


class LinkSender:
    """The upstream end of a link.

    ``send`` hands a packet to the link's own thread and returns: with
    ``full="block"`` it waits while the previous packet has not been taken yet
    (so a full queue downstream throttles the part, as a bounded queue should);
    with ``full="drop-oldest"`` the newest packet replaces a waiting one, here
    and in the queue, and the part never waits. The link's thread spends each
    packet's time on the ``Wire``, puts its tensors into the store and the
    packet into the channel; a latent that meets an outage is lost, its
    weights wait for the next packet that crosses. A ``lossless`` link loses
    nothing: each packet is sent again once an outage is over, as TCP would
    (the pipeline rival's activations and gradients, which it cannot train without).
    ``origin``: when its timed outages start (by default, now); the two directions
    of one link share it, so that an outage cuts both at once.
    """

    def __init__(
        self,
        channel: Any,
        spec: LinkSpec,
        store_put: Callable[[Any], Any],
        stats: WorkerStats,
        index: int,
        full: str = "block",
        clock: Clock = SYSTEM_CLOCK,
        lossless: bool = False,
        trace_packets: int = 0,
        origin: float | None = None,
    ) -> None:
        self.channel, self.store_put, self.stats, self.index, self.full = channel, store_put, stats, index, full
        self.lossless, self.trace_packets = lossless, trace_packets
        self.wire = Wire(spec, clock, origin)
        self.clock = clock
        self._slot = PacketChannel(1)  # the packet waiting for the wire
        self._count = threading.Lock()  # both threads count dropped latents
        self._held: dict[int, list[Any]] = {}  # weights that met an outage: sent with the next packet
        self._sent_versions: dict[int, int] = {}  # part -> newest version of its weights sent on this link
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="raylocal-link", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- the part's side

    def send(self, packet: dict[str, Any]) -> float:
        """Queue a packet for the wire; returns the seconds the part waited."""
        start = time.perf_counter()
        packet["handed_at"] = self.clock.now()
        if self.full == "drop-oldest" and packet["kind"] == "data":
            # the waiting latent is replaced, its weights travel on
            self._count_drops(self._slot.put_latest(packet))
        else:
            self._slot.put(packet)
        self._raise()
        return time.perf_counter() - start

    def _count_drops(self, dropped: int) -> None:
        with self._count:
            self.stats.dropped_latents += dropped

    def close(self) -> float:
        """Send the end packet and wait until everything is in the channel."""
        waited = self.send({"kind": "end", "step": self.stats.steps, "latent": None, "weights": None})
        start = time.perf_counter()
        self._thread.join()
        self._raise()
        return waited + time.perf_counter() - start

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # ---------------------------------------------------------- the link's thread

    def _serve(self) -> None:
        try:
            while True:
                packet = self._slot.get()
                self._transmit(packet)
                if packet["kind"] == "end":
                    return
        except BaseException as e:  # handed to the part's thread
            self.error = e
            while self._slot.get()["kind"] != "end":  # so that send() never waits on a dead link
                pass

    def _transmit(self, packet: dict[str, Any]) -> None:
        picked_at = self.clock.now()
        weights = newer_weights(self._held, packet.get("weights"))
        weights = {j: w for j, w in weights.items() if w[0] > self._sent_versions.get(j, -1)}
        latent = packet.get("latent")
        nbytes = tensor_bytes(latent) + sum(w[2] for w in weights.values())
        handed_at = packet.pop("handed_at")
        if packet["kind"] == "data" and not self.lossless:
            arrival = self.wire.transmit(nbytes, packet["step"], at=handed_at)
        else:  # the init and end packets wait for the link: the receiver cannot do without them
            arrival = self.wire.deliver(nbytes, at=handed_at)
        wired_at = self.clock.now()
        if arrival is None:
            self.stats.outage_latents += 1
            self._held = weights
            self._trace(packet, nbytes, len(weights), [handed_at, picked_at, wired_at, None, None])
            return
        self._held = {}
        for j, (version, payload, size) in weights.items():
            if j == self.index:  # this part's own weights: into the store now
                weights[j] = [version, self.store_put(payload), size]
            self._sent_versions[j] = version
            self.stats.bytes_weights += size
        if latent is not None:
            ready = packet.pop("ready", None)
            if ready is not None:  # the copy off the GPU (to_wire) has landed
                ready.synchronize()
            self.stats.bytes_forward += tensor_bytes(latent)
            packet["latent"] = self.store_put(latent)
        packet["weights"] = weights or None
        packet["arrive_at"] = arrival
        stored_at = self.clock.now()
        self._put(packet)
        self._trace(packet, nbytes, len(weights), [handed_at, picked_at, wired_at, stored_at, self.clock.now()])

    def _trace(self, packet: dict[str, Any], nbytes: int, syncs: int, times: list[float | None]) -> None:
        if len(self.stats.sent_trace) < self.trace_packets:
            self.stats.sent_trace.append([packet["step"], packet["kind"], nbytes, syncs, *times])

    def _put(self, packet: dict[str, Any]) -> None:
        if self.full == "drop-oldest" and packet["kind"] == "data":
            self._count_drops(self.channel.put_latest(packet))
        else:
            self.channel.put(packet)


def _carry_weights(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """``newer``, with the weight syncs of ``older`` (which it replaces) that it lacks."""
    weights = newer_weights(older.get("weights"), newer.get("weights"))
    states = {}
    for j, (version, _, _) in weights.items():
        mine = (newer.get("weights") or {}).get(j)
        states[j] = (newer if mine is not None and mine[0] == version else older)["states"][j]
    return newer | {"weights": weights or None, "states": states}


class ReadySlot:
    """The one packet a receiver holds for its part. Normally a packet waits there
    until the part takes it; with ``keep_latest`` (``--full drop-oldest``) a data
    packet that arrives replaces a waiting data packet, its weight syncs carried
    over, so that the part always takes the newest latent that has arrived: the
    bound on how old a latent can be is the queue's, end to end. The init, end
    and error packets are never replaced."""

    def __init__(self, keep_latest: bool) -> None:
        self.keep_latest = keep_latest
        self.superseded = 0  # data packets replaced here by newer ones
        self._item: dict[str, Any] | None = None
        self._cond = threading.Condition()

    def _replaceable(self, packet: dict[str, Any]) -> bool:
        held = self._item
        return held is None or (self.keep_latest and held["kind"] == "data" and packet["kind"] == "data")

    def put(self, packet: dict[str, Any], when_placed: Callable[[], None] | None = None) -> None:
        """Hold ``packet`` once there is room; ``when_placed`` runs as it is
        placed, before the part can take it."""
        with self._cond:
            while not self._replaceable(packet):
                self._cond.wait()
            if self._item is not None:
                packet = _carry_weights(self._item, packet)
                self.superseded += 1
            if when_placed is not None:
                when_placed()
            self._item = packet
            self._cond.notify_all()

    def get(self, block: bool = True) -> dict[str, Any] | None:
        with self._cond:
            while self._item is None:
                if not block:
                    return None
                self._cond.wait()
            packet, self._item = self._item, None
            self._cond.notify_all()
            return packet


class LinkReceiver:
    """The downstream end of a link: a thread takes packets from the channel,
    waits until each has arrived (its latency), fetches its tensors from the
    store and holds it for the part in a ``ReadySlot`` (one packet ahead of it;
    with ``keep_latest``, the newest that has arrived)."""

    def __init__(
        self,
        channel: Any,
        store_get: Callable[[Any], Any],
        clock: Clock = SYSTEM_CLOCK,
        keep_latest: bool = False,
        trace: list[list[Any]] | None = None,
        trace_packets: int = 0,
    ) -> None:
        self.channel, self.store_get, self.clock = channel, store_get, clock
        self._ready = ReadySlot(keep_latest)
        self.trace = trace if trace is not None else []  # the first trace_packets packets' hops
        self.trace_packets = trace_packets
        self.error: BaseException | None = None
        self.bytes_received = 0  # of the latents and weights fetched (a sender's count also holds those it dropped)
        self.ended = False  # the sender's end has been taken: nothing more comes
        self._draining = False
        self._thread = threading.Thread(target=self._serve, name="raylocal-inbox", daemon=True)
        self._thread.start()

    @property
    def superseded(self) -> int:
        """Latents that arrived and were replaced by newer ones before the part took them."""
        return self._ready.superseded

    def get(self, block: bool = True) -> dict[str, Any] | None:
        """The next packet that has arrived; None at once when none has and not ``block``."""
        packet = self._ready.get(block=block)
        if packet is None:
            return None
        if packet["kind"] == "error":
            raise self.error  # type: ignore[misc]
        self.ended = packet["kind"] == "end"
        row = packet.pop("trace_row", None)
        if row is not None:
            row[-1] = self.clock.now()
        return packet

    def _traced(self, packet: dict[str, Any], times: list[float]) -> Callable[[], None] | None:
        """Note the first packets' hops so far; what it returns notes when the
        packet is ready, and ``get`` when the part took it."""
        if len(self.trace) >= self.trace_packets:
            return None
        row = [packet["step"], packet["kind"], len(packet["states"]), *times, None, None]
        self.trace.append(row)
        packet["trace_row"] = row

        def placed() -> None:
            row[-2] = self.clock.now()

        return placed

    def drain(self) -> None:
        """Take and drop what is still coming, up to the sender's end packet, so
        that a sender never waits for room on a part that has finished."""
        self._draining = True
        while not self.ended:
            packet = self._ready.get()
            if packet["kind"] == "error":
                raise self.error  # type: ignore[misc]
            self.ended = packet["kind"] == "end"

    def _serve(self) -> None:
        try:
            while True:
                packet = dict(self.channel.get())
                got_at = self.clock.now()
                if self._draining and packet["kind"] != "end":
                    continue
                self.clock.sleep_until(packet.get("arrive_at", 0.0))
                arrived_at = self.clock.now()
                if packet.get("latent") is not None:
                    latent = self.store_get(packet["latent"])  # None: it died with a crashed sender
                    self.bytes_received += tensor_bytes(latent)
                    packet["latent"] = None if latent is None else from_wire(latent)
                    packet["lost"] = latent is None
                latent_at = self.clock.now()
                packet["states"] = {
                    int(j): self.store_get(ref) for j, (version, ref, size) in (packet.get("weights") or {}).items()
                }
                self.bytes_received += tensor_bytes(list(packet["states"].values()))
                self._ready.put(packet, self._traced(packet, [got_at, arrived_at, latent_at, self.clock.now()]))
                if packet["kind"] == "end":
                    return
        except BaseException as e:  # handed to the part's thread
            self.error = e
            self._ready.put({"kind": "error"})


class PartLoop:
    """A part's whole life in the pipeline (see the module doc).

    Every part trains ``n_steps`` steps of its own (or until ``--time-budget``).
    Part 1 trains on its data; every other part on the next latent its link
    delivers, waiting for one with ``--starve wait``, or, with ``--starve
    stale`` (and always once the upstream has finished), on a latent it
    computes itself through its synced upstream copy when none has arrived.
    ``lock`` (optional) is held during each step, so that another thread can
    read consistent weights.
    """

    def __init__(
        self,
        worker: PartWorker,
        inbox: Any,
        outbox: Any,
        store_put: Callable[[Any], Any],
        store_get: Callable[[Any], Any],
        n_steps: int,
        on_step: Callable[[PartWorker], None] | None = None,
        lock: Any = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.worker, self.n_steps, self.on_step, self.clock = worker, n_steps, on_step, clock
        config = worker.config
        self.k = worker.index
        self.guard = lock if lock is not None else contextlib.nullcontext()
        self.wait_for_fresh = config.links.starve == "wait"
        self.wire_dtype = WIRE_DTYPES[config.links.wire_dtype]
        keep_latest = config.links.full == "drop-oldest"  # the receiver too keeps only the newest latent
        traced = config.links.trace_packets
        self.receiver = None
        if inbox is not None:
            trace = worker.stats.received_trace
            self.receiver = LinkReceiver(inbox, store_get, clock, keep_latest, trace, traced)
        self.sender = None
        if outbox is not None:
            spec = LinkSpec.parse(config.links.link, self.k, config.schedule.seed)
            self.sender = LinkSender(
                outbox, spec, store_put, worker.stats, self.k, config.links.full, clock, trace_packets=traced
            )
        self.upstream_ended = False
        self.straggler = Straggler(parse_faults(config.run.inject or ""), self.k, clock.sleep)
        st = worker.stats
        st.start_time = st.start_time or clock.now()
        self.deadline = st.start_time + config.run.time_budget if config.run.time_budget else math.inf
        # every part trains n_steps steps, so its own steps are the run's clock; a
        # run-wide decay runs on through the fine-tune phase
        lr_clock = LRClock(
            config.schedule.lr_schedule == "cosine-run", n_steps, config.schedule.finetune_epochs * len(worker.stream)
        )
        worker.trainer.total_steps = lr_clock.decay(n_steps)

    def run(self) -> WorkerStats:
        worker, st = self.worker, self.worker.stats
        if not worker.initialized:  # a worker restored from a checkpoint skips it: its neighbours did it
            self._initialize()
        while worker.step < self.n_steps and self.clock.now() < self.deadline:
            started = self.clock.now()
            x, source = self._next_input()
            with self.guard:  # (the wait for the lock is not compute)
                t0 = time.perf_counter()
                result = worker.trainer.step(x)
                wait_for(worker.device)  # a GPU's optimizer kernels are this step's compute, not the wait after it
                computed = time.perf_counter() - t0
            self._computed(computed)
            worker.step += 1
            if worker.step == 1:
                st.first_step_time = self.clock.now()
            st.steps = worker.step
            if not result.skipped:  # an outlier's loss (up to 1e11) is no measure of the part
                st.losses.append(result.loss)
            self._count_events()
            st.step_times.append(self.clock.now())
            if source is not None:
                st.inputs.append([source, started])
            self._send("data", result.output)
            if self.on_step is not None:
                self.on_step(worker)
        with self.guard:
            worker.trainer.validate()
        self._count_events()  # the last validation may roll back
        if self.sender is not None:
            st.put_s += self.sender.close()
        st.end_time = self.clock.now()
        if self.receiver is not None and not self.upstream_ended:
            # done first (its own steps or --time-budget): its upstream may still be sending
            self.receiver.drain()
        if self.receiver is not None:
            st.superseded_latents = self.receiver.superseded
            st.bytes_received = self.receiver.bytes_received
        return st

    def _count_events(self) -> None:
        """The trainer's rollbacks and skipped batches, where progress reports read them."""
        trainer, st = self.worker.trainer, self.worker.stats
        st.rollbacks, st.skipped = trainer.rollbacks, trainer.skipped

    # ------------------------------------------------------------ steps

    def _initialize(self) -> None:
        """ActNorms see the real output of the part before them. The init packet
        carries the upstream parts' initialised weights, not that output (the
        init batch's latents are several times their bytes): a part computes its
        init input from its copies of them (``init_input``)."""
        worker = self.worker
        x = worker.init_batch() if self.k == 0 else self._init_input()
        worker.initialize(x.to(worker.device))
        worker.stats.step_times.append(self.clock.now())
        self._send("init", None)
        if self.on_step is not None:
            self.on_step(worker)  # step 0: e.g. a checkpoint, so that a restart never redoes the init

    def _init_input(self) -> Tensor:
        worker = self.worker
        while True:
            packet = self._receive(block=True)
            assert packet is not None, "a blocking receive returned nothing"
            if packet["kind"] == "end":
                raise ClusterError(f"part {self.k + 1}: its upstream ended before its init packet arrived")
            if all(j in worker.versions for j in range(self.k)):
                return worker.init_input(self.wire_dtype)
            if packet["latent"] is not None:
                # the upstream weights died with an upstream that crashed before this part
                # fetched them (it restarts from its checkpoint and sends no init again):
                # its next latent is as real an output of it
                return packet["latent"]

    def _computed(self, seconds: float) -> None:
        """Compute time, counted, and as long again for each extra factor of a straggler."""
        self.worker.stats.compute_s += seconds
        self.straggler.after(seconds)

    def _next_input(self) -> tuple[Tensor, int | None]:
        """The input of this step and the upstream step whose weights made it."""
        worker, st = self.worker, self.worker.stats
        if self.k == 0:
            t0 = time.perf_counter()
            x = worker.data_batch()
            self._computed(time.perf_counter() - t0)
            return x, None
        packet = None if self.upstream_ended else self._receive(block=self.wait_for_fresh)
        if packet is not None and packet["kind"] == "data" and packet["latent"] is not None:
            st.fresh_steps += 1
            return to_device(packet["latent"], worker.device), int(packet["step"])
        t0 = time.perf_counter()
        x = worker.stale_input()
        self._computed(time.perf_counter() - t0)
        st.stale_steps += 1
        return x, worker.versions.get(self.k - 1, 0)

    def _receive(self, block: bool) -> dict[str, Any] | None:
        """The next packet (its weights applied), or None when none has arrived."""
        assert self.receiver is not None
        t0 = time.perf_counter()
        packet = self.receiver.get(block)
        self.worker.stats.wait_s += time.perf_counter() - t0
        if packet is None:
            return None
        for j, state in packet["states"].items():
            version, ref, size = packet["weights"][j]
            if state is not None and self.worker.versions.get(j, -1) < version:  # None: lost with its sender
                self.worker.load_upstream(j, version, state)
                self.worker.weight_refs[j] = [version, ref, size]
        if packet.get("lost"):
            self.worker.stats.lost_packets += 1
        if packet["kind"] == "end":
            self.upstream_ended = True
        return packet

    def _send(self, kind: str, output: Tensor | None) -> None:
        """Send this step's output on, with this part's weights when a sync is due."""
        if self.sender is None:
            return
        worker = self.worker
        latent, ready = to_wire(output, self.wire_dtype) if output is not None else (None, None)
        packet: dict[str, Any] = {"kind": kind, "step": worker.step, "latent": latent, "ready": ready}
        if kind == "init" or worker.step - worker.last_sync >= worker.config.links.sync_every:
            state = worker.weights()
            packet["weights"] = newer_weights(worker.weight_refs, {self.k: [worker.step, state, tensor_bytes(state)]})
            worker.last_sync = worker.step
        worker.stats.put_s += self.sender.send(packet)


def staleness_summary(upstream_times: list[float], inputs: list[list[float]]) -> dict[str, dict[str, float]]:
    """How far behind the upstream part each input of a part was, in upstream
    steps (steps the upstream had finished when the input was used, minus the
    step whose weights made it) and in seconds (since that step ended)."""
    steps, seconds = [], []
    for source, used_at in inputs:
        source = int(source)
        done = bisect.bisect_right(upstream_times, used_at) - 1
        steps.append(float(max(done - source, 0)))
        if source < len(upstream_times):
            seconds.append(max(used_at - upstream_times[source], 0.0))

    def describe(values: list[float]) -> dict[str, float]:
        return {
            "mean": sum(values) / len(values) if values else 0.0,
            "p50": percentile(values, 0.5),
            "p95": percentile(values, 0.95),
            "max": max(values) if values else 0.0,
        }

    return {"steps": describe(steps), "seconds": describe(seconds)}
