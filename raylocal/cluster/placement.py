"""One ``Placement``: what a run asks of the cluster (bundles, threads, devices),
decided once, before anything starts, from its config and the cluster's live
nodes (``raylocal.cluster.preflight.plan_ray_run``).

A ``Placement`` holds the bundles of what the run places: its parts, model
service and one-worker fine-tune (``PartBundles``; a pipeline rival's stages
too), and its data-parallel workers (``WorkerBundles``: a DDP fine-tune's, or
the data-parallel rival's). A Tune study reserves each trial's process and
parts as one group (``TrialGroup``), with the parts' shares fixed for the whole
study; inside the trial the run's ``PartBundles`` are those same bundles. Each
``plan`` is a pure function of the config and the nodes, so it is tested
without Ray, and one function checks whether a group can be placed at all
(``check_placeable``: a run's parts and service, a trial's group); the devices
are read in each actor, from what Ray granted it.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from raylocal.core.config import RaylocalConfig
from raylocal.core.data import NodeImages
from raylocal.errors import ClusterError

# What a service (the run's evaluations, a Tune trial's own process) reserves of
# a GPU: the parts leave this much of theirs free, so it fits beside any of them.
SERVICE_GPU_SHARE = 0.1
# What every bundle asks of ``--worker-resource``: a token that keeps the work
# on the nodes that carry it, whatever their number of units.
WORKER_RESOURCE_SHARE = 0.001
FINETUNE_MAX_CPUS = 8.0  # a worker that has the cluster to itself takes a node's CPUs, up to this
PART_MAX_CPUS = 4.0  # a part's default share of the CPUs, at most
TRIAL_PART_CPUS = 0.5  # a Tune trial's part, by default: trials share the cluster


def live_nodes() -> list[dict[str, float]]:
    """The total resources of every live node of the cluster."""
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def worker_nodes(config: RaylocalConfig, nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The nodes the run may work on: those that carry ``--worker-resource`` when it is set."""
    return _carrying(config.cluster.worker_resource, nodes)


def _carrying(resource: str | None, nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    return [r for r in nodes if r.get(resource)] if resource else nodes


def _pinned(config: RaylocalConfig, bundle: dict[str, float]) -> dict[str, float]:
    """``bundle``, kept to the nodes that carry ``--worker-resource`` when it is set."""
    resource = config.cluster.worker_resource
    return bundle | {resource: WORKER_RESOURCE_SHARE} if resource else bundle


def _sum(nodes: list[dict[str, float]], key: str) -> float:
    return sum(n.get(key, 0.0) for n in nodes)


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _hosts(bundle: dict[str, float], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The nodes that carry every resource ``bundle`` asks for (a GPU share, the
    ``--worker-resource``): the only ones Ray can put it on, whatever its CPUs."""
    return [n for n in nodes if all(n.get(k, 0.0) > 0 for k, v in bundle.items() if v > 0 and k != "CPU")]


def _holding(hosts: list[dict[str, float]], nodes: list[dict[str, float]], every: str) -> str:
    """Who holds what a check counted: ``every`` node of ``nodes``, or only the ``hosts`` among them."""
    return every if len(hosts) == len(nodes) else f"the {len(hosts)} node(s) that can hold them have"


def _short_of(need: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """The first resource the nodes' totals hold less of than ``need``, if any."""
    return next((k for k, v in need.items() if _sum(nodes, k) + 1e-9 < v), None)


def _gpus_pack(asks: list[float], nodes: list[dict[str, float]]) -> bool:
    """Do GPU asks fit the nodes' GPUs as Ray places them: a share under 1 on one
    GPU, a whole ask on whole GPUs? (First fit, largest first; the asks here are
    K equal shares and a service's, for which that is exact.)"""
    free = [1.0] * _whole_gpus(nodes)
    for ask in sorted((a for a in asks if a > 0), reverse=True):
        if ask >= 1.0 - 1e-9:
            whole = [i for i, f in enumerate(free) if f >= 1.0 - 1e-9][: int(round(ask))]
            if len(whole) < int(round(ask)):
                return False
            for i in whole:
                free[i] = 0.0
            continue
        slot = next((i for i, f in enumerate(free) if f + 1e-9 >= ask), None)
        if slot is None:
            return False
        free[slot] -= ask
    return True


def _whole_gpus(nodes: list[dict[str, float]]) -> int:
    return sum(int(n.get("GPU", 0.0) + 1e-9) for n in nodes)


def _unpacked_gpus(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """Why these bundles' GPU shares cannot be placed on the nodes' GPUs, if they cannot."""
    asks = [b.get("GPU", 0.0) for b in bundles]
    if not any(asks) or _gpus_pack(asks, nodes):
        return None
    shares = sorted({a for a in asks if a}, reverse=True)
    return (
        f"GPU shares of {', '.join(f'{a:g}' for a in shares)} for {sum(1 for a in asks if a)} bundles do not pack "
        f"into the {_whole_gpus(nodes)} GPU(s) of this cluster (Ray puts each "
        "share under 1 on one GPU); lower --gpus-per-part"
    )


@dataclass(frozen=True)
class GroupWords:
    """How the one line that refuses a group of bundles names it."""

    group: str  # all of its bundles, as "2 parts of {CPU 1} and the model service"
    spread: str  # what spread puts on nodes of their own, as "each of the 2 parts"
    verb: str = "need"  # after ``group``


def check_placeable(
    named: list[tuple[str, dict[str, float]]], nodes: list[dict[str, float]], strategy: str, words: GroupWords,
    resource: str | None = None, spread: int | None = None,
) -> None:  # fmt: skip
    """Can these bundles (each with what it is for, as "a part") be placed on
    ``nodes`` at all, by the cluster's totals: each on some node of
    ``--worker-resource`` (when set), under STRICT_SPREAD the first ``spread`` (all by
    default: the rest are another group's) each on its own node, all of them by the
    totals of the nodes that can hold them, and their GPU shares as Ray packs them?
    Said in one line, at once, instead of after a placement timeout (or, under
    Tune, a warning every minute and no end)."""
    bundles = [bundle for _, bundle in named]
    usable = _carrying(resource, nodes)
    if not usable:
        raise ClusterError(f"--worker-resource {resource}: no node of this cluster ({len(nodes)} node(s)) has it; "
                           f"start the worker nodes with --resources '{{\"{resource}\": 1}}'")  # fmt: skip
    where = f"node with resource {resource!r}" if resource else "node of this cluster"
    for name, bundle in named:
        if not any(_fits(bundle, node) for node in usable):
            totals = ", ".join(f"{k} {_sum(usable, k):g}" for k in ("CPU", "GPU"))
            raise ClusterError(
                f"{name}'s bundle of {_shown(bundle)} fits no {where} ({len(usable)} node(s), totals {totals}); "
                "lower --cpus-per-part or --gpus-per-part"
            )
    apart = bundles[: len(bundles) if spread is None else spread]
    able = [node for node in usable if any(_fits(b, node) for b in apart)]
    if strategy == "STRICT_SPREAD" and len(able) < len(apart):
        raise ClusterError(
            f"--placement spread puts {words.spread} on its own node: {len(apart)} nodes, but only {len(able)} "
            "can hold one; use --placement pack or more nodes"
        )
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU") if any(k in b for b in bundles)}
    hosts = _hosts(apart[-1], usable)  # the nodes that carry every kind of resource a part asks for
    k = _short_of(need, hosts)
    if k is not None:
        every = f"the nodes with resource {resource!r} have" if resource else "the cluster has"
        raise ClusterError(
            f"{words.group} {words.verb} {k} {need[k]:g}, {_holding(hosts, usable, every)} {_sum(hosts, k):g}; "
            "use fewer parts, or lower --cpus-per-part or --gpus-per-part"
        )
    unpacked = _unpacked_gpus(bundles, usable)  # enough by the totals: and as Ray places GPU shares?
    if unpacked:
        raise ClusterError(f"{words.group}: {unpacked}")


def strategy_of(config: RaylocalConfig) -> str:
    """The placement-group strategy of ``--placement``: one part per node (spread), or packed."""
    return "STRICT_SPREAD" if config.cluster.placement == "spread" else "PACK"


def part_bundle(config: RaylocalConfig, cpus: float, gpus: float) -> dict[str, float]:
    """A part actor's bundle (a pipeline stage's too): its CPUs, its GPU share if any,
    kept to the ``--worker-resource`` nodes; a run's and a Tune trial's alike."""
    return _pinned(config, {"CPU": cpus} | ({"GPU": gpus} if gpus else {}))


def _shown(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k} {v:g}" for k, v in bundle.items()) + "}"


@dataclass(frozen=True)
class PartBundles:
    """A run's resources on one cluster: a bundle per part actor, the model
    service's bundle, the bundle of a worker that has the cluster to itself (the
    fine-tune), torch threads per part, and how the parts spread over nodes."""

    n_parts: int
    part: dict[str, float]
    service: dict[str, float]
    work: dict[str, float]
    threads: int  # a part's torch threads, and the model service's (its bundle is a part's)
    work_threads: int  # the fine-tune worker's
    strategy: str  # PACK, or STRICT_SPREAD: one part per node
    nodes: list[dict[str, float]] = field(default_factory=list, repr=False)

    @classmethod
    def plan(cls, config: RaylocalConfig, n_parts: int, nodes: list[dict[str, float]] | None = None) -> PartBundles:
        """The placement of ``n_parts`` parts on ``nodes`` (the live ones by default).
        By default the parts and one service share the CPUs; each part gets a GPU
        when there is one for each, else a share of one."""
        nodes = live_nodes() if nodes is None else nodes
        usable = worker_nodes(config, nodes)
        whole_gpus = 0 if config.cluster.device == "cpu" else int(_sum(usable, "GPU"))
        gpus = config.cluster.gpus_per_part
        if gpus is None:
            # Fewer GPUs than parts: share them. A fractional bundle sits on one device,
            # so 1/ceil(K/G) each fits (G/K may not: 3 parts of 2/3 on 2 GPUs)
            gpus = (1.0 - SERVICE_GPU_SHARE) / math.ceil(n_parts / whole_gpus) if whole_gpus else 0.0
        cpus = config.cluster.cpus_per_part
        if cpus is None:
            # bundles with a GPU share go only to GPU nodes: the CPUs shared out are theirs, not a CPU-only head's
            pool = _hosts({"GPU": gpus}, usable) or usable
            cpus = max(min((_sum(pool, "CPU") or 1.0) / (n_parts + 1), PART_MAX_CPUS), 0.01)
        work_pool = [n for n in usable if _fits({"GPU": 1.0}, n)] if whole_gpus else usable
        work_cpus = config.cluster.cpus_per_part or max(
            [min(r.get("CPU", 0.0), FINETUNE_MAX_CPUS) for r in work_pool] + [1.0]
        )
        return cls(
            n_parts=n_parts,
            part=part_bundle(config, cpus, gpus),
            service=_pinned(config, {"CPU": cpus} | ({"GPU": SERVICE_GPU_SHARE} if gpus else {})),
            work=_pinned(config, {"CPU": work_cpus} | ({"GPU": 1.0} if whole_gpus else {})),
            threads=config.cluster.threads or max(1, int(cpus)),
            work_threads=config.cluster.threads or max(1, int(work_cpus)),
            strategy=strategy_of(config),
            nodes=nodes,
        )

    @property
    def part_cpus(self) -> float:
        return self.part["CPU"]

    @property
    def part_gpus(self) -> float:
        return self.part.get("GPU", 0.0)

    def shown_gpus(self, gpus: float) -> dict[str, Any]:
        """Actor options for a process granted ``gpus``: on a cluster with GPUs, one
        granted none is shown none (Ray 2.60 leaves it every GPU, and torch.compile's
        cache key alone would open a CUDA context on GPU 0 beside the parts there)."""
        if gpus > 0 or _sum(self.nodes, "GPU") == 0:
            return {}
        return {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}

    def check(self, with_service: bool = True) -> None:
        """Can the bundles be placed on this cluster at all, by its totals
        (``check_placeable``)? Whether they are free now is another matter: a busy
        cluster queues the run. ``with_service``: the run's model service needs its
        bundle too (the pipeline rival has none)."""
        if in_trial(self.n_parts):
            return  # the parts live in the trial's own group, which Tune has placed
        n = self.n_parts
        and_service = " and the model service" if with_service else ""
        words = GroupWords(f"{n} parts of {_shown(self.part)}{and_service}", f"each of the {n} parts")
        named = [("a part", self.part)] * n + ([("the model service", self.service)] if with_service else [])
        check_placeable(named, self.nodes, self.strategy, words, spread=n)  # (the service: a group of its own)

    def reserve_parts(self) -> tuple[PlacementGroup, int, bool]:
        """The placement group of the parts, the bundle index of part 1, and whether
        the group is ours to remove. Inside a Ray Tune trial the trial's own group
        is used (bundle 0 is the trial's driver, bundles 1..K its parts), so trials
        never starve each other."""
        current = ray.util.get_current_placement_group()
        if in_trial(self.n_parts):
            return current, len(current.bundle_specs) - self.n_parts, False
        pg = placement_group([dict(self.part)] * self.n_parts, strategy=self.strategy)
        what = f"{self.n_parts} parts of {self.part} with strategy {self.strategy}"
        _wait_ready(pg, f"{what} on this cluster ({len(self.nodes)} node(s), {ray.cluster_resources()}); "
                    "lower --cpus-per-part or use --placement pack")  # fmt: skip
        return pg, 0, True

    def reserve_service(self) -> PlacementGroup:
        """A placement group of the model service's one bundle."""
        pg = placement_group([self.service], strategy="PACK")
        _wait_ready(pg, f"the model service's bundle {self.service} on this cluster ({ray.cluster_resources()})")
        return pg


def in_trial(n_parts: int) -> bool:
    """Is this process a Ray Tune trial whose group already holds the parts' bundles?"""
    current = ray.util.get_current_placement_group()
    return current is not None and len(current.bundle_specs) > n_parts


def _wait_ready(pg: PlacementGroup, what: str) -> None:
    ready, _ = ray.wait([pg.ready()], timeout=float(os.environ.get("RAYLOCAL_PLACEMENT_TIMEOUT", 60)))
    if not ready:
        remove_placement_group(pg)
        raise ClusterError(f"cannot place {what}")


@dataclass(frozen=True)
class TrialGroup:
    """A Tune trial's placement group: its own process first (it evaluates the
    assembled model, a part's CPUs by default, and a share of a GPU when its
    parts have GPUs), then one bundle per part; every bundle kept to the nodes of
    ``--worker-resource``, and with ``--placement spread`` each on its own node
    (the trial's process too: one group cannot spread only some of its bundles)."""

    bundles: list[dict[str, float]]
    strategy: str
    worker_resource: str | None = None

    @classmethod
    def plan(cls, base: RaylocalConfig, cpus_per_trial: float | None = None) -> TrialGroup:
        cpus = base.cluster.cpus_per_part or TRIAL_PART_CPUS
        gpus = base.cluster.gpus_per_part or 0.0
        trial = {"CPU": cpus if cpus_per_trial is None else cpus_per_trial} | (
            {"GPU": min(SERVICE_GPU_SHARE, gpus)} if gpus else {}
        )
        bundles = [_pinned(base, trial)] + [part_bundle(base, cpus, gpus)] * base.part_count()
        return cls(bundles, strategy_of(base), base.cluster.worker_resource)

    def factory(self) -> Any:
        """The group as Tune reserves it for each trial."""
        from ray import tune

        return tune.PlacementGroupFactory(self.bundles, strategy=self.strategy)

    def check(self, nodes: list[dict[str, float]]) -> None:
        """Can one trial's bundles be placed on these nodes at all (``check_placeable``)?
        Said in one line before the study starts: Tune would only warn, every
        minute, and wait forever."""
        parts = len(self.bundles) - 1
        words = GroupWords(
            f"a trial of {parts} parts and its own process", f"a trial's process and each of its {parts} parts",
            verb="needs",
        )  # fmt: skip
        check_placeable([("a trial", b) for b in self.bundles], nodes, self.strategy, words, self.worker_resource)


def trial_shares(
    base: RaylocalConfig, nodes: list[dict[str, float]], concurrent: int, cpus_per_trial: float | None = None
) -> dict[str, float]:
    """The fixed CPU and GPU shares of every trial's parts in a Tune study (so that
    the cluster holds whole trials): the flags', else ``TRIAL_PART_CPUS`` and the
    default GPU share of the GPUs on the nodes a trial may use, for the trials that
    can run at once (``concurrent``, and no more than the CPUs hold: the GPU nodes'
    when the parts get GPU shares). A
    default share that rounds to nothing is refused: the trials would train on CPUs."""
    cpus = base.cluster.cpus_per_part or TRIAL_PART_CPUS
    gpus = base.cluster.gpus_per_part
    if gpus is None:
        usable = worker_nodes(base, nodes)
        per_trial = (cpus if cpus_per_trial is None else cpus_per_trial) + cpus * base.part_count()
        cluster_gpus = _sum(usable, "GPU")
        on_gpus = base.cluster.device != "cpu" and int(cluster_gpus + 1e-9) > 0
        # bundles with a GPU share sit on GPU nodes only: their CPUs, not a CPU-only head's, bound the trials at once
        pool = _hosts({"GPU": 1.0}, usable) if on_gpus else usable
        concurrent = max(1, min(concurrent, int(_sum(pool, "CPU") / per_trial + 1e-9)))
        gpus = default_gpu_share(base, cluster_gpus, concurrent)
        if gpus == 0.0 and on_gpus:
            raise ClusterError(
                f"{concurrent} trials at once of {base.part_count()} parts and their own process leave each part "
                f"no GPU share on {int(cluster_gpus + 1e-9)} GPU(s); give --max-concurrent or --gpus-per-part"
            )
        require_gpu_share(base, gpus, "the trials' parts")  # (after: with GPUs there, the share is what is short)
    return {"cpus_per_part": cpus, "gpus_per_part": gpus}


def default_gpu_share(config: RaylocalConfig, cluster_gpus: float, concurrent: int) -> float:
    """Each part's GPU share in a Tune study when ``--gpus-per-part`` is not given:
    none without GPUs (or with ``--device cpu``), else an equal share for every
    bundle of the trials that run at once (K parts and the trial's own process
    each), rounded down so that they fit the cluster's GPUs together. A
    fractional bundle sits on one GPU, so each GPU must hold ceil(bundles / GPUs)
    of them: G/B each may not fit (4 parts and a trial of 0.6 on 3 GPUs)."""
    whole_gpus = int(cluster_gpus + 1e-9)
    if config.cluster.device == "cpu" or whole_gpus <= 0:
        return 0.0
    per_gpu = math.ceil((config.part_count() + 1) * max(concurrent, 1) / whole_gpus)
    return min(1.0 - SERVICE_GPU_SHARE, math.floor(1000 / per_gpu) / 1000)


def require_gpu_share(config: RaylocalConfig, gpus: float, who: str) -> None:
    """``--device cuda`` means a GPU for every part: a plan that gives them none (no GPU on
    the nodes they may use) is refused, not trained on CPUs."""
    if config.cluster.device == "cuda" and not gpus:
        resource = config.cluster.worker_resource
        where = f"the nodes with resource {resource!r} offer none" if resource else "it offers none"
        raise ClusterError(f"--device cuda: {who} get no GPU on this cluster ({where}); "
                           "use --device auto or cpu, or a cluster with GPUs")  # fmt: skip


def data_parallel_uses_gpus(config: RaylocalConfig, workers: int, gpus: float) -> bool:
    """One whole GPU per worker, or none: DDP on fewer GPUs than workers is
    refused with ``--device cuda`` and, with ``auto``, runs on CPUs and says so."""
    if config.cluster.device == "cpu" or gpus == 0:
        return False
    if gpus >= workers:
        return True
    message = f"{workers} data-parallel workers need a GPU each, the cluster has {gpus:g}"
    if config.cluster.device == "cuda":
        raise ClusterError(f"{message}; use fewer workers (--workers, --finetune-workers) or --device cpu")
    print(f"note: {message}: they train on CPUs", file=sys.stderr)
    return False


# Ray holds resource amounts in units of 1/10000 and rounds to the nearest:
# a share is rounded down to a whole unit, so that its bundles fit where we counted them.
RESOURCE_UNITS = 10_000


def whole_bundles(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many whole ``bundle``s a node of these resources holds."""
    return min(int(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def equal_share(nodes: list[dict[str, float]], workers: int, gpu: bool = False) -> float:
    """The most CPUs each of ``workers`` equal workers can have when every node
    holds as many whole workers as fit (each worker on one node; with ``gpu``,
    a whole GPU each too)."""
    shares = {n.get("CPU", 0.0) / j for n in nodes for j in range(1, workers + 1)}
    for share in sorted({math.floor(s * RESOURCE_UNITS + 1e-6) / RESOURCE_UNITS for s in shares}, reverse=True):
        bundle = {"CPU": share} | ({"GPU": 1.0} if gpu else {})
        if share > 0 and sum(whole_bundles(bundle, n) for n in nodes) >= workers:
            return share
    return max((_sum(nodes, "CPU") or 1.0) / workers, 0.01)  # they do not fit at any share: the check says so


@dataclass(frozen=True)
class WorkerBundles:
    """N data-parallel workers (a DDP or local-SGD run): how many, each one's
    bundle and threads, GPUs or not. Planned once, before the run starts (``plan_ray_run``)."""

    count: int
    use_gpu: bool
    worker: dict[str, float]
    threads: int

    @classmethod
    def plan(
        cls, config: RaylocalConfig, workers: int, cpus_per_worker: float | None = None, nodes: list | None = None
    ) -> WorkerBundles:
        """By default each worker gets the largest equal share of CPUs that places
        all of them, node by node, on the nodes they may work on."""
        pool = worker_nodes(config, live_nodes() if nodes is None else nodes)
        use_gpu = data_parallel_uses_gpus(config, workers, _sum(pool, "GPU"))
        cpus = cpus_per_worker or equal_share(pool, workers, use_gpu)
        return cls(workers, use_gpu, _pinned(config, {"CPU": cpus}), config.cluster.threads or max(1, int(cpus)))

    def check(self, nodes: list | None = None) -> None:
        """Can all the workers' bundles be placed on this cluster at all, node
        by node (on the nodes of ``--worker-resource``, with a GPU each on GPUs)?"""
        nodes = live_nodes() if nodes is None else nodes
        bundle = self.worker | ({"GPU": 1.0} if self.use_gpu else {})  # Ray Train adds a GPU per worker
        placed = sum(whole_bundles(bundle, node) for node in nodes)
        if placed == 0:
            raise ClusterError(
                f"a data-parallel worker needs {_shown(bundle)} and no node of this cluster has that much "
                f"({len(nodes)} node(s)); lower --cpus-per-part, or start nodes with the --worker-resource"
            )
        if placed < self.count:
            raise ClusterError(
                f"{self.count} data-parallel workers of {_shown(bundle)} need {self.count} places, the cluster's "
                f"nodes hold {placed} (each worker on one node); use fewer --workers or lower --cpus-per-part"
            )


@dataclass(frozen=True)
class Placement:
    """What a Ray run was planned to use, before anything started: the parts'
    (or pipeline stages') bundles, the data-parallel workers' (a DDP fine-tune's,
    or the data-parallel rival's), and the description each actor's node loads
    the training images from (``--images-from node``; None: the driver's copy)."""

    parts: PartBundles | None
    workers: WorkerBundles | None
    node_images: NodeImages | None

    def train_images(self, train: Any) -> Any:
        """What each training actor is sent for its images: the node's description,
        else the driver's copy put in the object store once (Ray resolves the
        reference where it is an argument)."""
        return self.node_images or ray.put(train)


# ------------------------------------------------------------ devices


def check_torch_sees_gpus(granted: list) -> None:
    """In a process Ray granted GPUs: torch must see them. The pinned wheel is a
    CUDA 13 build; on an older NVIDIA driver torch sees no GPU while Ray still
    counts them, and the work would die on its first CUDA call."""
    if granted and not torch.cuda.is_available():
        raise ClusterError(
            f"Ray granted GPU(s) {granted} but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
            "the NVIDIA driver is too old for this wheel (README: GPUs); install a torch build for your driver, "
            "or run with --device cpu"
        )


def assigned_device(gpu_ids: list, visible: str | None) -> torch.device:
    """The torch device of the GPU Ray assigned to this process (its lowest id),
    as ``ray.train.torch.get_device`` maps it: the position of that id in
    CUDA_VISIBLE_DEVICES (Ray narrows it to the assigned ids; a process that
    sees more GPUs than it was granted must still use its own). CPU when none."""
    if not gpu_ids:
        return torch.device("cpu")
    first = str(min(gpu_ids, key=lambda g: int(g) if str(g).isdigit() else str(g)))
    order = [v.strip() for v in visible.split(",")] if visible else []
    index = order.index(first) if first in order else (int(first) if first.isdigit() and not order else 0)
    return torch.device(f"cuda:{index}")


def train_worker_env(use_gpu: bool) -> dict[str, dict[str, str]]:
    """The runtime env of Ray Train workers: those granted no GPU see none. Ray
    2.60 leaves every GPU visible to them, and torch's own code that asks
    ``torch.cuda.is_available()`` then touches one (PowerSGD's hook synchronises
    the bucket's device, a CPU one on a GPU host: an error)."""
    return {} if use_gpu else {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}


def train_worker_device(config: RaylocalConfig) -> str:
    """The device of a Ray Train worker: the one Ray Train assigned it."""
    import ray.train.torch

    if config.cluster.device == "cpu":
        return "cpu"
    check_torch_sees_gpus(ray.get_gpu_ids())
    return str(ray.train.torch.get_device())


def actor_device(config: RaylocalConfig) -> torch.device:
    """The device of this Ray actor or task: the GPU Ray granted it, else CPU
    (never ``torch.cuda.is_available()``: Ray 2.60 leaves the GPUs visible to a
    process granted none)."""
    granted = ray.get_gpu_ids() if config.cluster.device != "cpu" else []
    check_torch_sees_gpus(granted)
    return assigned_device(granted, os.environ.get("CUDA_VISIBLE_DEVICES"))
