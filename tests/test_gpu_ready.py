"""What a GPU cluster would show, checked on the CPU: devices, copies, control
tensors and flags (the suite itself is pinned to the CPU: see conftest)."""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import pytest
import ray
import torch

from raylocal.baselines.ddp import DataParallelWorker
from raylocal.cluster.connect import actor_error
from raylocal.cluster.placement import (
    PartBundles,
    TrialGroup,
    WorkerBundles,
    assigned_device,
    check_torch_sees_gpus,
    data_parallel_uses_gpus,
    default_gpu_share,
    equal_share,
)
from raylocal.core.checkpoint import host_copy, load_checkpoint, save_checkpoint
from raylocal.core.config import RaylocalConfig
from raylocal.core.faults import Straggler
from raylocal.errors import ClusterError, ConfigError, SpecError
from raylocal.model.glow import Glow
from raylocal.pipeline.channel import PacketChannel
from raylocal.pipeline.worker import PartLoop, PartWorker, to_wire
from raylocal.training.trainer import build_glow, local_nll, require_compiler


def _config(**kw) -> RaylocalConfig:
    values = dict(
        n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64, warmup_steps=2, threads=1,
        parts=2, part_spec="1|2", schedule="async", epochs=1, samples=0, progress=False, device="cpu",
    )  # fmt: skip
    values.update(kw)
    return RaylocalConfig(**values)


def _images(n: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_the_suite_itself_runs_on_the_cpu(ray_session):
    from conftest import tiny_options

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    options = tiny_options("data", "runs")
    assert options[options.index("--device") + 1] == "cpu"


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_what_reaches_the_object_store_is_a_cpu_copy_at_the_wire_dtype(wire):
    config = _config(wire_dtype=wire, queue_size=100)
    worker = PartWorker(config, [(0, 8), (8, 15)], 0, (1, 8, 8), _images())
    outputs: list[torch.Tensor] = []
    step = worker.trainer.step

    def recording_step(x):
        result = step(x)
        outputs.append(result.output)
        return result

    worker.trainer.step = recording_step
    put: list[torch.Tensor] = []
    channel = PacketChannel(100)
    PartLoop(worker, None, channel, lambda t: put.append(t) or t, lambda r: r, n_steps=4).run()
    latents = [t for t in put if isinstance(t, torch.Tensor)]
    syncs = [t for t in put if isinstance(t, dict)]  # the weight syncs' state dicts
    assert len(latents) == 4 and syncs  # 4 steps (the init packet carries weights, no latent)
    assert all(v.device.type == "cpu" for state in syncs for v in state.values())
    out_ptrs = {o.untyped_storage().data_ptr() for o in outputs}
    for t in latents:
        assert t.device.type == "cpu" and t.dtype == getattr(torch, wire)
        assert t.untyped_storage().data_ptr() not in out_ptrs  # a copy, not the part's live output


def test_to_wire_copies_even_what_is_already_on_the_cpu_in_float32():
    x = torch.randn(2, 3)
    sent, ready = to_wire(x, torch.float32)
    x.add_(1.0)
    assert ready is None and not torch.equal(sent, x) and torch.equal(sent + 1.0, x)


def test_a_parts_checkpoint_state_is_a_copy_that_later_steps_do_not_move():
    worker = PartWorker(_config(), [(0, 8), (8, 15)], 0, (1, 8, 8), _images())
    worker.initialize(worker.init_batch())
    for _ in range(3):
        worker.trainer.step(worker.data_batch())
    state = worker.checkpoint_state()
    expected = copy.deepcopy(state)
    for _ in range(2):  # Adam's moments and the weights move in place
        worker.trainer.step(worker.data_batch())
    moments = state["trainer"]["optimizer"]["state"]
    assert moments and all(
        torch.equal(v, expected["trainer"]["optimizer"]["state"][i][k])
        for i, s in moments.items()
        for k, v in s.items()
    )
    assert all(torch.equal(v, expected["model"][k]) for k, v in state["model"].items())


def test_checkpoints_hold_cpu_tensors_and_host_copies_share_no_storage(tmp_path):
    live = {"w": torch.ones(3), "nested": [torch.zeros(2), {"m": torch.arange(3.0)}], "n": 4}
    copied = host_copy(live, copy=True)
    live["w"].add_(1.0)
    live["nested"][1]["m"].add_(1.0)
    assert torch.equal(copied["w"], torch.ones(3)) and torch.equal(copied["nested"][1]["m"], torch.arange(3.0))
    save_checkpoint(tmp_path / "c.pt", {"state": live})
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # no map_location: as saved
    assert raw["state"]["w"].device.type == "cpu"
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["state"]["w"], 2 * torch.ones(3))


class _Seen(Exception):
    pass


def test_the_data_parallel_control_tensors_are_made_on_the_workers_device():
    """NCCL all-reduces only CUDA tensors: the stop flag and the totals must be
    on the worker's device (here the meta device stands in for a GPU)."""
    worker = DataParallelWorker.__new__(DataParallelWorker)
    worker.device, worker.world, worker.idle_s, worker.hook = torch.device("meta"), 2, 0.0, None
    worker.sync_s = worker.rounds_s = 0.0
    worker.budget_clock = None
    worker.straggler, worker.began_at = Straggler([], 0), 0.0
    worker.model = torch.nn.Linear(2, 1)  # (not wrapped in DDP: no reducer timing)
    seen: list[torch.device] = []

    def all_reduce(tensor, op="sum"):
        seen.append(tensor.device)
        raise _Seen

    worker._all_reduce = all_reduce
    with pytest.raises(_Seen):
        worker.out_of_time(started=0.0, budget=1.0)
    with pytest.raises(_Seen):
        worker._finish([{"loss": 1.0}], 1.0, mailbox=None)
    assert seen == [torch.device("meta")] * 2


def test_a_data_parallel_workers_clocks_wait_for_its_device(monkeypatch):
    """NCCL's all-reduce returns once it is queued, and a step's kernels run after
    its calls return: a local-SGD round starts the wire once its all-reduce is done
    on the device, and the stop flag's wait starts after the step's own kernels."""
    import raylocal.baselines.ddp as ddp
    from raylocal.core.links import LinkSpec, Wire

    worker = DataParallelWorker.__new__(DataParallelWorker)
    worker.device, worker.world, worker.outer, worker.idle_s = torch.device("cpu"), 2, None, 0.0
    worker.model, worker.bytes_averaged, worker.sync_s, worker.rounds_s = torch.nn.Linear(2, 1), 0.0, 0.0, 0.0
    worker.budget_clock = None
    worker.link = LinkSpec.parse("bw=1Gbit")
    worker.wire = Wire(worker.link)
    order: list[str] = []
    monkeypatch.setattr(ddp, "wait_for", lambda device: order.append(f"wait {device}"))
    worker._all_reduce = lambda tensor, op="sum": order.append("all-reduce")
    deliver = worker.wire.deliver
    worker.wire.deliver = lambda nbytes, **kw: order.append("wire") or deliver(nbytes, **kw)
    worker.average()
    worker.out_of_time(started=0.0, budget=1e9)
    # the round's meeting (after the step's kernels), its all-reduce, the wire; then the stop flag's
    assert order == ["wait cpu", "all-reduce", "all-reduce", "wait cpu", "wire", "wait cpu", "all-reduce"]
    # a straggler's compute, timed for its wait, ends when the device has run the step; no straggler, no sync
    worker.hook, order[:] = None, []
    for factor in (1.0, 2.0):
        worker.straggler = Straggler([], 0, sleep=lambda s: order.append("straggle"))
        worker.straggler.factor = factor
        worker.straggle(time.perf_counter() - 1.0, 0.0)
    assert order == ["wait cpu", "straggle"]


def test_a_parts_compute_time_ends_when_its_device_has_run_the_step(monkeypatch):
    """The trainer's one sync is its loss, before the optimizer's kernels: on a GPU
    those run after step() returns. The part's compute time waits for them, or a
    downstream part's wait for its next latent would count them as idle."""
    import raylocal.pipeline.worker as worker_module

    worker = PartWorker(_config(), [(0, 8), (8, 15)], 0, (1, 8, 8), _images())
    order: list[str] = []
    step = worker.trainer.step
    worker.trainer.step = lambda x: order.append("step") or step(x)
    monkeypatch.setattr(worker_module, "wait_for", lambda device: order.append(f"wait {device}"))
    loop = PartLoop(worker, None, PacketChannel(100), lambda t: t, lambda r: r, n_steps=2)
    loop._computed = lambda seconds: order.append("counted")  # (also the data batch's time)
    loop.run()
    steps = [i for i, event in enumerate(order) if event == "step"]
    assert len(steps) == 2 and all(order[i : i + 3] == ["step", "wait cpu", "counted"] for i in steps), order


def test_torch_must_see_the_gpus_ray_granted(monkeypatch):
    check_torch_sees_gpus([])  # nothing granted: nothing to see
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ClusterError, match=r"granted GPU\(s\) \['0'\] but torch .* sees no GPU"):
        check_torch_sees_gpus(["0"])


@pytest.mark.parametrize(
    "ids,visible,expected",
    [
        ([], "0,1", "cpu"),
        (["2"], "2,3", "cuda:0"),  # Ray narrowed the visible GPUs to this process's
        (["2"], "0,1,2,3", "cuda:2"),  # it sees them all: its own is the third
        (["3", "2"], "0,1,2,3", "cuda:2"),  # several: the lowest id
        ([1], None, "cuda:1"),
    ],
)
def test_the_gpu_ray_assigned_maps_to_a_device_index_as_ray_train_maps_it(ids, visible, expected):
    assert assigned_device(ids, visible) == torch.device(expected)


def test_gpus_are_counted_only_on_the_nodes_of_the_worker_resource(monkeypatch):
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},  # a GPU node without the resource
        {"Alive": True, "Resources": {"CPU": 4.0, "workers": 1.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    bundle = PartBundles.plan(_config(device="auto", worker_resource="workers"), 3).work
    assert "GPU" not in bundle and bundle["CPU"] == 4.0
    assert PartBundles.plan(_config(device="auto"), 3).work["GPU"] == 1.0


def test_gpu_bundles_take_their_cpus_from_the_gpu_nodes_not_from_a_cpu_only_head():
    """A common cloud cluster: a CPU-only head with many CPUs beside a small GPU
    node. The parts' and the service's bundles carry GPU shares, so Ray can put
    them only on the GPU node: their default CPUs are that node's, shared out, and
    the one-worker fine-tune (a whole GPU) takes that node's CPUs, not the head's.
    Bundles that cannot fit there are refused at once, not after a placement timeout."""
    head, gpu_node = {"CPU": 16.0}, {"CPU": 4.0, "GPU": 1.0}
    three = {"parts": 3, "part_spec": None, "device": "auto"}
    plan = PartBundles.plan(_config(**three), 3, [head, gpu_node])
    assert plan.part == {"CPU": 1.0, "GPU": 0.3} and plan.service == {"CPU": 1.0, "GPU": 0.1}
    assert plan.work == {"CPU": 4.0, "GPU": 1.0} and plan.work_threads == 1  # (--threads 1 in _config)
    assert 3 * plan.part["CPU"] + plan.service["CPU"] <= gpu_node["CPU"]  # all of them on the GPU node at once
    plan.check()
    too_big = PartBundles.plan(_config(**three, cpus_per_part=2.0), 3, [head, gpu_node])
    with pytest.raises(ClusterError, match=r"^3 parts of \{CPU 2, GPU 0.3\} and the model service need CPU 8, "
                       r"the 1 node\(s\) that can hold them have 4; "):  # fmt: skip
        too_big.check()
    on_cpus = PartBundles.plan(_config(**(three | {"device": "cpu"})), 3, [head, gpu_node])
    assert on_cpus.part == {"CPU": 4.0} and on_cpus.work == {"CPU": 8.0}  # no GPU asked: every node's CPUs
    on_cpus.check()
    trial = TrialGroup.plan(_config(**three, cpus_per_part=2.0, gpus_per_part=0.2))  # a Tune trial's, likewise
    with pytest.raises(ClusterError, match=r"^a trial of 3 parts and its own process needs CPU 8, the 1 node\(s\) "
                       "that can hold them have 4; "):  # fmt: skip
        trial.check([head, gpu_node])
    TrialGroup.plan(_config(**three, cpus_per_part=0.5, gpus_per_part=0.2)).check([head, gpu_node])


def test_actors_granted_no_gpu_on_a_gpu_cluster_are_shown_none(monkeypatch, mnist_dir):
    """The part actors, the pipeline's stages and the model service, granted no GPU
    (--device cpu) on a cluster with GPUs, are shown none, as Ray Train's CPU
    workers are; granted a share, or on a cluster without GPUs, they start as before."""
    from raylocal.baselines import pipeline_on_ray
    from raylocal.cluster import parts_phase
    from raylocal.core.data import load_dataset
    from raylocal.run import service

    hidden = {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    gpu_cluster = [{"CPU": 16.0, "GPU": 2.0}]
    on_cpus = PartBundles.plan(_config(), 2, gpu_cluster)  # (--device cpu)
    on_gpus = PartBundles.plan(_config(device="auto"), 2, gpu_cluster)
    assert on_cpus.part_gpus == 0 and on_cpus.shown_gpus(0.0) == hidden
    assert on_gpus.part_gpus == 0.9 and on_gpus.shown_gpus(0.9) == {} and on_gpus.shown_gpus(0.1) == {}
    assert PartBundles.plan(_config(), 2, [{"CPU": 16.0}]).shown_gpus(0.0) == {}

    class Started(Exception):
        pass

    asked: list[dict] = []

    class Actor:  # records the options it is started with, then stops the start there
        @staticmethod
        def options(**options):
            asked.append(options)
            raise Started

    class Queue:
        def __init__(self, *_args, **_kwargs) -> None:
            pass

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(PartBundles, "reserve_parts", lambda self: (None, 0, False))
    monkeypatch.setattr(PartBundles, "reserve_service", lambda self: None)
    monkeypatch.setattr(parts_phase, "place_parts", lambda placement: (None, 0, False))
    for module, actor in ((parts_phase, "PartActor"), (pipeline_on_ray, "StageActor"), (service, "ServiceActor")):
        monkeypatch.setattr(module, actor, Actor)
    monkeypatch.setattr(parts_phase, "LatentQueue", Queue)
    monkeypatch.setattr(pipeline_on_ray, "LatentQueue", Queue)
    data = load_dataset("mnist", mnist_dir)
    for placement, env in ((on_cpus, hidden), (on_gpus, {})):
        asked.clear()
        with pytest.raises(Started):
            parts_phase.PartsPhase(_config(), data, mnist_dir, placement, "images")
        with pytest.raises(Started):
            pipeline_on_ray.train_pipeline_parallel(_config(), placement, "images", steps=1)
        with pytest.raises(Started):
            service.ServiceHandle("{}", data.shape, placement, 1, None, "cpu").start()
        assert [o.get("runtime_env") for o in asked] == [env.get("runtime_env")] * 3  # parts, stages, service


def test_a_placement_gives_the_parts_the_service_and_the_fine_tune_their_threads():
    """A part's threads are its CPUs (the model service's bundle is a part's), the
    fine-tune worker's are its node's CPUs (at most 8); --threads sets them all."""
    nodes = [{"CPU": 6.0}]
    plan = PartBundles.plan(_config(threads=None), 2, nodes)
    assert (plan.part_cpus, plan.service["CPU"], plan.threads) == (2.0, 2.0, 2)
    assert (plan.work["CPU"], plan.work_threads) == (6.0, 6)
    pinned = PartBundles.plan(_config(threads=1), 2, nodes)
    assert (pinned.threads, pinned.work_threads) == (1, 1)


def test_data_parallel_workers_share_and_are_checked_against_the_nodes_of_the_worker_resource():
    head = {"CPU": 8.0, "GPU": 2.0}  # a GPU node without the resource: it only coordinates
    workers = {"CPU": 2.0, "workers": 1.0}
    pinned = _config(device="auto", worker_resource="workers")
    plan = WorkerBundles.plan(pinned, 2, nodes=[head, workers])
    assert not plan.use_gpu and plan.worker["CPU"] == 1.0 and plan.worker["workers"] > 0  # 2 CPUs / 2 workers
    plan.check([head, workers])
    with pytest.raises(ClusterError, match=r"3 data-parallel workers of \{CPU 1, workers .*\} need 3 places, the "
                       "cluster's nodes hold 2"):  # fmt: skip
        WorkerBundles.plan(pinned, 3, 1.0, nodes=[head, workers]).check([head, workers])
    with pytest.raises(ClusterError, match="a data-parallel worker needs .* and no node of this cluster has that much"):
        plan.check([head])
    unpinned = WorkerBundles.plan(_config(device="cpu"), 2, nodes=[head, workers])
    assert not unpinned.use_gpu and unpinned.worker == {"CPU": 4.0}  # two of 4 fit on the head; two of 5 nowhere
    unpinned.check([head, workers])
    with pytest.raises(ClusterError, match="need 2 places, the cluster's nodes hold 1"):
        WorkerBundles(2, False, {"CPU": 5.0}, 5).check([head, workers])  # one of 5 fits, on the head alone
    on_head = WorkerBundles.plan(_config(device="auto"), 2, nodes=[head, workers])
    assert on_head.use_gpu and on_head.worker == {"CPU": 4.0}  # GPU workers share the GPU node's CPUs
    # a share places every worker node by node, a GPU each too, and Ray's 1/10000 units round it down
    cpus = [{"CPU": c} for c in (8.0, 2.0)]
    assert equal_share([{"CPU": 2.0}], 2) == 1.0 and equal_share([{"CPU": 2.0}], 4) == 0.5
    assert equal_share(cpus, 3) == 2.6666 and equal_share(cpus, 2) == 4.0 and equal_share([], 2) == 0.5
    assert equal_share([{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}], 3) == 1.5
    two_gpu_nodes = [{"CPU": 32.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert equal_share(two_gpu_nodes, 2, gpu=True) == 8.0  # not 16: the head holds one GPU worker
    with pytest.raises(ClusterError, match=r"3 data-parallel workers of \{CPU 2\} need 3 places, the cluster's nodes "
                       "hold 2"):  # fmt: skip
        WorkerBundles(3, False, {"CPU": 2.0}, 2).check([{"CPU": 3.0}, {"CPU": 3.0}])  # 6 CPUs, in threes
    on_gpus = WorkerBundles.plan(_config(device="auto"), 2, 1.0, nodes=[head, workers])
    assert on_gpus.use_gpu
    on_gpus.check([head, workers])  # Ray Train adds a GPU to each worker's bundle: only the head holds one
    with pytest.raises(ClusterError, match=r"of \{CPU 1, GPU 1\} need 3 places, the cluster's nodes hold 2"):
        dataclasses.replace(on_gpus, count=3).check([head, workers])


def test_data_parallel_runs_refuse_or_say_so_on_fewer_gpus_than_workers(capsys):
    assert data_parallel_uses_gpus(_config(device="auto"), 2, 2.0)
    assert not data_parallel_uses_gpus(_config(device="cpu"), 2, 2.0)
    assert not data_parallel_uses_gpus(_config(device="auto"), 2, 0.0)
    assert not data_parallel_uses_gpus(_config(device="auto"), 2, 1.0)
    assert capsys.readouterr().err.strip() == "note: 2 data-parallel workers need a GPU each, the cluster has 1: " \
        "they train on CPUs"  # fmt: skip
    with pytest.raises(ClusterError, match="2 data-parallel workers need a GPU each, the cluster has 1"):
        data_parallel_uses_gpus(_config(device="cuda"), 2, 1.0)


def test_tune_gives_every_bundle_a_gpu_share_by_default_and_they_fit_together():
    base = _config(parts=3, part_spec=None, device="auto")
    assert default_gpu_share(base, 0.0, 8) == 0.0
    assert default_gpu_share(base.replace(device="cpu"), 1.0, 8) == 0.0
    share = default_gpu_share(base, 1.0, 8)
    assert share == 0.031  # 8 trials x (3 parts + the trial's process) on one GPU, rounded down
    bundles = TrialGroup.plan(base.replace(gpus_per_part=share)).bundles
    assert 8 * sum(b.get("GPU", 0.0) for b in bundles) <= 1.0
    assert default_gpu_share(base, 4.0, 1) == 0.9  # one trial on 4 GPUs: a GPU per part, the service's share left
    # the bundles its part spec names (5 parts and the trial's process on 2 GPUs: 3 a GPU), not --parts
    assert default_gpu_share(base.replace(part_spec="1|1|1|1|1"), 2.0, 1) == 0.333  # (--parts 3: 0.5)
    # every trial's bundles, each on one GPU, placed first-fit largest first (by hand, not by the formula)
    for parts, gpus, concurrent in [(4, 3, 1), (5, 4, 1), (3, 5, 2), (3, 2, 3), (7, 8, 1), (2, 1, 4)]:
        config = _config(parts=parts, part_spec=None, device="auto")
        share = default_gpu_share(config, float(gpus), concurrent)
        sizes = [b.get("GPU", 0.0) for b in TrialGroup.plan(config.replace(gpus_per_part=share)).bundles]
        free = [1.0] * gpus
        for size in sorted(sizes * concurrent, reverse=True):
            k = next((k for k, f in enumerate(free) if f + 1e-9 >= size), None)
            assert k is not None, (parts, gpus, concurrent, share)
            free[k] -= size
        assert share >= 0.5 * (1 - 0.1) * gpus / ((parts + 1) * concurrent)  # not needlessly small


def test_convolutions_are_ieee_float32_unless_tf32_is_asked_for_and_deterministic_means_compiled_too():
    build_glow(_config(), (1, 8, 8))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    build_glow(_config(tf32=True, deterministic=True), (1, 8, 8))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    import torch._inductor.config as inductor

    build_glow(_config(compile=True, deterministic=True), (1, 8, 8))
    assert inductor.deterministic  # compiled: no kernel chosen by timing it on the device
    build_glow(_config(compile=True), (1, 8, 8))
    assert not inductor.deterministic
    build_glow(_config(), (1, 8, 8))  # (the flags are process-wide: leave the defaults)


def test_compile_on_cuda_without_pythons_headers_is_one_line(monkeypatch, tmp_path, fresh_libcuda_search):
    """Triton's CUDA launcher includes Python.h: without the headers the first
    compiled step would fail deep inside Triton, after the run had started."""
    import re
    import sysconfig

    monkeypatch.setenv("CC", "gcc")
    (tmp_path / "libcuda.so.1").write_bytes(b"")
    monkeypatch.setenv("TRITON_LIBCUDA_PATH", str(tmp_path))  # (Triton's own override: found)
    require_compiler(torch.device("cuda"))  # this host's Python has its headers
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    missing = re.escape(str(tmp_path / "Python.h"))
    with pytest.raises(ConfigError, match=rf"^--compile on CUDA needs Python's C headers for Triton; {missing} is"):
        require_compiler(torch.device("cuda"))


@pytest.fixture
def fresh_libcuda_search():
    """Triton caches where it found libcuda.so.1: each test that asks it starts and ends uncached."""
    from triton.backends.nvidia.driver import libcuda_dirs

    libcuda_dirs.cache_clear()
    yield
    libcuda_dirs.cache_clear()


def test_compile_on_cuda_without_libcuda_where_triton_looks_is_one_line(monkeypatch, tmp_path, fresh_libcuda_search):
    """Triton links its launchers against libcuda.so.1, found through the linker cache or
    LD_LIBRARY_PATH: a host without it (some containers) would fail at the first compiled step."""
    import triton.backends.nvidia.driver as driver

    monkeypatch.setenv("CC", "gcc")
    monkeypatch.delenv("TRITON_LIBCUDA_PATH", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))  # (holds no libcuda.so.1)
    cache = "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"
    monkeypatch.setattr(driver.subprocess, "check_output", lambda argv, **_: cache.encode())
    with pytest.raises(ConfigError, match=r"^--compile on CUDA needs libcuda\.so\.1 where Triton looks for it"):
        require_compiler(torch.device("cuda"))

    def no_ldconfig(argv, **_):
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    monkeypatch.setattr(driver.subprocess, "check_output", no_ldconfig)
    with pytest.raises(ConfigError, match=r"^--compile on CUDA needs libcuda\.so\.1"):
        require_compiler(torch.device("cuda"))
    (tmp_path / "libcuda.so.1").write_bytes(b"")  # found through LD_LIBRARY_PATH: accepted
    monkeypatch.setattr(driver.subprocess, "check_output", lambda argv, **_: cache.encode())
    require_compiler(torch.device("cuda"))


def test_compile_on_cuda_without_a_c_compiler_is_one_line(monkeypatch):
    import shutil

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^--compile on CUDA needs a C compiler for Triton"):
        require_compiler(torch.device("cuda"))


def test_bf16_runs_the_coupling_networks_in_bfloat16_and_keeps_the_objective_in_float32():
    kwargs = dict(n_levels=2, depth=2, hidden=16)
    torch.manual_seed(0)
    full = Glow((1, 8, 8), **kwargs)
    torch.manual_seed(0)
    half = Glow((1, 8, 8), **kwargs, bf16=True)
    half.load_state_dict(full.state_dict())
    for layer in list(full.layers) + list(half.layers):  # non-zero networks, so that their precision shows
        if hasattr(layer, "net"):
            torch.nn.init.normal_(layer.net.out.weight, std=0.05)
    half.load_state_dict(full.state_dict())
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    nll_full, y_full = local_nll(full.whole(), x)
    nll_half, y_half = local_nll(half.whole(), x)
    assert nll_half.dtype == torch.float32 and y_half.dtype == torch.float32
    gap = float((nll_half - nll_full).abs().max())
    assert 0 < gap < 1e-2  # rounded (bfloat16 keeps 8 bits of mantissa), not broken


def test_an_actors_own_error_reaches_the_user_as_its_one_line():
    own = SpecError("500 parts but the model has only 27 layers")
    task = ray.exceptions.RayTaskError("ServiceActor.plan", "Traceback ...", own)
    assert actor_error(task) is own
    bug = ray.exceptions.RayTaskError("PartActor.run", "Traceback ...\nValueError: boom", ValueError("boom\nmore"))
    assert str(actor_error(bug)) == "PartActor.run failed: ValueError: boom"
    died = ray.exceptions.RayActorError(
        error_msg="The actor died because of an error raised in its creation task, ray::PartActor.__init__() "
        '(pid=1, ip=1.2.3.4)\n  File "x.py", line 1, in __init__\n'
        "raylocal.errors.ClusterError: Ray granted GPU(s) ['0'] but torch sees no GPU",
        actor_init_failed=True,
    )
    assert str(actor_error(died)) == "Ray granted GPU(s) ['0'] but torch sees no GPU"
    assert actor_error(ValueError("not Ray's")) is None


def test_the_gpu_check_runs_its_cpu_path_and_says_what_it_skipped(mnist_dir, tmp_path):
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), "--tiny", "--data-root", str(mnist_dir)],
        env=dict(os.environ, OUT=str(out)), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "sees no GPU: the CPU path" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["gpu"] is False and "runs on a GPU" in report["skipped"]
    assert report["failures"] == []
    assert not report["driver_initialised_cuda"] and report["every_phase_on"] == "cpu"
    assert report["async"]["where"]["driver"] == "none"
    assert report["faults"]["restarts"][1] >= 1 and report["faults"]["finetune_killed"]
    assert report["checkpoints"]["loaded"] >= 5 and report["checkpoints"]["not_on_cpu"] == []
    glow = report["glow"]
    assert glow["fwd_bwd_images_per_s"] > 0 and glow["train_step_images_per_s"] > 0
    assert glow["reconstruction_max_error_tf32_off"] < 1e-4  # IEEE float32 on the CPU: exact to rounding


def test_ray_train_workers_granted_no_gpu_are_shown_none(monkeypatch, tmp_path, ray_session):
    """Ray 2.60 leaves every GPU visible to a worker granted none: a CPU worker's
    torch.cuda.is_available() is then True on a GPU host, and PowerSGD's hook
    synchronises its CPU bucket's device as a GPU. Ray Train's CPU workers (DDP,
    local SGD, the one-worker fine-tune) get CUDA_VISIBLE_DEVICES="" instead."""
    import ray.train.torch

    from raylocal.baselines.ddp import train_ddp
    from raylocal.run.finish_phase import finish_on_ray_train

    class Built(Exception):
        pass

    envs = []

    def trainer(*_args, **kwargs):
        envs.append(kwargs["run_config"].worker_runtime_env)
        raise Built

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer)
    config = _config()
    for use_gpu in (False, True):
        workers = WorkerBundles(2, use_gpu, {"CPU": 1.0} | ({"GPU": 1.0} if use_gpu else {}), 1)
        with pytest.raises(Built):
            train_ddp(config, _images(), workers, 1, 1e-3, tmp_path / "ddp")
        one = dataclasses.replace(PartBundles.plan(config, 2, [{"CPU": 4.0}]), work={"CPU": 1.0, "GPU": float(use_gpu)})
        with pytest.raises(Built):
            finish_on_ray_train(config, one, "mnist", (None, None), tmp_path, [(0, 8), (8, 15)], None)
    hidden = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    assert envs == [hidden, hidden, {}, {}]


def test_an_overlapped_round_applies_only_what_has_landed_on_the_device(monkeypatch):
    """NCCL's wait() returns once the all-reduce is queued: the round's thread
    polls the work until it is done on the device (here after three polls, when
    the two workers' sum lands), and a collective's error reaches ``apply``."""
    import torch.distributed as dist

    from raylocal.baselines.ddp import OverlappedRound

    class QueuedWork:  # as NCCL's: wait() at once; the result lands later
        def __init__(self, tensor: torch.Tensor, error: Exception | None = None) -> None:
            self.tensor, self.polls, self.error = tensor, 0, error

        def is_completed(self) -> bool:
            self.polls += 1
            if self.polls == 3:
                self.tensor.mul_(2.0)  # two workers with the same weights: their sum
            return self.polls >= 3

        def wait(self) -> bool:
            if self.error is not None:
                raise self.error
            return True

    monkeypatch.setattr(dist, "all_reduce", lambda tensor, async_op: QueuedWork(tensor))
    params = [torch.ones(3), torch.full((2,), 4.0)]
    OverlappedRound(params, world=2, wire=None).apply()
    assert torch.equal(params[0], torch.ones(3)) and torch.equal(params[1], torch.full((2,), 4.0))  # the mean
    failed = RuntimeError("the peer is gone")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, async_op: QueuedWork(tensor, failed))
    with pytest.raises(RuntimeError, match="the peer is gone"):
        OverlappedRound(params, world=2, wire=None).apply()


def test_gpu_shares_are_checked_as_ray_packs_them_one_gpu_each():
    """Ray puts a share under 1 on one GPU: 1.9 GPUs of shares (three of 0.6 and a
    0.1) do not fit 2 GPUs, though their sum does; three of 0.45 and a 0.1 do."""
    from raylocal.cluster.placement import trial_shares

    two_gpus = [{"CPU": 16.0, "GPU": 2.0}]
    config = _config(parts=3, part_spec=None, device="auto", cpus_per_part=1.0)
    unpacked = r"^3 parts of \{CPU 1, GPU 0.6\} and the model service: GPU shares of 0.6, 0.1 for 4 bundles do not pack"
    with pytest.raises(ClusterError, match=unpacked + r" into the 2 GPU\(s\) of this cluster"):
        PartBundles.plan(config.replace(gpus_per_part=0.6), 3, two_gpus).check()
    PartBundles.plan(config.replace(gpus_per_part=0.45), 3, two_gpus).check()
    PartBundles.plan(config, 3, two_gpus).check()  # the default share: 0.45 each
    with pytest.raises(ClusterError, match=r"^a trial of 3 parts and its own process: GPU shares of 0.6, 0.1"):
        TrialGroup.plan(config.replace(gpus_per_part=0.6)).check(two_gpus)
    TrialGroup.plan(config.replace(gpus_per_part=0.45)).check(two_gpus)
    # the default share divides the GPUs among the trials the CPUs can hold at once, not all 300
    assert trial_shares(config, [{"CPU": 8.0, "GPU": 1.0}], 300)["gpus_per_part"] == 0.125  # 2 trials of 4 bundles
    # a CPU-only head's 64 CPUs hold no GPU share: still 2 trials at once (18 counted with the head: 0.013 each)
    assert trial_shares(config, [{"CPU": 64.0}, {"CPU": 8.0, "GPU": 1.0}], 300)["gpus_per_part"] == 0.125
    for device in ("auto", "cuda"):  # (with --device cuda too: the cluster has a GPU, the trials too many)
        with pytest.raises(ClusterError, match=r"^300 trials at once of 3 parts .* no GPU share on 1 GPU\(s\)"):
            trial_shares(config.replace(device=device), [{"CPU": 4000.0, "GPU": 1.0}], 300)


def test_device_cuda_is_refused_where_the_parts_would_get_no_gpu(monkeypatch):
    """``--device cuda`` asks for a GPU for every part: on nodes with none (or none among
    the ``--worker-resource`` nodes) the run is refused before anything starts, not
    trained on CPUs; so is a Tune study's default share. Asked of the planning alone
    (``plan_ray_run`` without joining Ray, on clusters given by hand)."""
    import types

    import raylocal.cluster.placement
    import raylocal.cluster.preflight
    from raylocal.cluster.placement import trial_shares
    from raylocal.cluster.preflight import plan_ray_run

    monkeypatch.setattr(raylocal.cluster.preflight, "connect", lambda config: None)
    monkeypatch.setattr(raylocal.cluster.preflight, "check_driver_device", lambda config: None)  # (a GPU driver)
    data = types.SimpleNamespace(train=torch.zeros(64, 1, 8, 8), shape=(1, 8, 8))

    def on(nodes):
        monkeypatch.setattr(raylocal.cluster.placement, "live_nodes", lambda: nodes)

    on([{"CPU": 8.0}])
    for schedule, who in (("async", "the parts"), ("pipeline", "the stages")):
        with pytest.raises(ClusterError, match=rf"^--device cuda: {who} get no GPU on this cluster \(it offers none\)"):
            plan_ray_run(_config(device="cuda", schedule=schedule), data)
    with pytest.raises(ClusterError, match=r"^--device cuda: the trials' parts get no GPU"):
        trial_shares(_config(device="cuda"), [{"CPU": 8.0}], 2)
    on([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "workers": 1.0}])  # the GPU on a node the parts may not use
    with pytest.raises(ClusterError, match=r"\(the nodes with resource 'workers' offer none\)"):
        plan_ray_run(_config(device="cuda", worker_resource="workers"), data)
    on([{"CPU": 8.0, "GPU": 1.0}])
    assert plan_ray_run(_config(device="cuda"), data).parts.part_gpus == pytest.approx(0.45)  # 2 parts share it
    assert plan_ray_run(_config(device="auto"), data).parts.part_gpus == pytest.approx(0.45)
    on([{"CPU": 8.0}])
    assert plan_ray_run(_config(device="auto"), data).parts.part_gpus == 0.0  # auto: CPUs where there is no GPU


def test_a_gpu_share_that_the_device_contradicts_is_refused_by_the_config():
    """``--device cpu`` with ``--gpus-per-part`` would reserve GPUs its actors never use
    (and leave them the GPUs to see); ``--device cuda`` with a share of 0 would train on CPUs."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"gpus_per_part=0.5: device 'cpu' would reserve GPUs it never uses"):
        _config(device="cpu", gpus_per_part=0.5)
    with pytest.raises(ValidationError, match=r"gpus_per_part=0: device 'cuda' needs a GPU share for each part"):
        _config(device="cuda", gpus_per_part=0.0)
    assert _config(device="cpu", gpus_per_part=0.0).cluster.gpus_per_part == 0.0
    assert _config(device="auto", gpus_per_part=0.5).cluster.gpus_per_part == 0.5


def test_the_rivals_read_their_loss_and_gradient_norm_from_the_device_once_a_step(monkeypatch):
    """On a GPU every value read into Python waits for the device. DDP's and the pipeline's
    stages' guard reads the loss and the clipped gradient's norm together, once a step (a
    pipeline's micro-batch forwards read nothing), and the values are those of reading each."""
    from raylocal.baselines.guard import NonFiniteGuard
    from raylocal.baselines.pipeline_parallel import PipelineStage

    reads = []
    for name in ("tolist", "item", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name) or _real(self, *a)
        )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    loss = (model(x) ** 2).mean()
    guard = NonFiniteGuard(grad_clip=0.01)
    reads.clear()
    assert guard.update(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, 0)
    assert reads == ["tolist"]
    assert guard.last_loss == pytest.approx(float(loss.detach()), rel=1e-7)
    expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert float(expected_norm) <= 0.01 * (1 + 1e-6)  # clipped to the guard's norm
    glow = Glow((1, 8, 8), n_levels=2, depth=1, hidden=8)
    stage = PipelineStage(glow.whole(), _config(), 1e-3, 0, micro=4)
    # (Adam reads its step counts, CPU tensors unless capturable: no wait for a GPU, but counted here)
    stage.optimizer = torch.optim.SGD(stage.part.parameters(), lr=1e-3)
    images = torch.rand(16, 1, 8, 8) - 0.5
    reads.clear()
    own = []
    for m in range(4):
        stage.forward(m, images[4 * m : 4 * m + 4])
        own.append(stage.saved[m][2].detach().double())
    assert reads == []
    for m in range(4):
        stage.backward(m)
    stage.update()
    assert reads == ["tolist"] and stage.stats.losses == [pytest.approx(float(sum(own)), rel=1e-12)]
