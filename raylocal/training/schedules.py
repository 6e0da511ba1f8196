"""Single-process schedules: e2e, sequential, alternating, simultaneous, then fine-tune.

Every schedule is a plan of epochs, each naming the parts that train in it;
one function (``train_batch``) runs a batch through the parts for any plan:
active parts take a step with ``PartTrainer.step``, parts upstream of the last
active one run forward without autograd, parts downstream of it are not run.

- e2e:          one part (the whole model), every epoch
- sequential:   part 1 for ``epochs`` epochs, then part 2 on part 1's frozen output, ...
- alternating:  epoch e trains part e mod K (the reference method); with
                ``alternate_every=N``, batch b of the parts phase trains part (b // N) mod K
- simultaneous: every part steps on every batch, each on its upstream's
                detached output for that batch (the single-process twin of async)
then ``finetune_epochs`` of end-to-end training of the assembled model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raylocal.core.checkpoint import load_checkpoint, save_checkpoint
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import BatchStream, ImageData
from raylocal.core.faults import apply_finetune_faults, parse_faults
from raylocal.errors import CheckpointError
from raylocal.model.glow import Glow, Part
from raylocal.model.objectives import preprocess, to_device, wait_for
from raylocal.model.parts import PartSpec, boundary_steps, measured_costs, resolve_part_spec
from raylocal.training.records import RunRecords
from raylocal.training.trainer import (
    WIRE_DTYPES,
    LRClock,
    PartTrainer,
    StepResult,
    UpdateMeter,
    build_glow,
    initialize,
    over_the_wire,
    resolve_device,
)


def epoch_plan(schedule: str, n_parts: int, epochs: int, alternate_every: int = 0) -> list[tuple[int, ...]]:
    """Which parts train in each epoch of the parts phase. Alternating every N
    batches involves every part in every epoch (``BatchPlan.active_at`` picks
    one per batch)."""
    if schedule in ("e2e", "simultaneous", "async") or (schedule == "alternating" and alternate_every):
        return [tuple(range(n_parts))] * epochs
    if schedule == "sequential":
        return [(k,) for k in range(n_parts) for _ in range(epochs)]
    if schedule == "alternating":
        return [(e % n_parts,) for e in range(epochs)]
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass(frozen=True)
class BatchPlan:
    """Which parts train on each batch of the parts phase: those of its epoch in
    ``epochs`` (``epoch_plan``), or with ``every`` N one part per N batches in turn."""

    epochs: list[tuple[int, ...]]
    batches: int  # per epoch
    n_parts: int
    every: int = 0

    def active_at(self, epoch: int, position: int) -> tuple[int, ...]:
        """The parts that train on batch ``position`` of ``epoch`` (none in the fine-tune)."""
        if epoch >= len(self.epochs):
            return ()
        if self.every:
            return ((epoch * self.batches + position) // self.every % self.n_parts,)
        return self.epochs[epoch]

    def steps_of(self, k: int) -> int:
        """Batches of the parts phase on which part k trains."""
        return sum(k in self.active_at(e, b) for e in range(len(self.epochs)) for b in range(self.batches))


def train_batch(
    parts: list[Part],
    trainers: list[PartTrainer],
    active: tuple[int, ...],
    x: Tensor,
    part_time: list[float] | None = None,
    wire: torch.dtype = torch.float32,
) -> dict[int, StepResult]:
    """Run one batch through the parts for this epoch's active set (see module
    doc); each boundary rounds its latents as async's wire would (``wire``)."""
    results: dict[int, StepResult] = {}
    h = x
    device = x.device
    for k in range(max(active) + 1):
        t0 = time.perf_counter()
        if k:
            h = over_the_wire(h, wire)
        if k in active:
            results[k] = trainers[k].step(h)
            h = results[k].output
        else:
            with torch.no_grad():
                h, _ = parts[k](h)
        if part_time is not None:
            wait_for(device)
            part_time[k] += time.perf_counter() - t0
    return results


def part_spec_for(config: RaylocalConfig, glow: Glow, images: Tensor | None = None) -> PartSpec:
    """The run's parts. With ``balance=measure`` the automatic split is balanced on
    layer times measured on a copy of the model (so the model itself is untouched)."""
    if config.one_part():
        return PartSpec(((0, len(glow)),))
    costs = None
    parts = config.parts
    if parts.balance == "measure" and parts.part_spec is None and parts.count > 1 and images is not None:
        probe = copy.deepcopy(glow)
        x = images[: config.schedule.batch_size].to(next(glow.parameters()).device)
        x = preprocess(x, config.model.n_bits, torch.Generator().manual_seed(config.schedule.seed))
        threads = torch.get_num_threads()
        torch.set_num_threads(config.cluster.threads or threads)  # time layers as the parts will run them
        try:
            costs = measured_costs(probe, x)
        finally:
            torch.set_num_threads(threads)
    return resolve_part_spec(glow, config.parts.count, config.parts.split, config.parts.part_spec, costs)


@dataclass
class RunState:
    """Everything besides weights and optimizers that a checkpoint must restore."""

    global_step: int = 0
    elapsed: float = 0.0
    phase_time: dict[str, float] = field(default_factory=lambda: {"parts": 0.0, "finetune": 0.0})
    # CPU seconds of this process (all its threads) per phase: a measure of work that a busy host does not inflate
    phase_cpu: dict[str, float] = field(default_factory=lambda: {"parts": 0.0, "finetune": 0.0})
    part_time: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    lr_multipliers: list[float] | None = None  # what --lr-rule set, once it has

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> RunState:
        return cls(**json.loads(text))


PARTS_RESULT = "parts_result.pt"


class RelativeUpdateRule:
    """``--lr-rule relative-update``: one LR for every part moves some parts' weights
    much further, relative to their size, than others'. Each part measures its
    mean relative update ``r_k = ‖Δθ_k‖ / ‖θ_k‖`` over the second half of its
    warmup (at least 10 steps); once every part has, part k's LR is multiplied by
    ``g / r_k``, where ``g`` is the geometric mean of the ``r_k``: every part then
    moves by about the same relative amount per step, and the parts' typical LR
    is the one given. Adam's step is about the LR per weight whatever the
    gradient's scale, so what differs between parts is the size of their weights
    and how consistently their gradients point: this equalises the result."""

    def __init__(self, trainers: list[PartTrainer], warmup_steps: int) -> None:
        stop = max(warmup_steps, 20)
        self.trainers = trainers
        for t in trainers:
            t.meter = UpdateMeter(stop // 2, stop)

    def multipliers(self) -> list[float] | None:
        """The LR multipliers once every part has measured (None before)."""
        if not all(t.meter is not None and t.steps >= t.meter.stop and t.meter.count for t in self.trainers):
            return None
        rates = [max(t.meter.mean, 1e-12) for t in self.trainers]
        g = math.exp(sum(math.log(r) for r in rates) / len(rates))
        return [g / r for r in rates]

    def apply(self, multipliers: list[float]) -> None:
        for t, m in zip(self.trainers, multipliers):
            t.base_lr *= m
        self.stop_measuring()

    def stop_measuring(self) -> None:
        for t in self.trainers:
            t.meter = None


@dataclass
class PartsResult:
    """What a parts phase trained elsewhere (the Ray parts) hands to the rest of
    its run: the assembled weights, per-part stats, the evaluations made while
    it trained, and its pipeline report. It reaches the rest of the run in memory
    (or as a Ray reference); it is also saved in the run directory, for a run
    resumed after its parts phase and a restarted fine-tune worker."""

    state: dict[str, Tensor]
    wall: float
    stats: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        meta = {"wall": self.wall, "stats": self.stats, "curve": self.curve, "report": self.report}
        save_checkpoint(path, {"state": self.state, "meta": json.dumps(meta)}, kind="parts-result")

    @classmethod
    def load(cls, path: Path) -> PartsResult:
        payload = load_checkpoint(path, kind="parts-result")
        return cls(state=payload["state"], **json.loads(payload["meta"]))


class SingleProcessRun:
    """A whole run of one of the single-process schedules (see module doc)."""

    def __init__(
        self, config: RaylocalConfig, data: ImageData, records: RunRecords, spec: PartSpec | None = None,
        start_from: dict[str, Tensor] | None = None, device: str | None = None, resume: bool | None = None,
        parts_elsewhere: bool = False,
    ) -> None:  # fmt: skip
        self.config = self.recorded_config = config  # (a rival's stand-in records the rival's own config)
        self.data = data
        # What a caller found at run time, beside the config as given (which the checkpoint records):
        # the device Ray granted this process, and whether the run's checkpoint is there to continue from.
        self.device = resolve_device(device or config.cluster.device)
        self.resume = config.run.resume if resume is None else resume
        self.wire_dtype = WIRE_DTYPES[config.links.wire_dtype]  # how latents cross a boundary (as async's wire)
        self.glow = build_glow(config, data.shape).to(self.device)
        self.spec = spec or part_spec_for(config, self.glow, data.train)
        self.parts = [self.glow.part(a, b) for a, b in self.spec.bounds]
        s, e2e = config.schedule, config.schedule.name == "e2e"
        lrs = s.lr[:1] if e2e else config.part_lrs(len(self.parts))
        self.plan = epoch_plan(s.name, len(self.parts), s.epochs + (s.finetune_epochs if e2e else 0), s.alternate_every)
        self.stream = BatchStream(data.train, s.batch_size, s.seed)
        self.total_epochs = len(self.plan) + (0 if e2e else s.finetune_epochs)
        self.lr_clock = LRClock.of(config, len(self.stream), len(self.plan), self.total_epochs - len(self.plan))
        self.batches = BatchPlan(self.plan, len(self.stream), len(self.parts), s.alternate_every)
        # A run that takes over parts trained in other processes (the Ray parts, a rival) trains none here:
        # it builds no trainer, with its optimizer, for them. Their figures are then the ones taken over:
        # their LRs as configured, and the rollbacks and skipped batches they reported (its caller's to set).
        self.taken_over = {"base_lr": lrs, "rollbacks": [0] * len(self.parts), "skipped": [0] * len(self.parts)}
        self.trainers = [] if parts_elsewhere else [
            PartTrainer(p, lr, config, k, total_steps=self.lr_clock.decay(self.batches.steps_of(k)))
            for k, (p, lr) in enumerate(zip(self.parts, lrs))
        ]  # fmt: skip
        self.finetuner: PartTrainer | None = None
        self.noise = torch.Generator().manual_seed(s.seed + 1)
        self.state = RunState(part_time=[0.0] * len(self.parts))
        self.records = records  # its run directory as this process writes it, opened by its caller
        self.adopted = start_from is not None  # weights from elsewhere: a parts phase, a caller's
        if start_from is not None:
            self.glow.load_state_dict(start_from)
        self.faults = parse_faults(config.run.inject or "")
        self.lr_rule = RelativeUpdateRule(self.trainers, s.warmup_steps) if s.lr_rule != "none" else None
        self.started = False
        self.stopped: str | None = None  # why the run stopped early, once it has

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        save_checkpoint(
            self.records.checkpoint_path,
            {
                "config": self.recorded_config.model_dump_json(),
                "spec": [list(b) for b in self.spec.bounds],
                "model": self.glow.state_dict(),
                "trainers": [t.state_dict() for t in self.trainers],
                "finetuner": self.finetuner.state_dict() if self.finetuner else None,
                "stream": self.stream.state(),
                "noise": self.noise.get_state(),
                "state": self.state.to_json(),
            },
            kind="run",
        )

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, kind="run")
        if [tuple(b) for b in ckpt["spec"]] != list(self.spec.bounds):
            raise CheckpointError(f"{path}: its parts {ckpt['spec']} differ from this run's")
        try:
            self.glow.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[0]})") from None
        for trainer, state in zip(self.trainers, ckpt["trainers"]):
            trainer.load_state_dict(state)
        if ckpt["finetuner"] is not None:
            self.finetuner = self._make_finetuner()
            self.finetuner.load_state_dict(ckpt["finetuner"])
        self.stream.restore(ckpt["stream"])
        self.noise.set_state(ckpt["noise"])
        self.state = RunState.from_json(ckpt["state"])
        if self.state.lr_multipliers is not None and self.lr_rule is not None:  # in the restored base LRs
            self.lr_rule.stop_measuring()
            self.lr_rule = None

    def part_figures(self, figure: str) -> list[Any]:
        """Each part's ``base_lr``, ``rollbacks`` or ``skipped`` batches: its trainer's here, else as taken over."""
        return [getattr(t, figure) for t in self.trainers] if self.trainers else list(self.taken_over[figure])

    def _make_finetuner(self) -> PartTrainer:
        cfg = self.config
        lr = cfg.schedule.finetune_lr or min(cfg.schedule.lr)
        total = self.lr_clock.decay(self.lr_clock.finetune_batches)
        if cfg.schedule.finetune_scope == "boundary":  # only the steps at a boundary learn; the optimizer skips
            trained = set(boundary_steps(self.glow, self.spec.bounds))  # parameters that never get a gradient
            for index, layer in enumerate(self.glow.layers):
                layer.requires_grad_(index in trained)
            self.glow.prior.requires_grad_(False)
        whole = self.glow.whole()
        return PartTrainer(whole, lr, cfg, len(self.parts), total, name="the fine-tune", fed_images=True)

    # ------------------------------------------------------------ training

    def record_eval(self, epoch_float: float) -> float:
        """The model's test BPD now, on the run's curve at ``epoch_float``."""
        state = self.state
        point = {"epoch": epoch_float, "step": state.global_step, "elapsed": state.elapsed}
        return self.records.evaluation(self.records.evaluate(self.glow, self.device), state.curve, point)

    def _log_step(self, results: dict[int, StepResult], epoch: int) -> None:
        step = self.state.global_step
        trainers = {k: self.trainers[k] for k in results} if self.finetuner is None else {}
        if self.finetuner is not None:
            trainers = {len(self.parts): self.finetuner}
        for k, res in results.items():
            self.records.step(f"part{k + 1}" if k < len(self.parts) else "finetune", res, trainers[k], step)
        losses = " ".join(f"{r.loss:.3f}" for r in results.values())
        phase = "finetune" if self.finetuner is not None else f"parts {[k + 1 for k in results]}"
        self.records.progress.update(
            f"epoch {epoch + 1}/{self.total_epochs} {phase} "
            f"batch {self.stream.position}/{len(self.stream)} local bpd {losses}"
        )

    def _apply_lr_rule(self) -> None:
        """Set the per-part LRs of ``--lr-rule`` once every part has measured (once per
        run: they live on in the trainers' checkpointed base LRs)."""
        if self.lr_rule is None:
            return
        multipliers = self.lr_rule.multipliers()
        if multipliers is None:
            return
        self.lr_rule.apply(multipliers)
        self.lr_rule = None
        self.state.lr_multipliers = multipliers
        lrs = ", ".join(f"{t.base_lr:.3g}" for t in self.trainers)
        self.records.progress.update(f"lr rule {self.config.schedule.lr_rule}: part LRs {lrs}", force=True)

    def _report_events(self, results: dict[int, StepResult]) -> None:
        for k, res in results.items():
            if res.event:
                t = self.trainers[k] if k < len(self.parts) else self.finetuner
                name = f"part {k + 1}" if k < len(self.parts) else "fine-tune"
                self.records.progress.update(
                    f"ROLLBACK {name} at step {t.steps}: {res.event}; "
                    f"lr -> {t.events[-1].new_lr:.3g} ({t.rollbacks} rollbacks)",
                    force=True,
                )

    def train_epochs(self, until: int) -> None:
        """Train what is left of the epochs before ``until`` (none once the run has stopped early)."""
        self.start()
        while self.stream.epoch < until and self.stopped is None:
            self.stopped = self._epoch(self.stream.epoch)

    def start(self) -> None:
        """Continue from the run's checkpoint, or initialise the model from data
        (unless its weights came from elsewhere); once, before the first epoch."""
        if self.started:
            return
        self.started = True
        cfg = self.config
        if self.resume:
            self.restore(self.records.checkpoint_path)
            self.records.progress.update(
                f"resumed {self.records.dir} at epoch {self.stream.epoch + 1}, batch {self.stream.position}",
                force=True,
            )
        else:
            if not self.adopted:
                x0 = self.data.train[: cfg.schedule.init_batch_size].to(self.device)
                initialize(self.parts, preprocess(x0, cfg.model.n_bits, self.noise), self.wire_dtype)
        self._last_step: dict[int, int] = {}  # global step at which each part last trained, in this process

    def _epoch(self, epoch: int) -> str | None:
        """One epoch (what is left of it, after a resume): its batches, then its
        evaluation, log and checkpoint. Returns why the run stopped early, if it did."""
        finetune = epoch >= len(self.plan)
        if finetune and self.finetuner is None:
            self.finetuner = self._make_finetuner()
        losses: dict[int, list[float]] = {}  # per trainer that trained in this epoch
        t_epoch = time.perf_counter()
        stopped = None
        while self.stream.position < len(self.stream) and stopped is None:
            results = self._batch(epoch, finetune)
            for k, res in results.items():
                if not res.skipped:  # an outlier's loss (up to 1e11) would be the epoch's mean
                    losses.setdefault(k, []).append(res.loss)
            stopped = self._after_batch(epoch, results)
        self._end_epoch(epoch, finetune, losses, t_epoch)
        if stopped is None:
            self.stream.restore({"epoch": epoch + 1, "position": 0})
        self.checkpoint()
        return stopped

    def _batch(self, epoch: int, finetune: bool) -> dict[int, StepResult]:
        """Train the parts active on the next batch (or the whole model, in the fine-tune)."""
        cfg = self.config
        active = self.batches.active_at(epoch, self.stream.position)
        for k in active:
            last = self._last_step.get(k)  # None: first step of this part in this process
            if k > 0 and (last is None or self.state.global_step - last > len(self.stream)):
                # Its inputs changed while it waited an epoch. (After shorter
                # waits the trainer's own recheck tells input drift from harm.)
                self.trainers[k].guard.reset()
            self._last_step[k] = self.state.global_step
        t0, cpu0 = time.perf_counter(), time.process_time()
        x = preprocess(to_device(self.stream.next(), self.device), cfg.model.n_bits, self.noise)
        for t in [self.finetuner] if finetune else self.trainers:
            t.clock = self.lr_clock.position(self.state.global_step)
        if finetune:
            results = {len(self.parts): self.finetuner.step(x)}
            apply_finetune_faults(self.faults, len(self.parts), self.finetuner.steps, self.records.dir)
        else:
            results = train_batch(self.parts, self.trainers, active, x, self.state.part_time, self.wire_dtype)
            self._apply_lr_rule()
        self.state.global_step += 1
        dt = time.perf_counter() - t0
        self.state.elapsed += dt
        self.state.phase_time["finetune" if finetune else "parts"] += dt
        self.state.phase_cpu["finetune" if finetune else "parts"] += time.process_time() - cpu0
        return results

    def _after_batch(self, epoch: int, results: dict[int, StepResult]) -> str | None:
        """Report, log, evaluate and checkpoint as configured; why the run must stop now, if it must."""
        cfg, step = self.config, self.state.global_step
        self._report_events(results)
        if step % cfg.run.log_every == 0:
            self._log_step(results, epoch)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0:
            self.record_eval(epoch + self.stream.position / len(self.stream))
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
            self.checkpoint()
        if cfg.run.time_budget and self.state.elapsed >= cfg.run.time_budget:
            return f"time budget of {cfg.run.time_budget:g}s reached"
        return None

    def _end_epoch(self, epoch: int, finetune: bool, losses: dict[int, list[float]], t_epoch: float) -> None:
        """Validate the trainers' last updates, evaluate, and record the epoch (its
        time from ``t_epoch`` to the end of the validation)."""
        trained = [] if finetune else sorted(losses)  # the parts that trained in this epoch
        for trainer in [self.finetuner] if finetune else [self.trainers[k] for k in trained]:
            problem = trainer.validate()
            if problem:
                self._report_events({trainer.index: StepResult(torch.empty(0), float("nan"), event=problem)})
        epoch_time = time.perf_counter() - t_epoch
        bpd = self.record_eval(epoch + self.stream.position / len(self.stream))
        entry = {
            "epoch": epoch + 1,
            "phase": "finetune" if finetune else "parts",
            "active": [k + 1 for k in trained],
            "test_bpd": bpd,
            "local_loss": {str(k + 1): sum(v) / len(v) for k, v in losses.items() if v},
            "epoch_time": epoch_time,
            "elapsed": self.state.elapsed,
            "rollbacks": self.part_figures("rollbacks"),
        }
        self.state.history.append(entry)
        self.records.epoch(epoch + 1, epoch_time, self.state.part_time)
        self.records.samples(self.glow, epoch + 1)
        shape = "x".join(map(str, self.data.shape))
        self.records.progress.update(
            f"epoch {epoch + 1}/{self.total_epochs} ({entry['phase']}) test bpd {bpd:.4f} [{shape}] "
            f"epoch time {epoch_time:.1f}s",
            force=True,
        )

    def finish(self) -> dict[str, Any]:
        """The run's end: its checkpoint, last evaluation, samples and summary."""
        self.start()
        if not self.records.checkpoint_path.is_file() or self.adopted:
            self.checkpoint()  # a run with no epoch of its own still leaves its weights
        final = self.state.curve[-1]["test_bpd"] if self.state.curve else self.records.evaluate(self.glow, self.device)
        samples = self.records.samples(self.glow, self.state.global_step)
        summary = run_summary(self, final, self.stopped, samples)
        self.records.close()
        return summary


def run_summary(run: SingleProcessRun, final: float, stopped: str | None, samples: Path | None) -> dict[str, Any]:
    """What a run's summary.json holds: its result, times, rollbacks, history and where its files are."""
    finetuner = [run.finetuner] if run.finetuner else []
    trainers = run.trainers + finetuner
    return {
        "schedule": run.config.schedule.name,
        "dataset": run.data.name,
        "image_shape": list(run.data.shape),
        "test_bpd": final,
        "eval_cap": run.config.schedule.eval_cap,
        "parts": run.spec.canonical(run.glow),
        "n_parts": len(run.parts),
        "epochs": run.config.schedule.epochs,
        "finetune_epochs": run.config.schedule.finetune_epochs,
        "steps": run.state.global_step,
        "wall_time": run.state.elapsed,
        "phase_time": run.state.phase_time,
        "phase_cpu": run.state.phase_cpu,
        "part_time": run.state.part_time,
        "rollbacks": run.part_figures("rollbacks") + [t.rollbacks for t in finetuner],
        "skipped_batches": run.part_figures("skipped") + [t.skipped for t in finetuner],
        "rollback_events": [
            {"part": t.index + 1, "step": e.step, "reason": e.reason, "new_lr": e.new_lr}
            for t in trainers
            for e in t.events
        ],
        "lr_multipliers": run.state.lr_multipliers,
        "part_lrs": run.part_figures("base_lr"),
        "images_per_s": run.state.global_step * run.config.schedule.batch_size / max(run.state.elapsed, 1e-9),
        "stopped_early": stopped,
        "history": run.state.history,
        "curve": run.state.curve,
    } | run.records.paths(samples)
