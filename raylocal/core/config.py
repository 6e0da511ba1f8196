"""One run configuration, validated at the edge (command line and config files).

``RaylocalConfig`` is the single plain object every script and schedule reads. Its
fields fall in ``SECTIONS`` (data, model, parts, schedule, links, cluster, run):
``--help`` lists the flags by section, and a JSON config file (``--config
FILE``) may group its keys by section (``{"model": {"depth": 4}}``) or give
them flat (``{"depth": 4}``), as runs write and read them. Each field is a flag
(``n_levels`` -> ``--n-levels``); command-line values override the file.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from raylocal.core.data import DataSource
from raylocal.core.faults import parse_faults
from raylocal.core.links import parse_link
from raylocal.errors import ConfigError

Schedule = Literal["e2e", "sequential", "alternating", "simultaneous", "async", "data-parallel", "pipeline"]
# The rivals, trained end to end on Ray as runs of their own (raylocal/run/rival_run.py)
RIVAL_SCHEDULES = ("data-parallel", "pipeline")

# Every field in exactly one section, in the order ``--help`` shows them.
SECTIONS: dict[str, tuple[str, ...]] = {
    "data": (
        "dataset", "data_root", "download", "train_subset", "test_subset", "validation", "cache_dir", "images_from",
    ),
    "model": ("n_levels", "depth", "hidden", "coupling", "permutation", "n_bits", "precision", "tf32", "deterministic"),
    "parts": ("parts", "split", "balance", "part_spec"),
    "schedule": (
        "schedule", "epochs", "finetune_epochs", "alternate_every", "batch_size", "eval_batch_size",
        "eval_cap", "init_batch_size", "lr", "finetune_lr", "finetune_scope", "lr_rule", "warmup_steps", "lr_schedule",
        "optimizer", "compile", "grad_clip", "rollback_factor", "lr_backoff", "lr_recovery_steps", "max_rollbacks",
        "snapshot_every", "seed",
    ),
    "links": ("link", "queue_size", "starve", "full", "wire_dtype", "sync_every", "trace_packets"),
    # where the work runs: Ray, devices, resources, and the data-parallel workers (fine-tune and baselines)
    "cluster": (
        "address", "placement", "device", "threads", "cpus_per_part", "gpus_per_part", "worker_resource",
        "max_restarts", "finetune_workers", "workers", "average_every", "bucket_cap_mb", "ddp_compression",
        "powersgd_rank", "powersgd_start", "outer_lr", "average_overlap", "micro_batches", "pipeline_order",
    ),
    "run": (
        "storage_path", "run_name", "resume", "checkpoint_every", "eval_every", "live_eval_images", "log_every",
        "samples", "temperature", "time_budget", "progress", "inject",
    ),
}  # fmt: skip
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


class RaylocalConfig(BaseModel):
    """Everything a run needs. Defaults are a short MNIST run on this machine."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
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

    # model
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

    # parts
    parts: int = Field(1, ge=1, description="number of parts K")
    split: Literal["by-block", "across-blocks"] = Field(
        "across-blocks", description="automatic split: at block boundaries or balanced by compute"
    )
    balance: Literal["estimate", "measure"] = Field(
        "estimate", description="automatic split balances estimated FLOPs or measured layer times"
    )
    part_spec: str | None = Field(None, description="explicit parts: '1|2,3', '1[:4]|1[4:],2' or 'layers:0-12|13-38'")

    # training
    schedule: Schedule = Field(
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

    # run
    seed: int = Field(0, ge=0, description="random seed")
    threads: int | None = Field(None, ge=1, description="torch threads (default: all CPUs)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU when present")
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

    # ray (async schedule)
    address: str | None = Field(None, description="Ray address ('auto' joins a cluster; default: local)")
    placement: Literal["pack", "spread"] = Field("pack", description="placement of part actors")
    queue_size: int = Field(4, ge=1, description="bound of each latent queue")
    link: str = Field(
        "up",
        description="link between neighbouring parts: up, or comma-separated bw=10Mbit, lat=20ms, p=0.9, "
        "outage=START:LEN, mtbf=60s, mttr=15s, eff=0.9, msg=1.5ms; '|' per boundary",
    )
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
    cpus_per_part: float | None = Field(None, gt=0, description="CPUs per part actor")
    gpus_per_part: float | None = Field(None, ge=0, description="GPUs per part actor (default: 1, or a share of fewer)")
    finetune_workers: int = Field(1, ge=1, description="DDP workers for the fine-tune phase")
    workers: int = Field(2, ge=1, description="the data-parallel schedule's workers")
    worker_resource: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$",
        description="a custom Ray resource that marks the nodes to work on: parts, evaluations and the fine-tune "
        "run only where it is (a head node without it only coordinates)",
    )
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
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a dead part actor")
    inject: str | None = Field(
        None,
        description="fault injection for reliability tests: ray-kill:PART@STEP, sigkill:PART@STEP, "
        "nan:PART@STEP, slow:PART@SECONDS (comma-separated)",
    )

    @field_validator("link")
    @classmethod
    def _check_link(cls, v: str) -> str:
        try:
            return parse_link(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("inject")
    @classmethod
    def _check_inject(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_faults(v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

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

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths_for_nodes(cls, values: Any) -> Any:
        # actors that load their own images stand elsewhere: a relative path is the driver's directory's
        if isinstance(values, dict) and values.get("images_from") == "node":
            for key in ("data_root", "cache_dir"):
                if values.get(key):
                    values = values | {key: str(Path(values[key]).resolve())}
        return values

    @model_validator(mode="after")
    def _check_combination(self, info: ValidationInfo) -> RaylocalConfig:
        check_combination(self, recorded=bool(info.context and info.context.get("recorded")))
        return self

    def one_part(self) -> bool:
        """Whether the run trains the whole model as one part (its split plays no role)."""
        return self.schedule in ("e2e", "data-parallel")

    def part_count(self) -> int:
        """How many parts the run trains: ``--part-spec`` names them, else ``--parts``."""
        return self.parts if self.part_spec is None else self.part_spec.count("|") + 1

    def part_lrs(self, n_parts: int) -> list[float]:
        return self.lr * n_parts if len(self.lr) == 1 else list(self.lr)

    def sectioned(self) -> dict[str, dict[str, Any]]:
        """The settings grouped by section, as run directories and Tune's best.json hold them."""
        values = self.model_dump()
        return {section: {name: values[name] for name in names} for section, names in SECTIONS.items()}

    def glow_kwargs(self) -> dict[str, Any]:
        return dict(
            n_levels=self.n_levels,
            depth=self.depth,
            hidden=self.hidden,
            affine=self.coupling == "affine",
            lu=self.permutation == "lu",
            n_bits=self.n_bits,
            bf16=self.precision == "bf16",
        )


def check_combination(c: RaylocalConfig, recorded: bool = False) -> None:
    """Settings that are valid alone but not together (pydantic shows the ValueError in one line).
    A ``recorded`` config (a finished run's) may hold a setting its rival ignored then."""
    if len(c.lr) not in (1, c.parts):
        raise ValueError(f"lr has {len(c.lr)} values but there are {c.parts} parts")
    if c.alternate_every and c.schedule != "alternating":
        raise ValueError(f"alternate_every={c.alternate_every} applies to the alternating schedule, not {c.schedule!r}")
    if c.lr_rule != "none" and c.schedule not in ("simultaneous", "alternating"):
        raise ValueError(
            f"lr_rule={c.lr_rule!r} compares the parts while they train together: it applies to the "
            f"simultaneous and alternating schedules, not {c.schedule!r}"
        )
    if c.lr_rule != "none" and len(c.lr) > 1:
        raise ValueError(f"lr_rule={c.lr_rule!r} derives the per-part LRs from one --lr, got {len(c.lr)}")
    if c.average_overlap and (not c.average_every or c.outer_lr):
        raise ValueError("average_overlap applies to local SGD (average_every > 0) without DiLoCo's outer_lr")
    if c.finetune_scope == "boundary" and c.finetune_workers > 1:
        raise ValueError("finetune_scope='boundary' is for a one-worker fine-tune; DDP trains every layer")
    if c.schedule in RIVAL_SCHEDULES:
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
    unused = dict(RIVAL_UNUSED)
    other = DATA_PARALLEL_ONLY if c.schedule == "pipeline" else PIPELINE_ONLY
    owner = "data-parallel" if c.schedule == "pipeline" else "pipeline"
    unused |= {name: f"does not use it (it is the {owner} schedule's)" for name in other}
    if c.schedule == "data-parallel":
        unused["wire_dtype"] = "sends float32 gradients or weights (--ddp-compression shapes DDP's)"
        unused["queue_size"] = "has no queue of latents between parts"
        unused["gpus_per_part"] = "gives each worker a whole GPU when there is one for each (--device)"
        unused["placement"] = "leaves its workers' placement to Ray Train"
    for name, instead in unused.items():
        value = getattr(c, name)
        if value != RaylocalConfig.model_fields[name].default:
            raise ValueError(f"{name}={value!r}: a {c.schedule} run {instead}")


def check_rival(c: RaylocalConfig, recorded: bool = False) -> None:
    """A rival's run trains end to end from its first step, and once; of the
    faults, its workers or stages take only a straggler. A setting it would
    ignore is refused, unless ``recorded``: a finished run's record stays readable."""
    if not recorded:
        _refuse_unused(c)
    if c.epochs < 1:
        raise ValueError(f"epochs={c.epochs}: a {c.schedule} run trains at least one epoch")
    if c.finetune_epochs:
        raise ValueError(f"finetune_epochs={c.finetune_epochs}: the {c.schedule} schedule trains end to end throughout")
    if c.resume:
        raise ValueError(f"resume: a {c.schedule} run does not resume; start it again")
    unsupported = sorted({f.kind for f in parse_faults(c.inject or "")} - {"straggle"})
    if unsupported:
        raise ValueError(f"inject: a {c.schedule} run takes only straggle faults, not {', '.join(unsupported)}")
    if c.schedule == "pipeline" and c.part_count() < 2:
        raise ValueError(f"a pipeline needs at least 2 stages (--parts or --part-spec), got {c.part_count()}")
    if c.schedule == "pipeline" and c.wire_dtype != "float32":
        raise ValueError(f"wire_dtype={c.wire_dtype!r}: the pipeline sends float32 activations and gradients")
    if c.schedule == "pipeline" and c.batch_size % c.micro_batches:
        raise ValueError(f"batch_size={c.batch_size} does not split into micro_batches={c.micro_batches}")
    if c.schedule == "data-parallel" and c.batch_size % c.workers:
        raise ValueError(f"batch_size={c.batch_size} does not split among workers={c.workers}")


def data_source(config: RaylocalConfig) -> DataSource:
    """The config's data section as a loadable description."""
    return DataSource(
        config.dataset, config.data_root, config.download, config.cache_dir, config.validation, config.train_subset,
        config.test_subset,
    )  # fmt: skip


def format_validation_error(err: ValidationError, source: str) -> str:
    """Pydantic's message, shown briefly: the first problem on one line."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])  # none for settings refused together
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
        if key in SECTIONS and isinstance(value, dict):
            for name, inner in value.items():
                if SECTION_OF.get(name, key) != key:
                    raise ConfigError(f"{source}: {key}.{name}: belongs to section {SECTION_OF[name]!r}")
                if name in flat:
                    raise ConfigError(f"{source}: {name} is given twice")
                flat[name] = inner
        elif key in flat:
            raise ConfigError(f"{source}: {key} is given twice")
        else:
            flat[key] = value
    return flat


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
    """An argparse parser with one flag per RaylocalConfig field.

    Values stay strings: pydantic converts and validates them, so a bad value
    gets the same message from the command line as from a config file. Flags
    default to "not given" so that only what the user typed overrides the file;
    ``--help`` shows the defaults the calling script really uses.
    """
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON file of options, flat or by section (command-line flags override it)")
    groups = {section: parser.add_argument_group(f"{section} options") for section in SECTIONS}
    for name, field in RaylocalConfig.model_fields.items():
        group = groups[SECTION_OF[name]]
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
