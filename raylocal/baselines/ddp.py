"""The data-parallel baselines: end-to-end training on K Ray Train workers.

Ray Train's ``TorchTrainer`` runs ``train_loop`` on K workers (gloo on CPU,
nccl on GPU). Each worker takes every K-th batch of the same shuffled stream,
with batch_size // K images, so the global batch matches the single-process
runs. Two ways to keep the workers' models together:

- DDP (``--average-every 0``): every step all-reduces every gradient. Over an
  emulated link (``--link``), ``LinkedAllReduce`` is DDP's communication hook:
  each gradient bucket is all-reduced as usual and completes no sooner than the
  link would have carried its ring traffic, on the hook's own thread, so that
  it overlaps the rest of the backward pass as real DDP does.
- Local SGD (``--average-every H``): each worker trains on its own batches and
  the workers average their parameters every H steps over the link; with
  ``--outer-lr`` the average is DiLoCo's pseudo-gradient for an outer Nesterov
  step (Douillard et al. 2023).

Used for ``scripts/bench_links.py``, ``scripts/bench_async.py`` and, with
``--finetune-workers K``, for the fine-tune phase.
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raylocal.baselines.guard import NonFiniteGuard
from raylocal.baselines.projection import ring_bytes
from raylocal.cluster.connect import node_images
from raylocal.cluster.placement import WorkerBundles, check_torch_sees_gpus
from raylocal.cluster.queue import Mailbox
from raylocal.cluster.ray_train import run_on_ray_train
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import BatchStream, training_images
from raylocal.core.faults import Straggler, parse_faults
from raylocal.core.links import SYSTEM_CLOCK, Clock, LinkSpec, Wire
from raylocal.core.runlog import peak_rss_mb
from raylocal.core.tensors import tensor_bytes
from raylocal.model.objectives import nll_bits, preprocess, queued_work, to_device, wait_for
from raylocal.training.trainer import build_glow, initialize, scheduled_lr

LOSS_EVERY = 10  # steps per point of a data-parallel run's loss curve
TIMELINE_STEPS = 256  # the first steps whose times each worker keeps (``StepTimeline``)
# each worker's DDP reducer timing, mean seconds per step (``reducer_timing``)
REDUCER_FIGURES = ("forward_s", "backward_s", "allreduce_s", "allreduce_exposed_s")


class NLL(nn.Module):
    """Wraps a Glow so that DDP sees every parameter used inside ``forward``."""

    def __init__(self, glow: nn.Module) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, x: Tensor) -> Tensor:
        return nll_bits(self.glow, x).mean()


def _gloo_all_reduce(tensor: Tensor) -> torch.futures.Future:
    import torch.distributed as dist

    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def powersgd_messages(gradients: list[Tensor], rank: int, min_compression_rate: float = 2.0) -> list[int]:
    """The elements of the three all-reduces torch's ``powerSGD_hook`` makes for a
    bucket once it compresses, each after the one before it is back: the tensors
    it leaves uncompressed (possibly none: the round trip is still made), every
    compressed matrix's P, then every Q. Which gradients it compresses, viewed
    as (rows, rest) at rank min(rows, rest, ``rank``), is torch's own
    ``_should_compress``."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    whole = ps = qs = 0
    for g in gradients:
        n = g.shape[0] if g.dim() else 1
        m = g.numel() // n
        r = min(n, m, rank)
        if _should_compress(n, m, r, min_compression_rate)[0]:
            ps, qs = ps + n * r, qs + m * r
        else:
            whole += g.numel()
    return [whole, ps, qs]


class PowerSGDReduce:
    """A bucket's all-reduce by torch's own ``powerSGD_hook`` (its compression,
    error feedback and warm start), with the messages it puts on the wire. The
    hook chains its three all-reduces in callbacks, so buckets in flight at once
    could issue their collectives in another order on each worker (gloo then
    hangs): ``LinkedAllReduce`` runs one bucket's chain at a time."""

    def __init__(self, rank: int, start: int) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        self.hook = powerSGD_hook.powerSGD_hook
        self.state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=rank, start_powerSGD_iter=start)

    def __call__(self, bucket: Any) -> tuple[torch.futures.Future, list[int]]:
        tensor = bucket.buffer()
        if self.state.iter < self.state.start_powerSGD_iter:  # plain all-reduces until then
            elements = [tensor.numel()]
        else:
            elements = powersgd_messages(
                bucket.gradients(), self.state.matrix_approximation_rank, self.state.min_compression_rate
            )
        return self.hook(self.state, bucket), [n * tensor.element_size() for n in elements]

    def forget(self) -> None:
        """Drop the error feedback and warm start: after a skipped step they hold
        the non-finite gradient, which would make every later one non-finite."""
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()


class LinkedAllReduce:
    """DDP's communication hook over an emulated link.

    Each bucket is averaged by a real all-reduce (``reduce``: PowerSGD's, say;
    by default a plain one, in ``compress``'s dtype when given) and handed back
    to DDP only once the link has carried it: the ring traffic of each of its
    messages, ``ring_bytes``, occupies the wire (buckets one after another), a
    message after the one before it has arrived, ``lat`` later; during an
    outage it waits for the link. The waiting happens on the hook's thread, so
    the backward pass goes on computing the next buckets meanwhile.
    ``idle_s`` adds up, per step, how long the last bucket took from its
    hand-over (the end of the backward pass; on a GPU, once its gradient
    kernels are done) until DDP got it back: the time the training thread
    waited for the link.
    """

    def __init__(
        self,
        spec: LinkSpec,
        world: int,
        clock: Clock = SYSTEM_CLOCK,
        all_reduce: Callable[[Tensor], torch.futures.Future] = _gloo_all_reduce,
        compress: torch.dtype | None = None,
        reduce: Callable[[Any], tuple[torch.futures.Future, list[int]]] | None = None,
    ) -> None:
        self.spec, self.world, self.clock, self.all_reduce = spec, world, clock, all_reduce
        self.compress = compress  # the dtype buckets are all-reduced in (bf16_compress_hook's), None: as they are
        self.reduce = reduce
        self.wire = Wire(spec, clock)
        self.bytes_sent = 0.0
        self.buckets = 0  # buckets all-reduced
        self.idle_s = 0.0
        self._computing: queue.Queue = queue.Queue()  # a GPU's buckets whose gradients are still being computed
        self._jobs: queue.Queue = queue.Queue()  # buckets waiting for the wire
        self._landing: queue.Queue = queue.Queue()  # buckets on their way (the latency overlaps the next)
        threading.Thread(target=self._stamp_computed, name="raylocal-ddp-gradients", daemon=True).start()
        threading.Thread(target=self._send, name="raylocal-ddp-wire", daemon=True).start()
        threading.Thread(target=self._land, name="raylocal-ddp-arrivals", daemon=True).start()

    def __call__(self, bucket: Any) -> torch.futures.Future:
        tensor = bucket.buffer()
        self.buckets += 1
        if self.reduce is not None:  # started on the wire's thread, one bucket after another
            reduced, messages, wire = bucket, [], tensor
        else:
            wire = tensor.to(self.compress) if self.compress is not None else tensor
            wire.div_(self.world)
            reduced, messages = self.all_reduce(wire), [wire.numel() * wire.element_size()]
        # a CUDA future must name its device, or DDP cannot wait on it under NCCL
        done: torch.futures.Future = torch.futures.Future(devices=[tensor.device] if tensor.is_cuda else None)
        # the last bucket of a step is handed over when the backward pass has finished
        job = ((wire, tensor), messages, reduced, done, bucket.is_last(), self.clock.now())
        computing = queued_work(tensor)  # on a GPU the backward pass is only queued then
        if computing is None:
            self._jobs.put(job)
        else:
            self._computing.put((job, computing))
        return done

    def _stamp_computed(self) -> None:
        """On a GPU: a bucket goes to the wire, stamped, once its gradients are
        computed (in a thread of its own, so that a bucket that waits for the wire
        behind another is still stamped when its gradients were done)."""
        while True:
            (*job, submitted), computing = self._computing.get()
            computing.synchronize()
            self._jobs.put((*job, max(submitted, self.clock.now())))

    def _send(self) -> None:
        while True:
            job = self._jobs.get()
            tensors, messages, reduced, done, last, submitted = job
            try:
                if self.reduce is not None:  # this bucket's collectives, all done before the next bucket's
                    reduced, messages = self.reduce(reduced)
                    reduced.wait()
                    job = (tensors, messages, reduced, done, last, submitted)
                arrival = submitted
                for message in messages:  # each after the one before it is back
                    nbytes = ring_bytes(message, self.world)
                    arrival = self.wire.deliver(int(nbytes), at=arrival)
                    self.bytes_sent += nbytes
                self._landing.put((arrival, job))
            except BaseException as e:  # DDP raises it in the training thread
                done.set_exception(e)

    def _land(self) -> None:
        while True:
            arrival, ((wire, tensor), _, reduced, done, last, submitted) = self._landing.get()
            try:
                self.clock.sleep_until(arrival)
                value = reduced.wait()
                if wire is not tensor:  # decompressed into the bucket DDP reads
                    value = tensor.copy_(value)
                if last:  # from the end of the backward pass until now, DDP waited for the link
                    self.idle_s += max(self.clock.now() - submitted, 0.0)
                done.set_result(value)
            except BaseException as e:
                done.set_exception(e)


def linked_all_reduce_hook(state, bucket):  # noqa: ANN001, ANN201
    """The function DDP registers (``state`` is the ``LinkedAllReduce``). DDP
    checks a hook's annotations against its own types and reads its
    ``__name__``: a plain function without annotations passes both."""
    return state(bucket)


def carry_first_broadcast(module: nn.Module, wire: Wire, rank: int, world: int, clock: Clock = SYSTEM_CLOCK) -> int:
    """DDP's wrap broadcasts rank 0's parameters and buffers to the other ranks.
    Over a real link gloo holds the sender until its bytes have left and the
    others until they have arrived, so on an emulated link every rank's wire
    carries them here, inside the wrap (a chained broadcast: each rank's wire
    once). Returns the bytes broadcast."""
    nbytes = tensor_bytes([*module.parameters(), *module.buffers()])
    if world > 1:
        arrival = wire.deliver(nbytes)  # returns once the last byte has left
        if rank != 0:
            clock.sleep_until(arrival)
    return nbytes


def average_parameters(params: list[Tensor], all_reduce_sum: Callable[[Tensor], None], world: int) -> int:
    """Replace each worker's parameters by the mean over the workers (one
    flattened all-reduce); returns the bytes reduced."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    all_reduce_sum(flat)
    flat /= world
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return flat.numel() * flat.element_size()


def apply_round(params: list[Tensor], at_round: Tensor, mean_at_round: Tensor) -> None:
    """An overlapped local-SGD round, one step late: each parameter moves by the
    mean of the workers' weights at the round minus its own weights then, so the
    step trained meanwhile is kept (both flat, in ``params``' order)."""
    delta = mean_at_round - at_round
    offset = 0
    with torch.no_grad():
        for p in params:
            p.add_(delta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


class OverlappedRound:
    """One local-SGD round that runs while the next step trains: the all-reduce
    of a copy of the weights is started at once; a thread waits for it and for
    the link to carry its ring bytes; ``apply`` waits (idle) only for what is
    left of that, then applies the round (``apply_round``)."""

    def __init__(self, params: list[Tensor], world: int, wire: Wire | None) -> None:
        import torch.distributed as dist

        self.params, self.world = params, world
        self.at_round = torch.cat([p.detach().reshape(-1) for p in params])
        self.mean = self.at_round.clone()
        self.work = dist.all_reduce(self.mean, async_op=True) if world > 1 else None
        self.nbytes = ring_bytes(self.mean.numel() * self.mean.element_size(), world)
        self.landed = threading.Event()
        self.error: BaseException | None = None
        threading.Thread(target=self._carry, args=(wire,), name="raylocal-local-sgd", daemon=True).start()

    def _carry(self, wire: Wire | None) -> None:
        try:
            # done on the device, not only queued (NCCL's wait() returns at once); beside the
            # training thread's kernels, which a device-wide wait would add to the round
            while self.work is not None and not self.work.is_completed():
                time.sleep(0.001)
            if self.work is not None:
                self.work.wait()  # (done: raises the collective's error, if any)
            if wire is not None:
                SYSTEM_CLOCK.sleep_until(wire.deliver(int(self.nbytes)))
        except BaseException as e:  # raised by apply, in the training thread
            self.error = e
        self.landed.set()

    def apply(self) -> float:
        """Apply the round; returns the seconds the training thread waited for it."""
        start = time.perf_counter()
        self.landed.wait()
        if self.error is not None:
            raise self.error
        apply_round(self.params, self.at_round, self.mean / self.world)
        return time.perf_counter() - start


class OuterNesterov:
    """DiLoCo's outer step: the change of the averaged parameters since the last
    round is a pseudo-gradient for SGD with Nesterov momentum on a global copy."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float = 0.9) -> None:
        self.anchor = [p.detach().clone().requires_grad_(True) for p in params]
        self.optimizer = torch.optim.SGD(self.anchor, lr=lr, momentum=momentum, nesterov=True)

    def step(self, averaged: list[Tensor]) -> None:
        for a, p in zip(self.anchor, averaged):
            a.grad = a.detach() - p.detach()
        self.optimizer.step()
        with torch.no_grad():
            for a, p in zip(self.anchor, averaged):
                p.copy_(a)


class LossRecord:
    """A worker's losses of the steps it took (a skipped step's left out): each
    epoch's mean, and the run's curve, a point (the mean) every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.epoch: list[float] = []
        self.window: list[float] = []
        self.curve: list[dict[str, float]] = []

    def add(self, loss: float, step: int) -> None:
        """The loss of step ``step`` (counted from 1)."""
        self.epoch.append(loss)
        self.window.append(loss)
        if len(self.window) == self.every:
            self.curve.append({"step": step, "loss": sum(self.window) / self.every})
            self.window.clear()

    def end_epoch(self) -> float:
        """The epoch's mean loss (NaN when every step was skipped)."""
        mean = sum(self.epoch) / len(self.epoch) if self.epoch else math.nan
        self.epoch.clear()
        return mean


class StepTimeline:
    """When each of a worker's first ``kept`` steps began, when its update ended
    (under DDP, once the step's all-reduce had landed) and when it was done with the
    step (after the stop-flag meeting, where the workers meet every step: DDP within
    a time budget), on the host's wall clock, which workers in other network
    namespaces of one host share: how far apart the workers' steps run."""

    COLUMNS = ("began", "updated", "done")

    def __init__(self, kept: int = TIMELINE_STEPS, clock: Callable[[], float] = time.time) -> None:
        self.kept, self.clock = kept, clock
        self.rows: list[list[float]] = []
        self._keeping = False  # whether the step under way has a row

    def began(self) -> None:
        self._keeping = len(self.rows) < self.kept
        if self._keeping:
            self.rows.append([self.clock(), math.nan, math.nan])

    def updated(self) -> None:
        self._stamp(1)

    def done(self) -> None:
        self._stamp(2)

    def _stamp(self, column: int) -> None:
        if self._keeping:
            self.rows[-1][column] = self.clock()


class BudgetForecast:
    """How local SGD stops within a time budget without meeting every step (DDP
    meets every step anyway): at each round's meeting the workers agree on their
    longest time so far and their slowest step over the period since the last
    meeting, and from those each forecasts the same last step. Before the first
    meeting there is no forecast: the workers meet every step to agree on a stop flag."""

    def __init__(self, budget: float, started: float) -> None:
        self.budget, self.started = budget, started
        self.period_began, self.period_step = started, 0
        self.last_step: int | None = None

    def reading(self, now: float, step: int) -> list[float]:
        """This worker's time so far and its seconds per step since the last meeting."""
        per_step = (now - self.period_began) / max(step - self.period_step, 1)
        self.period_began, self.period_step = now, step
        return [now - self.started, per_step]

    def forecast(self, elapsed: float, per_step: float, step: int) -> None:
        """The last step, from the workers' maxima of ``reading``: the first that the
        slowest clock ends past the budget (as a stop flag's first step past it)."""
        self.last_step = step + max(math.ceil((self.budget - elapsed) / max(per_step, 1e-9)), 0)


def gathered_objects(value: Any, world: int) -> list[Any]:
    """Every worker's ``value`` (anything picklable), by rank."""
    import torch.distributed as dist

    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def reducer_timing(model: nn.Module) -> list[float]:
    """A DDP-wrapped ``model``'s reducer's own timing, mean seconds per timed step (``REDUCER_FIGURES``): its
    forward, then until the backward pass's last gradient was ready, its all-reduce from
    its first bucket's start to its last one's end, and of that what came after the
    backward pass had ended (the wait it left exposed). Read with a prototype torch API,
    which times real links and emulated ones alike; -1 each where there is none (local
    SGD, one worker, or a torch without it)."""
    names = ("forward_compute", "backward_compute", "backward_comm", "backward_compute_comm_overlap")
    try:
        data = model._get_ddp_logging_data()
        forward, backward, comm, overlap = (data[f"avg_{name}_time"] / 1e9 for name in names)  # (nanoseconds)
    except (AttributeError, KeyError, RuntimeError):
        return [-1.0] * len(REDUCER_FIGURES)
    return [forward, backward, comm, max(comm - overlap, 0.0)]


class DataParallelWorker:
    """One Ray Train worker of a DDP or local-SGD run (``train_loop`` runs it)."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.config = config = RaylocalConfig.model_validate_json(loop_config["config"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(loop_config["threads"])
        check_torch_sees_gpus(ray.get_gpu_ids())
        self.device = ray.train.torch.get_device()
        images = training_images(loop_config["images"])
        self.glow = build_glow(config, tuple(images.shape[1:])).to(self.device)
        if loop_config.get("state"):
            self.glow.load_state_dict(loop_config["state"])
        else:
            noise = torch.Generator().manual_seed(config.schedule.seed + 1)
            x0 = preprocess(images[: config.schedule.init_batch_size].to(self.device), config.model.n_bits, noise)
            initialize([self.glow.whole()], x0)  # identical on every worker: same data, same seed
        self.link = LinkSpec.parse(config.links.link, 0, config.schedule.seed)
        self.hook: LinkedAllReduce | None = None
        self.start_bytes = 0  # DDP's first broadcast of the model, when a link carries it
        self.powersgd: PowerSGDReduce | None = None  # its state, to forget after a skipped step
        self.outer: OuterNesterov | None = None
        began = time.time()
        self._wrap(config)
        self.wrapped = (began, time.time())  # DDP's wrap, its first broadcast in it, on the host's one clock
        opt_cls = torch.optim.Adamax if config.schedule.optimizer == "adamax" else torch.optim.Adam
        self.lr = loop_config["lr"]
        self.optimizer = opt_cls(self.model.parameters(), lr=self.lr)
        self.per_worker = max(config.schedule.batch_size // self.world, 1)
        self.stream = BatchStream(images, self.per_worker, config.schedule.seed)
        self.noise = torch.Generator().manual_seed(config.schedule.seed + 1 + self.rank)
        self.steps_per_epoch = len(self.stream) // self.world
        self.step = 0
        # a rival's LR is --lr; as an async run's fine-tune, it is --finetune-lr's
        lr_flag = "--lr" if config.schedule.name == "data-parallel" else "--finetune-lr"
        self.guard = NonFiniteGuard(config.schedule.grad_clip, lr_flag=lr_flag)
        self.idle_s = 0.0  # waiting for the link: local-SGD rounds (DDP's is the hook's)
        # the idle seconds taken apart: at sync points, waiting for the other workers (the stop flag
        # each step, the meeting before each round), and in the rounds' averaging after their meeting
        self.sync_s = 0.0
        self.rounds_s = 0.0
        self.bytes_averaged = 0.0
        self.round: OverlappedRound | None = None  # an overlapped round on its way
        self.budget_clock: BudgetForecast | None = None  # local SGD's last step, forecast at its meetings
        self.straggler = Straggler(parse_faults(config.run.inject or ""), self.rank)
        self.losses = LossRecord(loop_config.get("loss_every", LOSS_EVERY))
        self.timeline = StepTimeline()

    def _wrap(self, config: RaylocalConfig) -> None:
        """The model this worker trains (``self.model``): its own, averaged now and
        then (local SGD), or wrapped in DDP, its all-reduce over the link."""
        import ray.train.torch

        if config.cluster.average_every:
            self.wire = Wire(self.link)
            self.model: nn.Module = NLL(self.glow)
            if config.cluster.outer_lr:
                self.outer = OuterNesterov(list(self.model.parameters()), config.cluster.outer_lr)
            return
        # Glow's buffers (the 1x1 convolutions' permutations and masks, ActNorm's flag) never
        # change after the identical initialisation: DDP's broadcast of them before every
        # forward (8 kB, off the emulated wire) is traffic a careful user turns off
        cap = {"bucket_cap_mb": config.cluster.bucket_cap_mb} if config.cluster.bucket_cap_mb else {}
        options = {"broadcast_buffers": False} | cap
        self.model = ray.train.torch.prepare_model(NLL(self.glow), parallel_strategy_kwargs=options)
        if hasattr(self.model, "_set_ddp_runtime_logging_sample_rate") and self.device.type == "cpu":
            # its reducer's own timers, every step (on a GPU a timed step waits for its CUDA events:
            # there DDP's default, the first 10 steps and every 100th, stays)
            self.model._set_ddp_runtime_logging_sample_rate(1)
        self._register_hook(config)
        if self.hook is not None:
            self.start_bytes = carry_first_broadcast(self.glow, self.hook.wire, self.rank, self.world)

    def _register_hook(self, config: RaylocalConfig) -> None:
        """DDP's communication: over the emulated link (``LinkedAllReduce``, compressed
        or not), else torch's own bf16 hook when compressing, else DDP's own."""
        if not hasattr(self.model, "register_comm_hook"):  # (one worker: not wrapped)
            return
        compress = torch.bfloat16 if config.cluster.ddp_compression == "bf16" else None
        powersgd = None
        if config.cluster.ddp_compression == "powersgd":
            powersgd = PowerSGDReduce(config.cluster.powersgd_rank, config.cluster.powersgd_start)
        self.powersgd = powersgd
        if not self.link.ideal or powersgd is not None:  # PowerSGD's buckets one at a time, also on an ideal link
            self.hook = LinkedAllReduce(self.link, self.world, compress=compress, reduce=powersgd)
            self.model.register_comm_hook(self.hook, linked_all_reduce_hook)
        elif compress is not None:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self.model.register_comm_hook(None, default_hooks.bf16_compress_hook)

    def _all_reduce(self, tensor: Tensor, op: str = "sum") -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    def average(self) -> None:
        """A local-SGD round: the workers meet, then average their parameters over the link."""
        start = time.perf_counter()
        clock = self.budget_clock
        (elapsed, per_step), met = self._agree(clock.reading(start, self.step) if clock else [0.0, 0.0])
        if clock is not None:  # what is left after the meeting is the averaging itself
            clock.forecast(elapsed, per_step, self.step)
        params = list(self.model.parameters())
        nbytes = ring_bytes(average_parameters(params, self._all_reduce, self.world), self.world)
        wait_for(self.device)  # NCCL's all-reduce returns once queued: the wire starts when it is done
        if not self.link.ideal:
            SYSTEM_CLOCK.sleep_until(self.wire.deliver(int(nbytes)))
        if self.outer is not None:
            self.outer.step(params)
        self.bytes_averaged += nbytes
        took = time.perf_counter() - start
        self.rounds_s += took - met
        self.idle_s += took

    def start_round(self) -> None:
        """An overlapped local-SGD round (``--average-overlap``), applied after the next step."""
        params = list(self.model.parameters())
        self.round = OverlappedRound(params, self.world, None if self.link.ideal else self.wire)
        self.bytes_averaged += self.round.nbytes

    def land_round(self) -> None:
        if self.round is not None:
            self.idle_s += self.round.apply()
            self.round = None

    def control(self, values: list[float]) -> Tensor:
        """A small tensor the workers all-reduce to agree (to stop, on totals): on
        the worker's device, since NCCL, Ray Train's backend on GPUs, reduces
        only CUDA tensors."""
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def out_of_time(self, started: float, budget: float | None) -> bool:
        """Every worker stops at the same step: the first one out of time decides
        (local SGD, once its rounds have forecast it: at the forecast step, with no meeting)."""
        if not budget:
            return False
        if self.budget_clock is not None and self.budget_clock.last_step is not None:
            return self.step >= self.budget_clock.last_step
        flag, waited = self._agree([1.0 if time.perf_counter() - started >= budget else 0.0])
        self.idle_s += waited
        return bool(flag[0])

    def _agree(self, values: list[float]) -> tuple[list[float], float]:
        """The workers' maxima of ``values``, and the seconds this worker waited for
        them: a sync point, where a fast worker waits for a slow one (counted in ``sync_s``)."""
        wait_for(self.device)  # the step's own kernels are compute, not the wait below
        asked = time.perf_counter()
        agreed = self.control(values)
        self._all_reduce(agreed, "max")
        maxima = agreed.tolist()  # (on a GPU: waits for the all-reduce)
        waited = time.perf_counter() - asked
        self.sync_s += waited
        return maxima, waited

    def straggle(self, began: float, link_waited: float) -> None:
        """An emulated straggler's wait after a step that began at ``began``: it is
        slower at computing, not at sending (the hook's wait is left out), and on a
        GPU its compute ends when the optimizer's kernels have run (a sync only then)."""
        if self.straggler.factor > 1.0:
            wait_for(self.device)
        self.straggler.after(time.perf_counter() - began - (self.link_wait() - link_waited))

    def link_wait(self) -> float:
        """Seconds DDP's backward passes waited for the link so far."""
        return self.hook.idle_s if self.hook is not None else 0.0

    def train(self, loop_config: dict[str, Any]) -> None:
        import ray.train

        config, every, overlap = self.config, self.config.cluster.average_every, self.config.cluster.average_overlap
        total = loop_config.get("lr_total") or self.steps_per_epoch * loop_config["epochs"]  # of the LR decay
        history: list[dict[str, Any]] = []
        started, self.began_at = time.perf_counter(), time.time()  # the wall clock: comparable across workers
        budget = loop_config.get("time_budget")
        if budget and every and not overlap:  # (an overlapped round never meets)
            self.budget_clock = BudgetForecast(budget, started)
        stop = False
        for epoch in range(loop_config["epochs"]):
            epoch_start, epoch_steps = time.perf_counter(), 0
            for i in range(len(self.stream)):
                batch = self.stream.next()
                if i % self.world != self.rank or i // self.world >= self.steps_per_epoch:
                    continue  # every K-th batch is this worker's
                position = loop_config.get("lr_clock", 0) + self.step
                lr = scheduled_lr(
                    self.lr, self.step, config.schedule.warmup_steps, total, config.schedule.lr_schedule, position
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                began, waited = time.perf_counter(), self.link_wait()
                self.timeline.began()
                loss = self.model(preprocess(to_device(batch, self.device), config.model.n_bits, self.noise))
                stepped = self.guard.update(self.model, self.optimizer, loss, self.step)
                self.timeline.updated()
                if not stepped and self.powersgd:
                    self.powersgd.forget()
                self.straggle(began, waited)
                self.step += 1
                if stepped:
                    self.losses.add(self.guard.last_loss, self.step)
                epoch_steps += 1
                self.land_round()  # an overlapped round started one step ago
                if every and self.step % every == 0 and overlap:
                    self.start_round()
                elif every and self.step % every == 0:
                    self.average()
                stop = self.out_of_time(started, loop_config.get("time_budget"))
                self.timeline.done()
                if stop:
                    break
            seconds = time.perf_counter() - epoch_start
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": self.losses.end_epoch(),  # rank 0's, over the epoch's steps
                    "epoch_time": seconds,
                    "images_per_s": epoch_steps * self.per_worker * self.world / max(seconds, 1e-9),
                }
            )
            if stop or epoch == loop_config["epochs"] - 1:
                break
            ray.train.report(history[-1])
        self.end_rounds()
        self._finish(history, time.perf_counter() - started, loop_config["mailbox"])

    def end_rounds(self) -> None:
        """Local SGD's last round, at the end of the budget: the model it hands on is
        the workers' average, not rank 0's own up to H - 1 steps past the last one
        (or a round still on its way)."""
        every = self.config.cluster.average_every
        self.land_round()
        if every and (self.step % every or self.config.cluster.average_overlap):
            self.average()

    def _workers(self, timing: list[float], node: str) -> list[dict[str, Any]]:
        """Every worker's reducer ``timing`` (``REDUCER_FIGURES``, -1: not timed), its steps'
        times (``StepTimeline``, only the rows it kept), when its wrap began and ended, and its
        Ray ``node``, by rank."""
        mine = (timing, self.timeline.rows, list(self.wrapped), node)
        return [
            {name: (v if v >= 0 else None) for name, v in zip(REDUCER_FIGURES, figures)}
            | {"rank": rank, "steps": rows, "wrapped": wrapped, "node_id": node}
            for rank, (figures, rows, wrapped, node) in enumerate(gathered_objects(mine, self.world))
        ]

    def _finish(self, history: list[dict[str, Any]], seconds: float, mailbox: Mailbox) -> None:
        import ray.train

        idle = self.idle_s + (self.hook.idle_s if self.hook else 0.0)
        timing, node = reducer_timing(self.model), ray.get_runtime_context().get_node_id()
        comm, exposed = timing[2:]
        worst = self.control(  # (the maxima of the negated: the least worker's)
            [idle, peak_rss_mb(), self.straggler.waited_s, self.began_at, -self.began_at, self.sync_s, self.rounds_s]
            + [comm, exposed, -exposed]
        )
        self._all_reduce(worst, "max")
        sent = self.bytes_averaged + (self.hook.bytes_sent if self.hook else 0.0)
        stats = {
            "steps": self.step,
            "images": self.step * self.per_worker * self.world,
            "seconds": seconds,
            "bytes_per_step": sent / max(self.step, 1),  # what each worker put on its link
            "start_bytes": self.start_bytes,  # once, before the first step (DDP's broadcast of the model)
            "buffers_broadcast_each_step": bool(getattr(self.model, "broadcast_buffers", False)),
            "buckets_per_step": (self.hook.buckets / max(self.step, 1)) if self.hook else None,
            "skipped_batches": self.guard.skipped,  # rank 0's (under DDP every worker skips the same)
            "loss_curve": self.losses.curve,  # rank 0's: where a run's loss spiked, if it did
            "idle_s": float(worst[0]),  # the most idle worker
            "sync_s": float(worst[5]),  # the most at sync points, waiting for the others
            "rounds_s": float(worst[6]),  # the most in local-SGD rounds' averaging, after their meeting
            # DDP's reducer's own timing, the most of any worker (None: not timed)
            "allreduce_s": float(worst[7]) if worst[7] >= 0 else None,
            "allreduce_exposed_s": float(worst[8]) if worst[8] >= 0 else None,
            # the least exposed worker's: the one whose bucket came last waits for the link alone, while
            # the other's timer also holds its wait for that bucket
            "allreduce_exposed_least_s": float(-worst[9]) if worst[8] >= 0 else None,
            "peak_rss_mb": float(worst[1]),  # the largest worker
            "straggled_s": float(worst[2]),  # what a straggler (--inject straggle) added to its compute
            "start_spread_s": float(worst[3] + worst[4]),  # from the first worker's first step to the last's
            "workers": self._workers(timing, node),  # each one's reducer timing, steps' times and node, by rank
            "where": {
                "node_id": node,
                "pid": os.getpid(),
                "device": str(self.device),
            },
        }
        if self.rank == 0:  # the weights go back in memory: as bytes, which outlive this worker (a reference
            # would die with it) and which the mailbox holds without importing torch
            weights = io.BytesIO()
            torch.save({k: v.cpu() for k, v in self.glow.state_dict().items()}, weights)
            mailbox.post({"weights": weights.getvalue(), "history": history, "stats": stats})
        ray.train.report(history[-1])


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    DataParallelWorker(loop_config).train(loop_config)


def train_ddp(
    config: RaylocalConfig,
    images: Tensor,
    workers: WorkerBundles,
    epochs: int,
    lr: float,
    storage: Path,
    state: dict[str, Tensor] | None = None,
    lr_clock: int = 0,
    lr_total: int = 0,
    time_budget: float | None = None,
    stats: dict[str, Any] | None = None,
    loss_every: int = LOSS_EVERY,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Train end to end on its data-parallel ``workers`` (DDP, or local SGD
    with ``config.average_every``, over ``config.link``); returns (weights,
    per-epoch metrics) and fills ``stats`` with the run's totals when given.

    ``lr_clock`` and ``lr_total`` place this phase on a run-wide LR decay
    (``cosine-run``): the first update is at ``lr_clock`` of ``lr_total`` steps.
    With ``time_budget`` every worker stops at the first step past it; rank 0's
    loss curve (``stats["loss_curve"]``) has a point every ``loss_every`` steps."""
    record = run_on_ray_train(
        train_loop,
        {
            "config": config.model_dump_json(),
            "images": node_images(config, images) or images,
            "epochs": epochs,
            "lr": lr,
            "threads": workers.threads,
            "state": state,
            "lr_clock": lr_clock,
            "lr_total": lr_total,
            "time_budget": time_budget,
            "loss_every": loss_every,
        },
        what="DDP training", name="ddp", storage=storage, workers=workers.count,
        resources=workers.worker, use_gpu=workers.use_gpu,
    )  # fmt: skip
    if stats is not None:
        stats.update(record["stats"])
    weights = torch.load(io.BytesIO(record["weights"]), weights_only=True)  # rank 0's, in memory
    return weights, record["history"]
