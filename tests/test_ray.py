"""The Ray async trainer: faithful to its single-process twin, bounded, really distributed."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
import torch
from conftest import local_session, lose_the_working_directory_on_joining, run_local, tiny_options, untrained_bpd

import raylocal.cluster.preflight
from raylocal.cli.train import main
from raylocal.cluster.placement import PartBundles, Placement
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.model.parts import PartSpec
from raylocal.run.async_run import AsyncContext
from raylocal.training.schedules import PARTS_RESULT, PartsResult
from raylocal.training.trainer import build_glow

pytestmark = pytest.mark.usefixtures("ray_session")


def _async(mnist_dir, storage, name, **opts):
    args = tiny_options(mnist_dir, storage, run_name=name, schedule="async", **opts)
    assert main(args) == 0
    return json.loads((storage / name / "summary.json").read_text())


def test_lockstep_async_equals_simultaneous_bit_for_bit(mnist_dir, tmp_path, capfd):
    storage = tmp_path / "runs"
    # each part loads its images on its own node: the same bits as the twin that was given them
    s = _async(
        mnist_dir, storage, "ray", parts=2, part_spec="1|2", epochs=2, queue_size=1, lr="3e-3,2e-3", images_from="node"
    )
    # what the user saw (capfd: Ray's core worker writes from C++, straight to file descriptor 2):
    # no Ray error line at start, no nan, and the parts' numbers named as their local losses
    out, err = capfd.readouterr()
    text = out + err
    assert "constructor arguments in the object store" not in text
    assert not [line for line in text.splitlines() if "core_worker" in line and " E " in line], text[-3000:]
    assert "nan" not in text.lower(), text[-3000:]
    assert "part 2: 8/8 local " in text
    ray_weights = torch.load(storage / "ray" / "checkpoint.pt", weights_only=True)["model"]
    # the single-process twin, same seeds and thread counts
    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=2, threads=1, parts=2, part_spec="1|2", epochs=2,
        schedule="simultaneous", lr=[3e-3, 2e-3], samples=0, progress=False, storage_path=str(storage),
    )  # fmt: skip
    config = RaylocalConfig(**values)
    ref = local_session(config, load_dataset("mnist", mnist_dir), storage / "ref")
    ref_summary = run_local(ref)
    expected = ref.glow.state_dict()
    assert ray_weights.keys() == expected.keys()
    diff = [k for k in expected if not torch.equal(ray_weights[k], expected[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    assert s["test_bpd"] == pytest.approx(ref_summary["test_bpd"], abs=0)
    # the assembled model learned: BPD fell from the untrained model's
    assert s["test_bpd"] < untrained_bpd(mnist_dir)
    # parts are separate processes, and nothing travelled backwards
    pids = s["actor_pids"]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert s["bytes_backward"] == 0 and s["bytes_forward"][0] > 0
    assert s["e2e_pipeline_bytes"] == [2 * s["bytes_forward"][0]]
    # lockstep drops nothing: part 2 fetched every latent and weight sync part 1 sent
    assert s["bytes_received"] == [s["bytes_forward"][0] + s["bytes_weight_sync"]] and s["bytes_weight_sync"] > 0
    import ray

    assert s["queue_nodes"] == [ray.get_runtime_context().get_node_id()]  # the session's one node


def test_a_part_that_diverges_in_its_actor_fails_the_run_in_one_line(mnist_dir, tmp_path, capsys):
    args = tiny_options(
        mnist_dir, tmp_path / "runs", run_name="div", schedule="async", parts=2, part_spec="1|2", epochs=1,
        lr="1e-3,1e9", warmup_steps=0, max_rollbacks=0,
    )  # fmt: skip
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: part 2 diverged: 1 rollbacks"), err


def test_outage_through_ray_loses_latents_and_the_receiver_makes_up_on_stale_inputs(mnist_dir, tmp_path):
    s = _async(
        mnist_dir, tmp_path / "runs", "out", parts=2, part_spec="1|2", epochs=2, queue_size=2,
        link="outage=4:3", sync_every=2,
    )  # fmt: skip
    # the sender's latents 4, 5, 6 are lost; the receiver (--starve wait) trains on the other
    # five as they come and, once its sender has ended, three steps on its own inputs
    assert s["outage_latents"] == [3] and s["dropped_latents"] == [0]
    assert s["fresh_steps"] == [5] and s["stale_steps"] == [3]
    assert s["bytes_weight_sync"] > 0
    assert 0 <= s["behind_steps"][0]["p50"] <= s["behind_steps"][0]["max"] <= 8


def test_parts_that_never_wait_over_a_slow_link(mnist_dir, tmp_path):
    s = _async(
        mnist_dir, tmp_path / "runs", "free", parts=2, part_spec="1|2", epochs=2, queue_size=1,
        link="bw=20Mbit,lat=30ms", starve="stale", full="drop-oldest", wire_dtype="bfloat16", trace_packets=6,
    )  # fmt: skip
    # every part trained its own 8 steps, each on a fresh or a stale input, and the wire
    # carried 2-byte latents: 16 images of 2x4x4 per latent that crossed (the init packet
    # carries weights, counted apart)
    assert s["fresh_steps"][0] + s["stale_steps"][0] == 8
    images, rest = divmod(s["bytes_forward"][0], 2 * 4 * 4 * 2)
    latents, part = divmod(images, 16)
    assert rest == 0 and part == 0 and 1 <= latents <= 8
    assert latents >= s["fresh_steps"][0]  # every fresh step trained on a latent that crossed
    assert s["behind_s"][0]["max"] >= 0.03 or s["fresh_steps"][0] == 0  # a latent is at least the latency old
    # the first 6 packets, traced at both ends: each one the part took was handed over at least the latency before
    trace = json.loads((tmp_path / "runs" / "free" / "pipeline.json").read_text())["packet_trace"][0]
    # (drop-oldest: a latent dropped before its link's thread took it up leaves no row)
    assert 2 <= len(trace["sent"]) <= 6 and 1 <= trace["paired"] <= len(trace["received"]) <= 6
    assert "packet_trace" not in s
    saved = PartsResult.load(tmp_path / "runs" / "free" / PARTS_RESULT)  # the rows once, in the report
    assert saved.report["packet_trace"][0] == trace and not any("sent_trace" in st for st in saved.stats)
    delays = s["packet_delays"][0]
    assert delays["with weights"]["handed to taken"]["min"] >= 0.03  # the init packet, which part 2 always takes
    taken = delays.get("latent only", {}).get("handed to taken")  # none, if every traced latent was superseded
    assert taken is None or taken["min"] >= 0.03
    assert s["test_bpd"] < untrained_bpd(mnist_dir)
    # the same figures in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "free" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"part2/stale_input_steps", "part2/upstream_steps_behind_p95", "part1/latents_dropped_queue_full"} <= set(
        scalars
    )
    assert events.Scalars("part2/fresh_steps")[-1].value == s["fresh_steps"][0]


def test_three_parts_pipeline_and_assembled_bpd_falls(mnist_dir, tmp_path):
    s = _async(
        mnist_dir, tmp_path / "runs", "three", parts=3, epochs=3, lr=3e-3, eval_every=4, live_eval_images=16,
        inject="slow:3@0.3",  # slow enough for the driver to see the run in progress
    )  # fmt: skip
    assert s["n_parts"] == 3 and len(s["bytes_forward"]) == 2
    # evaluated while the parts trained (in the model service), then after the phase
    # (a fine-tune after it is test_driver.py's)
    mid = [c for c in s["curve"] if c["step"] < 12]
    assert mid and all(c["test_bpd"] < 9 for c in mid), s["curve"]
    assert [c["step"] for c in mid] == sorted(c["step"] for c in mid)
    # live: on the first 16 of the 32 test images; after the parts phase: on all of them
    assert all(c["live_images"] == 16 for c in mid) and "live_images" not in s["curve"][-1]
    assert s["curve"][-1]["test_bpd"] < s["curve"][0]["test_bpd"] < untrained_bpd(mnist_dir)
    assert s["where"]["service"]["evaluations"] == len(s["curve"]) - 1  # all but the final one
    assert len(s["part_images_per_s"]) == 3 and all(v > 0 for v in s["part_images_per_s"])


def test_queue_never_exceeds_its_bound():
    import ray

    from raylocal.cluster.queue import LatentQueue

    q = LatentQueue(2)
    sizes = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            sizes.append(q.qsize())
            time.sleep(0.005)

    def produce():
        for i in range(12):
            q.put({"kind": "data", "step": i, "latent": ray.put(torch.zeros(10)), "weights": None})

    watcher = threading.Thread(target=watch)
    producer = threading.Thread(target=produce)
    watcher.start()
    producer.start()
    # a slow consumer: nothing is taken until the queue is full and the watcher has seen
    # it 20 more times, while the producer, 10 puts to go, must block at the bound
    deadline = time.time() + 30
    while 2 not in sizes and time.time() < deadline:
        time.sleep(0.005)
    seen = len(sizes)
    while len(sizes) < seen + 20 and time.time() < deadline:
        time.sleep(0.005)
    assert producer.is_alive()
    got = []
    while len(got) < 12:
        got.append(q.get())
        time.sleep(0.02)
    producer.join()
    stop.set()
    watcher.join()
    # the queue's process never imported torch (it would cost seconds per boundary per run)
    assert not ray.get(q.actor.__ray_call__.remote(lambda _: "torch" in sys.modules))
    q.shutdown()
    assert max(sizes) == 2 and min(sizes) >= 0
    assert [p["step"] for p in got] == list(range(12))
    assert torch.equal(ray.get(got[-1]["latent"]), torch.zeros(10))


def test_a_mailbox_keeps_the_newest_post_and_never_makes_a_worker_wait():
    """What a Ray Train worker hands the driver (a summary, DDP's weights as bytes):
    a restarted worker posts again, and its post replaces the earlier one without
    waiting for the driver, which reads once the workers are done."""
    import ray

    from raylocal.cluster.queue import Mailbox

    box = Mailbox()
    assert box.take() is None
    box.post({"summary": {"test_bpd": 3.0}})
    box.post({"weights": b"w" * 300_000, "history": [{"epoch": 1}]})  # the restarted worker's (over 100 kB)
    assert box.take() == {"weights": b"w" * 300_000, "history": [{"epoch": 1}]}
    assert not ray.get(box.actor.__ray_call__.remote(lambda _: "torch" in sys.modules))
    assert ray.get(box.actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())) == (
        ray.get_runtime_context().get_node_id()
    )  # on the driver's node
    box.shutdown()


def test_the_driver_leaves_ray_trains_state_api_warnings_out_of_what_it_prints():
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from raylocal.cluster.connect import drop_ray_noise

    printed = []
    dispatcher = WorkerStandardStreamDispatcher()  # a fresh one, as ray.init sets up the driver's
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))
    drop_ray_noise(dispatcher)
    drop_ray_noise(dispatcher)  # (connect() may run it again: it filters once)
    noise = (
        "WARNING placement_group_cleaner.py:86 -- Failed to query Ray Train Controller actor state. "
        "State API may be temporarily unavailable. Continuing to monitor."
    )
    dispatcher.emit({"lines": [noise, noise], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": [noise, "epoch 4/4 (finetune) test bpd 2.88"], "pid": 2, "is_err": False})
    assert printed == [["epoch 4/4 (finetune) test bpd 2.88"]]


def test_weights_asked_of_a_part_before_its_run_wait_for_it(mnist_dir, tmp_path):
    """What a restarted actor sees when a caller's retried weights() reaches it
    before the replayed run(): the call waits for the worker instead of failing the run."""
    import ray

    from raylocal.cluster.parts_phase import PartActor
    from raylocal.model.glow import Glow
    from raylocal.model.parts import parse_part_spec

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        parts=2, part_spec="1|2", schedule="async", storage_path=str(tmp_path), threads=1,
    )  # fmt: skip
    glow = Glow((1, 8, 8), **config.glow_kwargs())
    bounds = list(parse_part_spec("1|2", glow).bounds)
    actor = PartActor.remote(config.model_dump_json(), 0, (1, 8, 8), 1, str(tmp_path))
    early = actor.weights.remote()  # before run(): no worker yet
    images = load_dataset("mnist", mnist_dir).train
    stats = ray.get(actor.run.remote(bounds, images, None, None, 4))
    weights = ray.get(early)
    assert stats["steps"] == 4
    assert weights and set(weights) == set(ray.get(actor.weights.remote()))  # the part's own weights
    ray.kill(actor)


def test_a_parts_phase_that_fails_to_start_releases_its_placement_group_and_queues(monkeypatch, mnist_dir, ray_session):
    from ray.util import placement_group_table

    from raylocal.cluster import parts_phase

    shut = []

    class FakeQueue:
        def __init__(self, size: int, scheduling_strategy: object = None) -> None:
            self.size = size

        def shutdown(self) -> None:
            shut.append(self)

    class ActorThatCannotStart:
        @staticmethod
        def options(**_: object):
            raise RuntimeError("no such resource")

    monkeypatch.setattr(parts_phase, "LatentQueue", FakeQueue)
    monkeypatch.setattr(parts_phase, "PartActor", ActorThatCannotStart)
    config = RaylocalConfig(data_root=str(mnist_dir), parts=3, batch_size=16)
    data = load_dataset("mnist", mnist_dir)
    made = []
    real_place = parts_phase.place_parts
    monkeypatch.setattr(parts_phase, "place_parts", lambda *a: made.append(real_place(*a)) or made[-1])
    with pytest.raises(RuntimeError, match="no such resource"):
        parts_phase.PartsPhase(config, data, mnist_dir, PartBundles.plan(config, 3), "images")
    pg = made[0][0]
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert len(shut) == 2  # both boundaries' queues


@pytest.mark.parametrize(
    "cluster,options,expected",
    [
        # one GPU per part when there is one for each, less the evaluations' share
        ({"CPU": 16.0, "GPU": 3.0}, {}, (4.0, 0.9, 4)),
        ({"CPU": 16.0, "GPU": 2.0}, {}, (4.0, 0.45, 4)),  # too few GPUs for 3 parts: two share one GPU
        ({"CPU": 16.0, "GPU": 1.0}, {}, (4.0, 0.3, 4)),  # one GPU: all three share it
        ({"CPU": 16.0, "GPU": 3.0}, {"device": "cpu"}, (4.0, 0.0, 4)),  # --device cpu keeps them off
        ({"CPU": 2.0}, {}, (0.5, 0.0, 1)),  # fractional CPUs: 3 parts and the evaluations share 2 cores
        ({"CPU": 2.0, "GPU": 1.0}, {"gpus_per_part": 0.25, "cpus_per_part": 0.5, "threads": 2}, (0.5, 0.25, 2)),
    ],
)
def test_part_resources_give_each_part_a_gpu_or_a_share_of_one(monkeypatch, cluster, options, expected):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": dict(cluster)}])
    placement = PartBundles.plan(RaylocalConfig(parts=3, **options), 3)
    cpus, gpus, threads = placement.part_cpus, placement.part_gpus, placement.threads
    assert (round(cpus, 6), round(gpus, 6), threads) == (round(expected[0], 6), expected[1], expected[2])


@pytest.mark.parametrize("n_gpus", [1, 2, 3, 4])
def test_shared_gpu_bundles_fit_on_the_gpus_there_are(monkeypatch, n_gpus):
    """Ray puts a fractional GPU bundle on one device: every part, and then the
    run's evaluation service, must find room."""

    nodes = [{"CPU": 64.0, "GPU": float(n_gpus)}]
    for n_parts in range(1, 9):
        placement = PartBundles.plan(RaylocalConfig(parts=n_parts), n_parts, nodes)
        share = placement.part_gpus
        # fill the GPUs one bundle at a time, as Ray's first fit would
        free = [1.0] * n_gpus
        for need in [share] * n_parts + [placement.service["GPU"]]:
            gpu = next((g for g, f in enumerate(free) if f >= need - 1e-9), None)
            assert gpu is not None, (n_gpus, n_parts, share)
            free[gpu] -= need
        assert 0 < share < 1 and (share >= 0.9 or n_parts > n_gpus)


def test_the_pipeline_parallel_rival_on_ray_trains_as_its_stages_do_in_one_process(
    ray_session, mnist_dir, tmp_path, capsys, monkeypatch
):
    """The pipeline schedule as a run of its own (``raylocal train --schedule
    pipeline``): its stages on Ray end with the weights the same stages reach in
    one process without links, and its record's BPD is those weights'. With
    ``--balance measure`` its split is timed in the first stage's process (on the
    device the stages train on), not on the driver."""
    from raylocal.baselines.pipeline_on_ray import build_stage
    from raylocal.core.checkpoint import load_checkpoint
    from raylocal.core.config import load_config_file
    from raylocal.training.trainer import evaluate_bpd

    lose_the_working_directory_on_joining(monkeypatch, tmp_path, raylocal.cluster.preflight)
    storage = tmp_path / "runs"
    n_layers = len(build_glow(RaylocalConfig(n_levels=2, depth=2, hidden=8), (1, 8, 8)))
    args = tiny_options(
        mnist_dir,
        storage,
        run_name="pp",
        schedule="pipeline",
        parts=2,
        balance="measure",
        micro_batches=2,
        train_subset=48,
        link="bw=100Mbit,lat=1ms",
        cpus_per_part=0.5,
        samples=0,
    )  # fmt: skip  (48 images: 3 batches of 16)
    assert main(args) == 0
    summary = json.loads((storage / "pp" / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["pipeline training", "finish"]
    state = load_checkpoint(storage / "pp" / "checkpoint.pt", kind="run")["model"]
    config = load_config_file(storage / "pp" / "config.json")
    data = load_dataset("mnist", mnist_dir).subset(48, 32)
    bounds = [tuple(b) for b in summary["pipeline"]["bounds"]]  # timed in stage 1's process
    assert len(bounds) == 2 and bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == n_layers
    stages = [build_stage(config, bounds, k, data.train, 2, torch.device("cpu")) for k in range(2)]
    (first, batches), (second, _) = stages
    for _ in range(3):  # the same stages in one process, without links
        acts = [first.forward(m, xm) for m, xm in enumerate(next(batches).chunk(2))]
        for m, a in enumerate(acts):
            second.forward(m, a)
            first.backward(m, second.backward(m))
        first.update(), second.update()
    expected = first.part.state_dict() | second.part.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
    results = summary["pipeline"]["per_stage"]
    assert summary["pipeline"]["planned_in"]["pid"] == results[0]["pid"] != os.getpid()
    sent, returned = results[0]["stats"]["bytes_forward"], results[1]["stats"]["bytes_backward"]
    assert results[0]["stats"]["steps"] == results[1]["stats"]["steps"] == summary["steps"] == 3
    assert sent == returned == results[0]["wire_bytes"] == results[1]["wire_bytes"] > 0  # as the links counted
    # each boundary's activation queue on the stage that reads it, its gradient queue on the other
    assert results[0]["queue_nodes"] == [results[1]["node_id"], results[0]["node_id"]]
    glow = build_glow(config, data.shape)
    glow.load_state_dict(expected)
    assert summary["test_bpd"] == pytest.approx(evaluate_bpd(glow, data.test, 32, torch.device("cpu")), abs=1e-9)
    assert summary["schedule"] == "pipeline"
    assert summary["pipeline"]["stages"] == PartSpec(tuple(bounds)).canonical(glow)  # as its bounds say
    assert summary["parts"] == summary["pipeline"]["stages"] and summary["n_parts"] == 2
    printed = capsys.readouterr().out
    stage_line = next(line for line in printed.splitlines() if line.startswith("pipeline stage 2 "))
    assert stage_line.split(None, 3)[3].startswith("3 batches, waited") and f"sent {returned} bytes" in stage_line


def test_the_placement_check_counts_the_model_service_only_for_runs_that_have_one():
    from raylocal.errors import ClusterError

    placement = PartBundles.plan(RaylocalConfig(parts=2, cpus_per_part=1.0), 2, [{"CPU": 2.0}])
    with pytest.raises(ClusterError, match=r"2 parts of \{CPU 1\} and the model service need CPU 3, the cluster has 2"):
        placement.check()
    placement.check(with_service=False)  # the pipeline rival's two stages fit


def test_a_run_whose_caller_holds_its_bundle_serves_in_the_callers_process_and_is_watched_by_its_monitor(
    mnist_dir, tmp_path
):
    from raylocal.run.run import Run
    from raylocal.training.service import ModelService

    # 2 parts of 1 CPU fill the session's 2 CPUs: no room for a service actor's bundle
    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        eval_batch_size=32, warmup_steps=2, threads=1, schedule="async", parts=2, part_spec="1|2", epochs=2,
        cpus_per_part=1.0, samples=0, progress=False, storage_path=str(tmp_path), run_name="here",
        inject="slow:2@0.3",  # slow enough for the driver to poll while the parts train
    )  # fmt: skip
    data = load_dataset("mnist", mnist_dir)
    plans, polls = [], []

    def watch(service, plan):
        plans.append(plan)
        return lambda actors, polled: polls.append([p["steps"] for p in polled])

    run = Run(config, data, service_here=True, monitor=watch)
    summary = run.execute()
    assert plans == [run.carry.plan] and len(plans[0]["bounds"]) == 2
    assert polls and all(0 <= last <= 8 for _, last in polls)
    # the monitor replaced the live evaluation: one evaluation, after the parts
    assert len(summary["curve"]) == 1
    assert summary["where"]["service"]["pid"] == os.getpid()
    # its BPD is that of the parts' weights, evaluated here independently
    parts = run.carry.parts
    assert [st["steps"] for st in parts.stats] == [8, 8]
    expected = ModelService(config, data.shape, "cpu").evaluate(data.test, parts.state)
    assert summary["test_bpd"] == pytest.approx(expected, abs=1e-6)
    # each part's bytes, and together the whole model's state
    whole = build_glow(config, data.shape).state_dict()
    assert sum(plans[0]["part_param_bytes"]) == sum(v.numel() * v.element_size() for v in whole.values())
    assert json.loads((tmp_path / "here" / "summary.json").read_text())["test_bpd"] == summary["test_bpd"]


def test_a_plain_object_called_as_an_actor_gets_its_arguments_values_and_returns_a_reference():
    import ray

    from raylocal.cluster.handle import InProcess

    class Adder:
        def add(self, a, b):
            return a + b

    handle = InProcess(Adder())
    ref = handle.add.remote(ray.put(torch.ones(3)), torch.full((3,), 2.0))
    assert isinstance(ref, ray.ObjectRef)
    assert torch.equal(ray.get(ref), torch.full((3,), 3.0))


def test_a_service_here_takes_the_configs_device_in_a_driver_not_rays_grant(monkeypatch, mnist_dir, tmp_path):
    from raylocal.run import service

    made = []
    monkeypatch.setattr(service, "ModelService", lambda config, shape, device: made.append(device))
    monkeypatch.setattr(service, "actor_device", lambda config: torch.device("cpu"))  # a driver is granted nothing
    config = RaylocalConfig(schedule="async", parts=2, device="cuda")
    placement = type("PartBundles", (), {"service": {"CPU": 1.0}, "threads": 1})()
    data = load_dataset("mnist", mnist_dir)
    context = AsyncContext(config, data, tmp_path, Placement(placement, None, None), service_here=True)
    handle = context.service
    handle.start()  # a benchmark's driver plans and evaluates where its parts train
    assert made == ["cuda"] and handle.images((None, None))[0] is context.data.train  # its own images, no copy
