"""One run configuration, in sections, validated at the edge (command line and config files).

``RaylocalConfig`` is the single plain object every script and schedule reads.
It holds seven sections, each a small model of its own: ``config.data``,
``.model``, ``.parts``, ``.schedule``, ``.links``, ``.cluster`` and ``.run``
(``config.model.depth``, ``config.schedule.lr``). Each setting is also a flat
name, its flag's (``n_levels`` -> ``--n-levels``): the field's own name but for
two, the parts' ``count`` (``--parts``) and the schedule's ``name``
(``--schedule``). ``--help`` lists the flags by section. A JSON config file
(``--config FILE``), a checkpoint's record or ``RaylocalConfig(...)`` may give
the settings by section (``{"model": {"depth": 4}}``), flat (``{"depth": 4}``),
or both; files and run directories hold them by section, each by its flat name
(``sectioned()``). Command-line values override the file.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from raylocal.core.data import DataSource
from raylocal.core.faults import parse_faults
from raylocal.core.links import parse_link
from raylocal.errors import ConfigError

Schedule = Literal["e2e", "sequential", "alternating", "simultaneous", "async", "data-parallel", "pipeline"]
# The rivals, trained end to end on Ray as runs of their own (raylocal/run/rival_run.py)
RIVAL_SCHEDULES = ("data-parallel", "pipeline")


class Section(BaseModel):
    """One section of a run's configuration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(Section):
    """Where the images come from, and how many of them."""

    dataset: Literal["mnist", "cifar10", "folder"] = Field("mnist", description="which dataset")
    data_root: str | None = Field(None, description="dataset directory (default: bundled MNIST)")
    download: bool = Field(False, description="download CIFAR-10 if missing (needs internet)")
    train_subset: int | None = Field(None, gt=0, description="use only the first N training images")
    test_subset: int | None = Field(None, gt=0, description="use only the first N test images")
    validation: int | None = Field(
        None,
        gt=0,
        description="evaluate on the last N training images, held out from training, instead of the test set "
        "(to choose settings, such as LRs, on data the final test never sees)",
    )
    cache_dir: str | None = Field(None, description="where decoded ImageFolder tensors are cached")
    images_from: Literal["driver", "node"] = Field(
        "driver",
        description="how Ray actors get their training images: the driver's copy, through Ray's object store "
        "(crossing the network to every other node), or each actor loads them from --data-root on its own "
        "node (the same files must be there)",
    )

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths_for_nodes(cls, values: Any) -> Any:
        # actors that load their own images stand elsewhere: a relative path is the driver's directory's
        if isinstance(values, dict) and values.get("images_from") == "node":
            for key in ("data_root", "cache_dir"):
                if values.get(key):
                    values = values | {key: str(Path(values[key]).resolve())}
        return values


class ModelSection(Section):
    """The Glow's shape and its numerics."""

    n_levels: int = Field(2, ge=1, le=8, description="Glow blocks L")
    depth: int = Field(8, ge=1, description="flow steps K per block")
    hidden: int = Field(64, ge=1, description="width of the coupling networks")
    coupling: Literal["affine", "additive"] = Field("affine", description="coupling type")
    permutation: Literal["lu", "plain"] = Field("lu", description="1x1 conv parameterisation")
    n_bits: int = Field(8, ge=1, le=8, description="bits per pixel the model sees (8 or 5 usual)")
    precision: Literal["float32", "bf16"] = Field(
        "float32",
        description="bf16: the coupling networks run under bfloat16 autocast; log-dets, priors and the "
        "objective stay float32",
    )
    tf32: bool = Field(
        False,
        description="GPUs: let convolutions and matmuls use TF32 (faster on Ampere and later, ~1e-3 relative "
        "error, so reconstructions are no longer exact); off: IEEE float32",
    )
    deterministic: bool = Field(
        False,
        description="GPUs: deterministic cuDNN kernels, no autotuning (repeatable bit for bit, slower; with "
        "--compile, Inductor's deterministic mode too); off: cuDNN picks the fastest convolution for each shape",
    )


class PartsSection(Section):
    """How the Glow is cut into parts."""

    count: int = Field(1, ge=1, description="number of parts K")
    split: Literal["by-block", "across-blocks"] = Field(
        "across-blocks", description="automatic split: at block boundaries or balanced by compute"
    )
    balance: Literal["estimate", "measure"] = Field(
        "estimate", description="automatic split balances estimated FLOPs or measured layer times"
    )
    part_spec: str | None = Field(None, description="explicit parts: '1|2,3', '1[:4]|1[4:],2' or 'layers:0-12|13-38'")


class ScheduleSection(Section):
    """How the parts train: the schedule, its epochs and batches, LRs, and the optimizer's guard."""

    name: Schedule = Field(
        "e2e",
        description="the rivals on Ray, end to end: data-parallel (DDP; local SGD with --average-every) | "
        "pipeline (the parts' cut as stages); or ours: e2e | sequential | alternating | simultaneous | async",
    )
    epochs: int = Field(1, ge=0, description="epochs of the schedule (per part for sequential)")
    finetune_epochs: int = Field(0, ge=0, description="end-to-end fine-tune epochs afterwards")
    alternate_every: int = Field(
        0, ge=0, description="alternating: switch the trained part every N batches (0: every epoch, the reference)"
    )
    batch_size: int = Field(64, ge=1, description="training batch size")
    eval_batch_size: int = Field(500, ge=1, description="evaluation batch size")
    eval_cap: float | None = Field(
        None,
        gt=0,
        description="score each evaluated image at most this many bits/dim (8: the uniform model's score "
        "of 8-bit images), so that no one image moves the mean BPD of N by more than cap/N (default: no cap)",
    )
    init_batch_size: int = Field(512, ge=1, description="batch for ActNorm's data-dependent init")
    lr: list[float] = Field([1e-3], description="learning rate, or one per part: 1e-3,5e-4,1e-4")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tune LR (default: smallest lr)")
    finetune_scope: Literal["all", "boundary"] = Field(
        "all", description="fine-tune every layer, or only the flow steps next to each part boundary (the rest frozen)"
    )
    lr_rule: Literal["none", "relative-update"] = Field(
        "none",
        description="per-part LRs from --lr: relative-update scales each part's LR, at the end of its warmup, so "
        "that every part's weights move by the same relative amount per step (their geometric mean kept); "
        "simultaneous and alternating schedules; it needs max(warmup, 20) steps of every part (a shorter run "
        "keeps one LR: its summary's lr_multipliers is null)",
    )
    warmup_steps: int = Field(200, ge=0, description="linear LR warmup steps (per part)")
    lr_schedule: Literal["constant", "cosine", "cosine-run"] = Field(
        "constant",
        description="LR after warmup: constant; cosine: decay to 0 over each trainer's own steps; "
        "cosine-run: one decay over the whole run (parts phase and fine-tune) that every trainer follows",
    )
    optimizer: Literal["adam", "adamax"] = Field("adam", description="optimizer")
    compile: bool = Field(
        False,
        description="compile the training step of every part and of the single-process fine-tune with "
        "torch.compile; DDP workers run eagerly (the first step compiles: "
        "1-2 min on 2 CPU cores, seconds once cached; then about 1.2x faster on CPU)",
    )
    grad_clip: float = Field(50.0, ge=0, description="max gradient norm (0: no clipping)")
    rollback_factor: float = Field(
        8.0, gt=0, description="roll back when loss exceeds its running mean by this many mean deviations"
    )
    lr_backoff: float = Field(0.5, gt=0, lt=1, description="LR multiplier after a rollback")
    lr_recovery_steps: int = Field(
        200,
        ge=0,
        description="steps over which a backed-off LR is warmed linearly back to its schedule, doubled "
        "after each further rollback of the same part (0: the back-off is permanent)",
    )
    max_rollbacks: int = Field(20, ge=0, description="give up on a part after this many rollbacks")
    snapshot_every: int = Field(50, ge=1, description="steps between last-good-state snapshots")
    seed: int = Field(0, ge=0, description="random seed")

    @field_validator("lr", mode="before")
    @classmethod
    def _parse_lr(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return [float(s) for s in v.split(",")]
            except ValueError:
                raise ValueError(f"expected numbers separated by commas, got {v!r}") from None
        if isinstance(v, (int, float)):
            return [float(v)]
        return v

    @field_validator("lr")
    @classmethod
    def _check_lr(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one value")
        for x in v:
            if not x > 0 or x != x or x == float("inf"):
                raise ValueError(f"every learning rate must be a positive number, got {x}")
        return v


class LinksSection(Section):
    """The links between neighbouring parts, and what crosses them."""

    link: str = Field(
        "up",
        description="link between neighbouring parts: up, or comma-separated bw=10Mbit, lat=20ms, p=0.9, "
        "outage=START:LEN, mtbf=60s, mttr=15s, eff=0.9, msg=1.5ms; '|' per boundary",
    )
    queue_size: int = Field(4, ge=1, description="bound of each latent queue")
    starve: Literal["wait", "stale"] = Field(
        "wait",
        description="a part with no fresh latent from upstream: wait for one, or train on a latent computed "
        "from its own data through its synced upstream copy",
    )
    full: Literal["block", "drop-oldest"] = Field("block", description="full outbound queue: block, or drop its oldest")
    wire_dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field(
        "float32",
        description="precision of latents between parts, on async's wire (parts train in float32; int8: "
        "symmetric, one float32 scale per channel); the single-process schedules round them the same way, so "
        "that they stay async's twins",
    )
    sync_every: int = Field(50, ge=1, description="upstream weight sync every N steps")
    trace_packets: int = Field(0, ge=0, le=100_000, description="time the hops of each link's first N packets")

    @field_validator("link")
    @classmethod
    def _check_link(cls, v: str) -> str:
        try:
            return parse_link(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None


class ClusterSection(Section):
    """Where the work runs: Ray, devices, resources, and the data-parallel workers (fine-tune and rivals)."""

    address: str | None = Field(None, description="Ray address ('auto' joins a cluster; default: local)")
    placement: Literal["pack", "spread"] = Field("pack", description="placement of part actors")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU when present")
    threads: int | None = Field(None, ge=1, description="torch threads (default: all CPUs)")
    cpus_per_part: float | None = Field(None, gt=0, description="CPUs per part actor")
    gpus_per_part: float | None = Field(None, ge=0, description="GPUs per part actor (default: 1, or a share of fewer)")
    worker_resource: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$",
        description="a custom Ray resource that marks the nodes to work on: parts, evaluations and the fine-tune "
        "run only where it is (a head node without it only coordinates)",
    )
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a dead part actor")
    finetune_workers: int = Field(1, ge=1, description="DDP workers for the fine-tune phase")
    workers: int = Field(2, ge=1, description="the data-parallel schedule's workers")
    average_every: int = Field(
        0,
        ge=0,
        description="data-parallel runs: local SGD, averaging parameters every H steps over the link, "
        "instead of all-reducing gradients every step (0: DDP)",
    )
    bucket_cap_mb: float | None = Field(
        None,
        gt=0,
        description="DDP: the largest gradient bucket, in MB (DDP's default: 25); buckets smaller than the "
        "gradient let their all-reduces overlap the rest of the backward pass (DDP's first step is one bucket)",
    )
    ddp_compression: Literal["none", "bf16", "powersgd"] = Field(
        "none",
        description="DDP: all-reduce each gradient bucket in bfloat16 (as torch's bf16_compress_hook), or "
        "low-rank by torch's powerSGD_hook (--powersgd-rank, --powersgd-start); over --link too: the bytes "
        "on the wire are the compressed ones",
    )
    powersgd_rank: int = Field(2, ge=1, description="DDP with --ddp-compression powersgd: the approximation's rank")
    powersgd_start: int = Field(
        100,
        ge=2,
        description="DDP with --ddp-compression powersgd: steps of plain all-reduce before compressing "
        "(torch's start_powerSGD_iter)",
    )
    outer_lr: float | None = Field(
        None, gt=0, description="local SGD: DiLoCo's outer Nesterov step with this LR (default: plain averaging)"
    )
    average_overlap: bool = Field(
        False,
        description="local SGD: average while the next step trains, and apply the round one step late, as a "
        "correction (weights += mean of the weights at the round - own weights at the round)",
    )
    micro_batches: int = Field(4, ge=1, description="the pipeline schedule: micro-batches per batch")
    pipeline_order: Literal["1f1b", "gpipe"] = Field(
        "1f1b", description="the pipeline schedule: 1F1B, or GPipe (every forward, then every backward)"
    )


class RunSection(Section):
    """The run's directory, checkpoints, evaluations, logs, samples, time budget and faults."""

    storage_path: str = Field("runs", description="directory for run outputs (reachable by all nodes)")
    run_name: str | None = Field(None, description="name of the run directory (default: generated)")
    resume: bool = Field(False, description="continue the run in storage_path/run_name")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: per epoch)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: per epoch)")
    live_eval_images: int = Field(
        1000,
        ge=0,
        description="async runs: test images of each evaluation while the parts train (the first N, a fixed "
        "subset, so that they cost little; 0: all); the evaluations after the parts phase and at the end use all",
    )
    log_every: int = Field(10, ge=1, description="steps between progress/TensorBoard updates")
    samples: int = Field(64, ge=0, description="images in the sample grid")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    time_budget: float | None = Field(None, gt=0, description="stop training after this many seconds")
    progress: bool = Field(True, description="show a progress bar")
    inject: str | None = Field(
        None,
        description="fault injection for reliability tests: ray-kill:PART@STEP, sigkill:PART@STEP, "
        "nan:PART@STEP, slow:PART@SECONDS (comma-separated)",
    )

    @field_validator("inject")
    @classmethod
    def _check_inject(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_faults(v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v


SECTION_TYPES: dict[str, type[Section]] = {
    "data": DataSection,
    "model": ModelSection,
    "parts": PartsSection,
    "schedule": ScheduleSection,
    "links": LinksSection,
    "cluster": ClusterSection,
    "run": RunSection,
}
# The two settings whose fields are named apart from their flags: each flag is its section's own name
RENAMED = {"parts": "count", "schedule": "name"}


def _flat_name(section: str, field: str) -> str:
    """A field's flat name: ``count`` in parts is ``parts``, ``name`` in schedule ``schedule``."""
    return section if RENAMED.get(section) == field else field


# Every setting by its flat name, in exactly one section, in the order ``--help`` shows them
SECTIONS: dict[str, tuple[str, ...]] = {
    section: tuple(_flat_name(section, field) for field in kind.model_fields) for section, kind in SECTION_TYPES.items()
}
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def field_of(name: str) -> tuple[str, str]:
    """The section and field of a flat name (``parts`` -> ``("parts", "count")``)."""
    return SECTION_OF[name], RENAMED.get(name, name)


def field_info(name: str) -> FieldInfo:
    """The field (its default, type and description) of a flat name."""
    section, field = field_of(name)
    return SECTION_TYPES[section].model_fields[field]


class RaylocalConfig(BaseModel):
    """Everything a run needs, by section (see the module doc). Defaults are a
    short MNIST run on this machine."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    parts: PartsSection = Field(default_factory=PartsSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    links: LinksSection = Field(default_factory=LinksSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="before")
    @classmethod
    def _by_section(cls, values: Any) -> Any:
        return by_section(flatten_sections(values)) if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _check_combination(self, info: ValidationInfo) -> RaylocalConfig:
        check_combination(self, recorded=bool(info.context and info.context.get("recorded")))
        return self

    def one_part(self) -> bool:
        """Whether the run trains the whole model as one part (its split plays no role)."""
        return self.schedule.name in ("e2e", "data-parallel")

    def part_count(self) -> int:
        """How many parts the run trains: ``--part-spec`` names them, else ``--parts``."""
        spec = self.parts.part_spec
        return self.parts.count if spec is None else spec.count("|") + 1

    def part_lrs(self, n_parts: int) -> list[float]:
        lr = self.schedule.lr
        return lr * n_parts if len(lr) == 1 else list(lr)

    def flat(self, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """Every setting by its flat name (what flags, Tune's spaces and the studies' arms name)."""
        return flatten_sections(self.model_dump(mode=mode))

    def sectioned(self) -> dict[str, dict[str, Any]]:
        """The settings by section, each by its flat name: what config files, run directories
        and Tune's best.json hold (``{"parts": {"parts": 3, ...}, ...}``)."""
        values = self.flat()
        return {section: {name: values[name] for name in names} for section, names in SECTIONS.items()}

    def replace(self, **flat: Any) -> RaylocalConfig:
        """A copy with these settings (flat names) changed, unvalidated, as ``model_copy``: for
        facts found at run time and derived configs (a fine-tune's whole model), not user input."""
        changed: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            if name not in SECTION_OF:
                raise ValueError(f"{name}: unknown option")
            section, field = field_of(name)
            changed.setdefault(section, {})[field] = value
        return self.model_copy(
            update={section: getattr(self, section).model_copy(update=fields) for section, fields in changed.items()}
        )

    def glow_kwargs(self) -> dict[str, Any]:
        m = self.model
        return dict(
            n_levels=m.n_levels,
            depth=m.depth,
            hidden=m.hidden,
            affine=m.coupling == "affine",
            lu=m.permutation == "lu",
            n_bits=m.n_bits,
            bf16=m.precision == "bf16",
        )


def default_of(name: str) -> Any:
    """The default of a setting, by its flat name."""
    return field_info(name).get_default(call_default_factory=True)


def check_combination(c: RaylocalConfig, recorded: bool = False) -> None:
    """Settings that are valid alone but not together (pydantic shows the ValueError in one line).
    A ``recorded`` config (a finished run's) may hold a setting its rival ignored then."""
    s, cluster = c.schedule, c.cluster
    if len(s.lr) not in (1, c.parts.count):
        raise ValueError(f"lr has {len(s.lr)} values but there are {c.parts.count} parts")
    if s.alternate_every and s.name != "alternating":
        raise ValueError(f"alternate_every={s.alternate_every} applies to the alternating schedule, not {s.name!r}")
    if s.lr_rule != "none" and s.name not in ("simultaneous", "alternating"):
        raise ValueError(
            f"lr_rule={s.lr_rule!r} compares the parts while they train together: it applies to the "
            f"simultaneous and alternating schedules, not {s.name!r}"
        )
    if s.lr_rule != "none" and len(s.lr) > 1:
        raise ValueError(f"lr_rule={s.lr_rule!r} derives the per-part LRs from one --lr, got {len(s.lr)}")
    if cluster.average_overlap and (not cluster.average_every or cluster.outer_lr):
        raise ValueError("average_overlap applies to local SGD (average_every > 0) without DiLoCo's outer_lr")
    if s.finetune_scope == "boundary" and cluster.finetune_workers > 1:
        raise ValueError("finetune_scope='boundary' is for a one-worker fine-tune; DDP trains every layer")
    if cluster.device == "cpu" and cluster.gpus_per_part and not recorded:
        raise ValueError(f"gpus_per_part={cluster.gpus_per_part:g}: device 'cpu' would reserve GPUs it never uses")
    if cluster.device == "cuda" and cluster.gpus_per_part == 0 and not recorded:
        raise ValueError("gpus_per_part=0: device 'cuda' needs a GPU share for each part")
    if s.name in RIVAL_SCHEDULES:
        check_rival(c, recorded)


# Settings a rival's run has no use for: given anything but their default,
# they are refused rather than ignored. Each with what the run does instead.
RIVAL_UNUSED = {
    "eval_every": "evaluates once, at its end",
    "checkpoint_every": "checkpoints once, at its end",
    "live_eval_images": "evaluates once, at its end, on every test image",
    "starve": "has no queue of latents between parts",
    "full": "has no queue of latents between parts",
    "sync_every": "sends no upstream weights",
    "trace_packets": "traces no packets (only the parts' links do)",
    "compile": "trains uncompiled",
    "max_restarts": "does not restart a worker or stage",
    "finetune_lr": "has no fine-tune",
    "finetune_scope": "has no fine-tune",
    "finetune_workers": "has no fine-tune (--workers sets its workers)",
    **{
        name: "never rolls back: it skips an update whose gradient is not finite, and fails after a few in a row"
        for name in ("rollback_factor", "lr_backoff", "lr_recovery_steps", "max_rollbacks", "snapshot_every")
    },
}
PIPELINE_ONLY = ("micro_batches", "pipeline_order")
DATA_PARALLEL_ONLY = (
    "workers", "average_every", "outer_lr", "average_overlap", "bucket_cap_mb", "ddp_compression", "powersgd_rank",
    "powersgd_start",
)  # fmt: skip


def _refuse_unused(c: RaylocalConfig) -> None:
    schedule = c.schedule.name
    unused = dict(RIVAL_UNUSED)
    other = DATA_PARALLEL_ONLY if schedule == "pipeline" else PIPELINE_ONLY
    owner = "data-parallel" if schedule == "pipeline" else "pipeline"
    unused |= {name: f"does not use it (it is the {owner} schedule's)" for name in other}
    if schedule == "data-parallel":
        unused["wire_dtype"] = "sends float32 gradients or weights (--ddp-compression shapes DDP's)"
        unused["queue_size"] = "has no queue of latents between parts"
        unused["gpus_per_part"] = "gives each worker a whole GPU when there is one for each (--device)"
        unused["placement"] = "leaves its workers' placement to Ray Train"
    values = c.flat()
    for name, instead in unused.items():
        if values[name] != default_of(name):
            raise ValueError(f"{name}={values[name]!r}: a {schedule} run {instead}")


def check_rival(c: RaylocalConfig, recorded: bool = False) -> None:
    """A rival's run trains end to end from its first step, and once; of the
    faults, its workers or stages take only a straggler. A setting it would
    ignore is refused, unless ``recorded``: a finished run's record stays readable."""
    if not recorded:
        _refuse_unused(c)
    s, name = c.schedule, c.schedule.name
    if s.epochs < 1:
        raise ValueError(f"epochs={s.epochs}: a {name} run trains at least one epoch")
    if s.finetune_epochs:
        raise ValueError(f"finetune_epochs={s.finetune_epochs}: the {name} schedule trains end to end throughout")
    if c.run.resume:
        raise ValueError(f"resume: a {name} run does not resume; start it again")
    unsupported = sorted({f.kind for f in parse_faults(c.run.inject or "")} - {"straggle"})
    if unsupported:
        raise ValueError(f"inject: a {name} run takes only straggle faults, not {', '.join(unsupported)}")
    if name == "pipeline" and c.part_count() < 2:
        raise ValueError(f"a pipeline needs at least 2 stages (--parts or --part-spec), got {c.part_count()}")
    if name == "pipeline" and c.links.wire_dtype != "float32":
        raise ValueError(f"wire_dtype={c.links.wire_dtype!r}: the pipeline sends float32 activations and gradients")
    if name == "pipeline" and s.batch_size % c.cluster.micro_batches:
        raise ValueError(f"batch_size={s.batch_size} does not split into micro_batches={c.cluster.micro_batches}")
    if name == "data-parallel" and s.batch_size % c.cluster.workers:
        raise ValueError(f"batch_size={s.batch_size} does not split among workers={c.cluster.workers}")


def data_source(config: RaylocalConfig) -> DataSource:
    """The config's data section as a loadable description."""
    d = config.data
    return DataSource(d.dataset, d.data_root, d.download, d.cache_dir, d.validation, d.train_subset, d.test_subset)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Pydantic's message, shown briefly: the first problem on one line, named by its flag's name."""
    first = err.errors()[0]
    path = [str(p) for p in first["loc"]]  # none for settings refused together
    if len(path) >= 2 and path[0] in SECTION_TYPES:  # a section's field: its flat name
        path = [_flat_name(path[0], path[1]), *path[2:]]
    loc = ".".join(path)
    msg = first["msg"].removeprefix("Value error, ")  # our own ValueError's text says it all
    if first["type"] == "extra_forbidden":
        msg = "unknown option"
    text = f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"
    if "input" in first and first["type"] != "extra_forbidden" and not isinstance(first["input"], dict):
        text += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    return text + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def flatten_sections(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Options given by section (``{"model": {"depth": 4}}``), flat, or both: flat.
    A key under a section it does not belong to is refused in one line."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Section):
            value = value.model_dump(exclude_unset=True)  # (what it was given, not its defaults)
        if key in SECTIONS and isinstance(value, dict):
            for inner_key, inner in value.items():
                name = _flat_name(key, inner_key)  # (a flag's own name stays itself: parts, schedule)
                if SECTION_OF.get(name, key) != key:
                    raise ConfigError(f"{source}: {key}.{name}: belongs to section {SECTION_OF[name]!r}")
                if name in flat:
                    raise ConfigError(f"{source}: {name} is given twice")
                flat[name] = inner
        elif key in SECTIONS and key not in SECTION_OF:  # (--parts and --schedule are their sections' names)
            raise ConfigError(f"{source}: {key}: a section holds its settings as an object, got {value!r}")
        elif key in flat:
            raise ConfigError(f"{source}: {key} is given twice")
        else:
            flat[key] = value
    return flat


def by_section(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat options grouped as the sections' fields; an unknown name stays on top (where
    pydantic refuses it as an unknown option)."""
    grouped: dict[str, Any] = {}
    for name, value in flat.items():
        if name in SECTION_OF:
            section, field = field_of(name)
            grouped.setdefault(section, {})[field] = value
        else:
            grouped[name] = value
    return grouped


def validate_config(values: dict[str, Any], source: str = "config", recorded: bool = False) -> RaylocalConfig:
    """The config of these settings; ``recorded``: a finished run's (see ``check_combination``)."""
    values = flatten_sections(values, source)
    try:
        return RaylocalConfig.model_validate(values, context={"recorded": recorded})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def read_config_file(path: str | Path, recorded: bool = False) -> dict[str, Any]:
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must hold a JSON object of options")
    values = flatten_sections(values, str(path))
    validate_config(values, str(path), recorded)  # report the file's own errors against the file
    return values


def write_config_file(config: RaylocalConfig, path: str | Path) -> None:
    """``config`` as a config file, by section (what ``read_config_file`` reads back)."""
    Path(path).write_text(json.dumps(config.sectioned(), indent=2) + "\n")


def load_config_file(path: str | Path, recorded: bool = False) -> RaylocalConfig:
    """The config a file holds (a run directory's config.json, a Tune study's best.json);
    ``recorded``: a finished run's record, read back as it ran."""
    return validate_config(read_config_file(path, recorded), str(path), recorded)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a one-line ConfigError, not usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(description: str, defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting (its flat name), grouped by section.

    Values stay strings: pydantic converts and validates them, so a bad value
    gets the same message from the command line as from a config file. Flags
    default to "not given" so that only what the user typed overrides the file;
    ``--help`` shows the defaults the calling script really uses.
    """
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON file of options, flat or by section (command-line flags override it)")
    groups = {section: parser.add_argument_group(f"{section} options") for section in SECTIONS}
    for name in SECTION_OF:
        group, field = groups[SECTION_OF[name]], field_info(name)
        flag = "--" + name.replace("_", "-")
        default = (defaults or {}).get(name, field.default)
        if isinstance(default, list):
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        help_text = f"{field.description} (default: {default})"
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, help=help_text, metavar=name.upper())
    return parser


def config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> RaylocalConfig:
    """defaults < config file < command-line flags, validated together."""
    values: dict[str, Any] = dict(defaults or {})
    given = vars(args).copy()
    config_file = given.pop("config", None)
    if config_file:
        values.update(read_config_file(config_file))
    values.update(given)
    return validate_config(values, "options")


# The embedded default (scripts/run_async.py with no options): a few minutes on 2 CPU cores.
EMBEDDED_DEFAULT = {
    "schedule": "async",
    "parts": 3,
    "n_levels": 2,
    "depth": 4,
    "hidden": 64,
    "epochs": 3,
    "finetune_epochs": 1,
    "train_subset": 20000,
    "test_subset": 5000,
    "warmup_steps": 100,
    "lr": [1e-3],
}
