"""The one training step every schedule shares, with its stability guard.

``PartTrainer`` owns one part's optimizer, LR schedule (per-part base LR with
linear warmup) and guard. ``step(x)`` takes a (detached) input batch, trains
the part on its local objective and returns the detached output for the next
part. A non-finite loss or gradient, or a loss that jumps far above its running
mean, rolls the part back to its last good snapshot (to the one before, when
the restored one fails again) and backs off its LR; every such event is
counted and reported, never silently trained through.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raylocal.core.config import RaylocalConfig
from raylocal.errors import ConfigError, DivergedError
from raylocal.model.glow import Glow, Part
from raylocal.model.objectives import local_nll, nll_bits, preprocess, to_device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no GPU is visible to torch")
    return torch.device(name)


def python_header() -> Path:
    """Where Triton looks for Python.h, which its CUDA launcher includes (as
    triton/runtime/build.py finds it: Debian's posix_local scheme read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    return Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"


def require_compiler(device: torch.device) -> None:
    """torch.compile generates C++ on CPU, and Triton builds its launchers with a
    C compiler and Python's headers on CUDA: fail at the start, in one line, without them."""
    if device.type == "cuda":
        if not (os.environ.get("CC") or any(shutil.which(c) for c in ("cc", "gcc", "clang"))):
            raise ConfigError(
                "--compile on CUDA needs a C compiler for Triton (cc, gcc or clang, or $CC); none was found"
            )
        header = python_header()
        if not header.is_file():
            raise ConfigError(
                f"--compile on CUDA needs Python's C headers for Triton; {header} is missing "
                "(install your Python's development package, e.g. python3-dev)"
            )
        require_libcuda()
        return
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own types for "none found"
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ or $CXX); none was found") from None


def require_libcuda() -> None:
    """Triton links its launchers against libcuda.so.1, found through the linker cache
    (``/sbin/ldconfig -p``), ``LD_LIBRARY_PATH`` or ``TRITON_LIBCUDA_PATH``; without it the
    first compiled step fails inside Triton. Asked of Triton itself, before training."""
    try:
        from triton.backends.nvidia.driver import libcuda_dirs
    except ImportError:
        raise ConfigError("--compile on CUDA needs Triton, which is not installed") from None
    try:
        libcuda_dirs()
    except (AssertionError, OSError, subprocess.CalledProcessError):
        raise ConfigError(
            "--compile on CUDA needs libcuda.so.1 where Triton looks for it (the linker cache, "
            "LD_LIBRARY_PATH or TRITON_LIBCUDA_PATH); none was found"
        ) from None


def training_nll(config: RaylocalConfig, device: torch.device) -> Callable[[Part, Tensor], tuple[Tensor, Tensor]]:
    """The local objective a trainer differentiates: ``local_nll``, compiled when
    ``config.compile`` asks for it (one graph for the forward, the log-dets and
    the prior, fused element-wise work; the backward is compiled with it)."""
    if not config.schedule.compile:
        return local_nll
    require_compiler(device)
    # Every part is one entry in the compile cache of local_nll's code; past the
    # default limit (8) torch would silently run the later parts eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(local_nll, dynamic=False)


def check_image_shape(image_shape: tuple[int, int, int], n_levels: int) -> None:
    """Every block squeezes the image by 2: its sides must divide by 2^n_levels."""
    c, h, w = image_shape
    n = n_levels
    if h % 2**n or w % 2**n:
        raise ConfigError(
            f"image size {h}x{w} is not divisible by 2^n_levels = {2**n} (n_levels={n}); use fewer levels"
        )


def configure_kernels(config: RaylocalConfig) -> None:
    """This process's GPU kernels, as the config asks: IEEE float32 unless
    ``--tf32`` (torch lets cuDNN convolutions use TF32 by default, which breaks
    exact reconstructions), and cuDNN's autotuning unless ``--deterministic``,
    which with ``--compile`` also stops Inductor from choosing kernels by timing
    them on the device (two processes could choose different reduction orders).
    (These are process-wide; on CPU they change nothing.)"""
    torch.backends.cudnn.allow_tf32 = config.model.tf32
    torch.backends.cuda.matmul.allow_tf32 = config.model.tf32
    torch.backends.cudnn.benchmark = not config.model.deterministic
    torch.backends.cudnn.deterministic = config.model.deterministic
    if config.schedule.compile:
        import torch._inductor.config as inductor  # (imported only by the runs that compile)

        inductor.deterministic = config.model.deterministic or os.environ.get("TORCHINDUCTOR_DETERMINISTIC") == "1"


def build_glow(config: RaylocalConfig, image_shape: tuple[int, int, int]) -> Glow:
    """The model for ``config``; its initial weights depend only on the seed.
    Every process that trains or evaluates builds its model here, so this is
    also where its kernels are configured (``configure_kernels``)."""
    check_image_shape(image_shape, config.model.n_levels)
    configure_kernels(config)
    torch.manual_seed(config.schedule.seed)
    return Glow(image_shape, **config.glow_kwargs())


WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def _per_channel(scale: Tensor, dims: int) -> Tensor:
    """A channel's scale shaped to multiply a [B, C, ...] tensor of ``dims`` dimensions."""
    return scale.view([1, -1] + [1] * (dims - 2))


def quantize_int8(x: Tensor) -> dict[str, Tensor]:
    """``x`` [B, C, ...] as int8 with one float32 scale per channel (over the batch
    and the pixels): symmetric, rounded to nearest, so that every element comes
    back within half its channel's scale. The scales cost 4 bytes a channel: at
    a batch of 64 the payload is 0.25x float32's, whatever the latent's size."""
    dims = [d for d in range(x.dim()) if d != 1]
    scale = (x.detach().abs().amax(dim=dims) / 127).clamp_min(torch.finfo(torch.float32).tiny).float()
    q = torch.round(x.detach() / _per_channel(scale, x.dim())).clamp(-127, 127).to(torch.int8)
    return {"int8": q, "scale": scale}


def wire_payload(x: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """What crosses the wire for ``x``: a tensor of the wire's dtype, or (int8) a quantised one and its scales."""
    return quantize_int8(x) if dtype == torch.int8 else x.to(dtype)


def from_wire(payload: Tensor | dict[str, Tensor]) -> Tensor:
    """The float32 latent a part trains on, from what crossed the wire."""
    if isinstance(payload, dict):
        q = payload["int8"]
        return q.float() * _per_channel(payload["scale"], q.dim())
    return payload.float()


def over_the_wire(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A latent as the next part receives it: rounded to the wire's precision, trained on in float32."""
    return x if dtype == torch.float32 else from_wire(wire_payload(x, dtype))


@torch.no_grad()
def initialize(parts: list[Part], x: Tensor, wire: torch.dtype = torch.float32) -> None:
    """Data-dependent init: push one large batch through the parts in order, so
    every ActNorm (of part k+1 too) initialises on the activations it will see:
    the output of the initialised parts before it, rounded at each boundary as
    the wire rounds it. (An async part computes that input from its own copies of
    the upstream parts, ``PartWorker.init_input``: no latent crosses a link for the init.)"""
    for k, part in enumerate(parts):
        part(x)  # the ActNorms of this part initialise on x
        if k + 1 < len(parts):
            x = over_the_wire(part(x)[0], wire)


# The dequantisation noise of every evaluation: evaluations at different times, and
# of different runs, score the same continuous images.
EVAL_NOISE_SEED = 1234


def eval_batches(
    images: Tensor, batch_size: int, n_bits: int, device: torch.device, seed: int = EVAL_NOISE_SEED
) -> Iterator[Tensor]:
    """The images preprocessed batch by batch, as every evaluation scores them."""
    generator = torch.Generator().manual_seed(seed)
    for i in range(0, len(images), batch_size):
        yield preprocess(to_device(images[i : i + batch_size], device), n_bits, generator)


@torch.no_grad()
def image_bpds(
    glow: Glow, images: Tensor, batch_size: int, device: torch.device, seed: int = EVAL_NOISE_SEED
) -> Tensor:
    """Each image's BPD under the whole model (float64, on the CPU), with fixed
    dequantisation noise so that evaluations at different times are comparable."""
    batches = eval_batches(images, batch_size, glow.n_bits, device, seed)
    return torch.cat([nll_bits(glow, x).double().cpu() for x in batches])


def evaluate_bpd(
    glow: Glow,
    images: Tensor,
    batch_size: int,
    device: torch.device,
    seed: int = EVAL_NOISE_SEED,
    cap: float | None = None,
) -> float:
    """Exact test BPD of the whole model: the mean of ``image_bpds``, each at
    most ``cap`` when given (``--eval-cap``)."""
    return mean_bpd(image_bpds(glow, images, batch_size, device, seed), batch_size, cap)


def configured_bpd(config: RaylocalConfig, glow: Glow, images: Tensor, device: torch.device) -> float:
    """``evaluate_bpd`` as the run's config asks (``--eval-batch-size``, ``--eval-cap``): every
    evaluation of a run, in its session, its records or the model service."""
    schedule = config.schedule
    return evaluate_bpd(glow, images, schedule.eval_batch_size, device, cap=schedule.eval_cap)


def mean_bpd(bpds: Tensor, batch_size: int, cap: float | None = None) -> float:
    """The mean of per-image BPDs, summed batch by batch as evaluation sums them,
    each at most ``cap`` when given (``--eval-cap``)."""
    bpds = bpds if cap is None else bpds.clamp(max=cap)
    return sum(float(bpds[i : i + batch_size].sum()) for i in range(0, len(bpds), batch_size)) / len(bpds)


# Outliers come alone: past this many skipped batches in a row, the next one
# that looks like an outlier is taken for the data as it is, and learnt from.
MAX_SKIPS_IN_A_ROW = 5


class StabilityGuard:
    """Flags non-finite losses and upward jumps against running statistics.

    A jump is a rise of more than ``factor`` times the running mean absolute
    deviation (with a floor of 0.01 bits/dim, and only after ``warmup``
    observations, so early rapid progress never triggers it).
    """

    def __init__(self, factor: float, warmup: int = 20, beta: float = 0.95) -> None:
        self.factor, self.warmup, self.beta = factor, warmup, beta
        self.reset()

    def reset(self) -> None:
        """Forget the statistics, e.g. when the part's input distribution changes."""
        self.mean = 0.0
        self.dev = 0.0
        self.count = 0

    def is_jump(self, rise: float) -> bool:
        return self.count >= self.warmup and rise > self.factor * max(self.dev, 0.01)

    def check(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return "non-finite loss"
        if self.is_jump(loss - self.mean):
            return f"loss jumped to {loss:.3f} (running mean {self.mean:.3f})"
        return None

    def observe(self, loss: float) -> None:
        if self.count == 0:
            self.mean, self.dev = loss, 0.0
        else:
            self.dev = self.beta * self.dev + (1 - self.beta) * abs(loss - self.mean)
            self.mean = self.beta * self.mean + (1 - self.beta) * loss
        self.count += 1

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "dev": self.dev, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.dev, self.count = float(state["mean"]), float(state["dev"]), int(state["count"])


def scheduled_lr(
    base_lr: float, step: int, warmup: int, total: int, schedule: str, position: int | None = None
) -> float:
    """LR of a trainer's update number ``step`` (0-based): linear warmup over
    ``warmup`` steps, then constant, or (``cosine``, ``cosine-run``) decayed
    along half a cosine to 0 at ``total``. ``position`` is where on the decay
    this update is (default: ``step``; a run-wide clock for ``cosine-run``).
    A ``total`` of 0 (not known) means constant."""
    lr = base_lr * min(1.0, (step + 1) / warmup) if warmup else base_lr
    if schedule != "constant" and total > warmup:
        pos = step if position is None else position
        progress = min(1.0, max(0.0, (pos - warmup) / (total - warmup)))
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


@dataclass(frozen=True)
class LRClock:
    """A run's LR clock, counted in batches. Under ``cosine-run`` one decay spans
    the whole run, the parts phase's batches and then the fine-tune's, and every
    trainer reads where it is on that one decay; otherwise each trainer decays
    over its own updates. Every phase (single-process, the Ray parts, a DDP
    fine-tune, the pipeline's stages) builds one from its own counts and reads
    the decay from it; none computes it another way."""

    run_wide: bool
    parts_batches: int
    finetune_batches: int

    @classmethod
    def of(cls, config: RaylocalConfig, batches_per_epoch: int, parts_epochs: int, finetune_epochs: int) -> LRClock:
        run_wide = config.schedule.lr_schedule == "cosine-run"
        return cls(run_wide, batches_per_epoch * parts_epochs, batches_per_epoch * finetune_epochs)

    @property
    def run_batches(self) -> int:
        return self.parts_batches + self.finetune_batches

    def decay(self, own_updates: int) -> int:
        """How many steps a trainer's decay spans: the run's, or its own updates."""
        return self.run_batches if self.run_wide else own_updates

    def position(self, run_batch: int) -> int | None:
        """Where an update made on the run's batch ``run_batch`` sits on the decay
        (None: at the trainer's own update count)."""
        return run_batch if self.run_wide else None

    def finetune_elsewhere(self, parts_done: int) -> dict[str, int]:
        """``train_ddp``'s ``lr_clock``/``lr_total`` for a fine-tune trained after
        ``parts_done`` batches of parts (nothing: it decays over its own steps)."""
        return {"lr_clock": parts_done, "lr_total": self.run_batches} if self.run_wide else {}


@dataclass
class UpdateMeter:
    """The mean relative update ``‖Δθ‖ / ‖θ‖`` of a part's steps ``start`` to ``stop - 1``
    (its own step numbers): how far, relative to their size, one step moves its weights."""

    start: int
    stop: int
    total: float = 0.0
    count: int = 0

    def covers(self, step: int) -> bool:
        return self.start <= step < self.stop

    def add(self, before: list[Tensor], after: list[Tensor]) -> None:
        # each tensor's sums on its device, then one wait for all of them (not two per tensor on a GPU)
        moved = torch.stack([(a - b).pow(2).sum() for a, b in zip(after, before)]).double().sum()
        size = torch.stack([b.pow(2).sum() for b in before]).double().sum()
        moved, size = torch.stack([moved, size]).tolist()
        self.total += math.sqrt(moved / size) if size > 0 else 0.0
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


@dataclass
class StepResult:
    output: Tensor  # the part's detached output for this batch (input of the next part)
    loss: float  # local NLL in bits/dim, measured before the update
    grad_norm: float = 0.0
    event: str | None = None  # why this step was rolled back, if it was
    skipped: bool = False  # an outlier batch it did not learn from (its loss is no measure of the part)


@dataclass
class RollbackEvent:
    step: int
    reason: str
    new_lr: float  # base LR times the back-off right after the rollback (the recovery starts here)


@dataclass
class PartTrainer:
    """One part, its optimizer and LR schedule, and the shared training step."""

    part: Part
    base_lr: float
    config: RaylocalConfig
    index: int = 0
    total_steps: int = 0  # length of the LR decay in steps (0: unknown, no decay)
    clock: int | None = None  # position on the decay, set by the run (cosine-run); None: own steps
    steps: int = 0  # batches processed (never rewound)
    rollbacks: int = 0
    backoff: float = 1.0  # LR multiplier right after the last rollback (whose event's step starts the recovery)
    events: list[RollbackEvent] = field(default_factory=list)
    meter: UpdateMeter | None = None  # measures the relative update of the steps it covers
    name: str = ""  # what errors call it (default: "part <index + 1>")
    fed_images: bool = False  # its input is the data itself, as the fine-tune's is (part 1's always is)
    skipped: int = 0  # batches it did not learn from: outliers for weights that were fine (see step)

    def __post_init__(self) -> None:
        params = list(self.part.parameters())
        opt_cls = torch.optim.Adamax if self.config.schedule.optimizer == "adamax" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=self.base_lr)
        self.guard = StabilityGuard(self.config.schedule.rollback_factor)
        device = params[0].device if params else torch.device("cpu")
        self._nll = training_nll(self.config, device)  # the rechecks and rollbacks stay eager
        self._snapshots: list[dict[str, Any]] = []  # last good states, the newest last (at most two)
        self._restored = False  # the newest snapshot was restored and has not been replaced since
        self._last: tuple[Tensor, float] | None = None  # last update's batch and loss before it
        self._skips_in_a_row = 0

    @property
    def input_moves(self) -> bool:
        """Whether its input distribution can change under it: only a part fed by
        another part's output, which trains meanwhile."""
        return self.index > 0 and not self.fed_images

    @property
    def lr_multiplier(self) -> float:
        """How far the rollbacks hold the LR below its schedule: ``backoff`` right
        after a rollback, back to 1 linearly over the recovery period. Each
        further rollback doubles the period, so a part whose LR really is too
        high rolls back ever more rarely (about log2(steps / period) times)
        instead of cycling, while one early spike no longer costs a whole run
        its LR (a permanent back-off did: two warmup spikes quartered it)."""
        period = self.config.schedule.lr_recovery_steps * 2 ** max(self.rollbacks - 1, 0)
        if not self.events or period == 0:
            return self.backoff
        since = self.steps - self.events[-1].step
        return self.backoff + (1.0 - self.backoff) * min(1.0, since / period)

    @property
    def lr(self) -> float:
        cfg = self.config
        lr = scheduled_lr(
            self.base_lr, self.steps, cfg.schedule.warmup_steps, self.total_steps, cfg.schedule.lr_schedule, self.clock
        )
        return lr * self.lr_multiplier

    def step(self, x: Tensor) -> StepResult:
        """Train the part one step on input x (detached inside local_nll)."""
        if not self._snapshots:
            self._take_snapshot()  # the initial weights: the state of last resort
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        nll, y = self._nll(self.part, x)
        loss = nll.mean()
        # The gradient is computed before the loss is read, so that a step waits
        # for a GPU once, not twice; a step that is then refused never applies it.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.config.schedule.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.part.parameters(), max_norm)
        loss_value, grad_norm = torch.stack([loss.detach().float(), norm.float()]).tolist()
        problem = self.guard.check(loss_value)
        last = self._recheck() if problem is not None and math.isfinite(loss_value) else None
        if last is not None and not self._own_fault(last):
            if self._is_outlier(loss_value, last):
                # Fixed inputs, weights that still fit the previous batch: this batch
                # is an outlier, and its gradient is as far off as its loss (README)
                self.skipped += 1
                self._skips_in_a_row += 1
                self.steps += 1
                return StepResult(y.detach(), loss_value, float("nan"), skipped=True)
            # The loss rose but the last update did not cause it: the input moved,
            # or the weights drifted; skipping would freeze the part (docs/study.md)
            self.guard.reset()
            problem = None
        if problem is None:
            # This batch's loss validates the current weights: snapshot them now,
            # before the update, so that a snapshot is never of unchecked weights.
            if self.steps % self.config.schedule.snapshot_every == 0:
                self._take_snapshot()
            if math.isfinite(grad_norm):
                measured = self.meter is not None and self.meter.covers(self.steps)
                before = [p.detach().clone() for p in self.part.parameters()] if measured else []
                self.optimizer.step()
                if measured:
                    self.meter.add(before, [p.detach() for p in self.part.parameters()])
                self.guard.observe(loss_value)
                self.steps += 1
                self._skips_in_a_row = 0
                self._last = (x.detach(), loss_value)
                return StepResult(y.detach(), loss_value, grad_norm)
            problem = "non-finite gradient"
        return self._rollback(problem, x, loss_value)

    def _recheck(self) -> tuple[float, float] | None:
        """(loss before, loss now) on the batch of the last update."""
        if self._last is None:
            return None
        x, before = self._last
        with torch.no_grad():
            return before, float(local_nll(self.part, x)[0].mean())

    def _is_outlier(self, loss_value: float, last: tuple[float, float]) -> bool:
        """Is this batch of the data far worse than the previous one (``last``, its
        recheck) under the same weights? A part fed by another cannot tell an
        outlier from its input moving. Outliers come alone: a run of them is the
        data as it is."""
        if self.input_moves or self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
            return False
        return self.guard.is_jump(loss_value - last[1])

    def _own_fault(self, last: tuple[float, float]) -> bool:
        """Did the last update make the part worse on the batch it was computed on
        (``last``: that batch's loss before it and now)?"""
        return not math.isfinite(last[1]) or self.guard.is_jump(last[1] - last[0])

    def validate(self) -> str | None:
        """Check the weights left by the last update (which no later batch has
        checked yet) on that update's own batch; roll back if they fail. Called
        at the end of an epoch or run, before the model is evaluated or saved."""
        r = self._recheck()
        if r is None or (math.isfinite(r[1]) and not self.guard.is_jump(r[1] - r[0])):
            return None
        problem = f"last update raised its own batch's loss from {r[0]:.3f} to {r[1]:.3f}"
        self._rollback(problem, self._last[0], r[1])
        return problem

    def _take_snapshot(self) -> None:
        state = {
            "part": self.part.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "guard": self.guard.state_dict(),
        }
        self._snapshots.append(copy.deepcopy(state))
        del self._snapshots[:-2]
        self._restored = False

    def _rollback(self, reason: str, x: Tensor, loss_value: float) -> StepResult:
        """Restore the last good state, back off the LR, and recompute this batch's
        output with the restored weights so that nothing bad flows downstream."""
        assert self._snapshots
        if self._restored and len(self._snapshots) > 1:
            # The state restored last time failed again: restoring it once more
            # would loop until max_rollbacks, so fall back to the one before it
            self._snapshots.pop()
            reason += "; the state restored last time failed again: restored the one before it"
        self.backoff = self.lr_multiplier * self.config.schedule.lr_backoff
        self.rollbacks += 1
        self.steps += 1
        self.events.append(RollbackEvent(self.steps, reason, self.base_lr * self.backoff))
        if self.rollbacks > self.config.schedule.max_rollbacks:
            raise DivergedError(
                f"{self.name or f'part {self.index + 1}'} diverged: {self.rollbacks} rollbacks (last: {reason}); "
                "lower its learning rate"
            )
        self._last = None  # its batch belongs to weights that are gone
        self._skips_in_a_row = 0
        snap = copy.deepcopy(self._snapshots[-1])
        self._restored = True
        self.part.load_state_dict(snap["part"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.guard.load_state_dict(snap["guard"])
        with torch.no_grad():
            y, _ = self.part(x.detach())
        return StepResult(y, loss_value, float("nan"), reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "guard": self.guard.state_dict(),
            "base_lr": self.base_lr,
            "backoff": self.backoff,
            "steps": self.steps,
            "rollbacks": self.rollbacks,
            "skipped": self.skipped,
            "events": [[e.step, e.reason, e.new_lr] for e in self.events],
            "meter": [self.meter.total, self.meter.count] if self.meter is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.guard.load_state_dict(state["guard"])
        self.base_lr = float(state["base_lr"])
        # checkpoints from before the recovering back-off kept it in base_lr
        self.backoff = float(state.get("backoff", 1.0))
        self.steps = int(state["steps"])
        self.rollbacks = int(state["rollbacks"])
        self.skipped = int(state.get("skipped", 0))  # (checkpoints from before it counted them)
        self.events = [RollbackEvent(int(s), str(r), float(lr)) for s, r, lr in state["events"]]
        if state.get("meter") is not None and self.meter is not None:  # resumed inside --lr-rule's window
            self.meter.total, self.meter.count = float(state["meter"][0]), int(state["meter"][1])
        self._snapshots = []
        self._restored = False
        self._last = None
        self._skips_in_a_row = 0
