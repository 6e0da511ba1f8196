"""The pipeline-parallel rival: its gradients are end to end's, under both schedules, and it crosses a link."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading
from collections import Counter

import pytest
import torch

from raylocal.baselines.pipeline_parallel import (
    PipelineStage,
    StageLinks,
    StageStats,
    _send,
    check_stages_agree,
    stage_ops,
    train_stage,
)
from raylocal.core.config import RaylocalConfig
from raylocal.core.links import SYSTEM_CLOCK, Clock, FakeClock, LinkSpec
from raylocal.errors import ClusterError, DivergedError
from raylocal.model.objectives import nll_bits, preprocess
from raylocal.pipeline.channel import PacketChannel
from raylocal.pipeline.worker import LinkReceiver, LinkSender, WorkerStats
from raylocal.training.trainer import MAX_SKIPS_IN_A_ROW, build_glow, initialize

CONFIG = RaylocalConfig(n_levels=2, depth=2, hidden=8, batch_size=8, warmup_steps=0, grad_clip=0.0)


def _glow_and_batch(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    glow = build_glow(CONFIG, (1, 8, 8)).to(dtype)
    x = preprocess(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), 8, torch.Generator().manual_seed(1))
    x = x.to(dtype)
    initialize([glow.whole()], x)
    return glow, x


def _two_stages_linked(link: str = "up", clock: Clock = SYSTEM_CLOCK) -> list[StageLinks]:
    """Two stages' links in one process, as their actors make them (lossless, both
    directions timed from one origin): activations forward, gradients back."""
    from raylocal.baselines.pipeline_on_ray import stage_links

    config, origin = CONFIG.replace(link=link), clock.now()
    channels = [PacketChannel(2), PacketChannel(2)]
    return [
        stage_links(config, k, 2, channels, [WorkerStats(), WorkerStats()], origin, lambda t: t, lambda t: t, clock)
        for k in range(2)
    ]


def _train_both(stages, ops, links, batches, steps: int, waiting: str) -> list[Exception]:
    """Both stages' training in threads of their own, as their actors would run it;
    returns the errors they raised. Fails with ``waiting`` if a stage still waits after 60 s."""
    errors: list[Exception] = []

    def train(k: int, **kwargs) -> None:  # noqa: ANN003
        try:
            train_stage(stages[k], ops[k], links[k], **kwargs)
        except Exception as e:
            errors.append(e)

    threads = [
        threading.Thread(target=train, args=(1,), kwargs={"batches": None}, daemon=True),
        threading.Thread(target=train, args=(0,), kwargs={"batches": iter(batches), "steps": steps}, daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), waiting
    return errors


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("bounds", [((0, 3), (3, None)), ((0, 2), (2, 5), (5, None))])
def test_its_gradients_are_end_to_end_gradients_under_both_schedules(schedule, bounds):
    glow, x = _glow_and_batch()
    reference = copy.deepcopy(glow)
    nll_bits(reference, x).mean().backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    parts = [glow.part(a, b if b is not None else len(glow)) for a, b in bounds]
    stages = [PipelineStage(p, CONFIG, 1e-3, 0, micro=4) for p in parts]
    ops = [stage_ops(schedule, k, len(stages), 4) for k in range(len(stages))]
    # the stages' work in an order every schedule allows: each op as soon as its input exists
    done, acts, grads, pending = set(), {}, {}, [list(o) for o in ops]
    while any(pending):
        for k, queue in enumerate(pending):
            while queue:
                op, m = queue[0]
                if op == "F" and (k == 0 or (k - 1, m) in acts):
                    acts[(k, m)] = stages[k].forward(m, x.chunk(4)[m] if k == 0 else acts[(k - 1, m)])
                elif op == "B" and (k == len(stages) - 1 or (k + 1, m) in grads):
                    grads[(k, m)] = stages[k].backward(m, grads.get((k + 1, m)))
                else:
                    break
                done.add((k, op, m))
                queue.pop(0)
    got = {n: p.grad for n, p in glow.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    losses = sum(s._loss for s in stages)
    assert losses == pytest.approx(float(nll_bits(reference, x).mean()), rel=1e-12)


def test_schedules_order_each_stage_as_gpipe_and_1f1b_do():
    assert stage_ops("gpipe", 0, 2, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert stage_ops("1f1b", 0, 2, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert stage_ops("1f1b", 1, 2, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert stage_ops("1f1b", 0, 4, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]  # fewer micro-batches than warmup
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        stage_ops("zb", 0, 2, 2)


def test_only_the_first_stage_keeps_the_budget_so_the_last_never_stops_first():
    """The second stage is handed a budget already spent; it must still train every
    batch the first sends and stop at its end (stopping on its own clock left the
    first stage waiting for gradients forever, the race's hung pipeline cell)."""
    glow, x = _glow_and_batch(torch.float32)
    stages = [PipelineStage(glow.part(a, b), CONFIG, 1e-3, 0, micro=2) for a, b in ((0, 3), (3, len(glow)))]
    links = _two_stages_linked()
    ops = [stage_ops("1f1b", k, 2, 2) for k in range(2)]
    second = threading.Thread(target=train_stage, args=(stages[1], ops[1], links[1], None), kwargs={"budget": 0.0})
    second.start()
    first = threading.Thread(target=train_stage, args=(stages[0], ops[0], links[0], iter([x, x, x, x])),
                             kwargs={"steps": 4, "budget": 60.0})  # fmt: skip
    first.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert not first.is_alive() and not second.is_alive(), "a stage is still waiting"
    assert stages[0].stats.steps == stages[1].stats.steps == 4


def test_two_stages_train_over_an_emulated_link_as_one_model_would(monkeypatch):
    """Float32 stages in two threads, joined by links both ways: the same updates as
    the stages run in one thread, and every activation and gradient counted on the
    wire, and moved to its stage's device as the parts' latents are (``to_device``)."""
    import raylocal.baselines.pipeline_parallel as pipeline_module

    moved = []
    real = pipeline_module.to_device
    monkeypatch.setattr(pipeline_module, "to_device", lambda t, device: moved.append(t.shape) or real(t, device))
    glow, x = _glow_and_batch(torch.float32)
    twin = copy.deepcopy(glow)
    batches = [x, x.flip(0), x * 0.5]

    def stages_of(model):
        return [PipelineStage(model.part(a, b), CONFIG, 1e-3, 0, micro=2) for a, b in ((0, 3), (3, len(model)))]

    linked = stages_of(glow)
    clock = FakeClock()
    channels = [PacketChannel(2), PacketChannel(2)]  # activations forward, gradients back
    spec = LinkSpec.parse("bw=10Mbit")  # no latency: the clock moves only by the bytes on the wires
    forward = LinkSender(channels[0], spec, lambda t: t, WorkerStats(), 0, clock=clock)
    backward = LinkSender(channels[1], spec, lambda t: t, WorkerStats(), 1, clock=clock)
    links = [
        StageLinks(activations_out=forward, gradients_in=LinkReceiver(channels[1], lambda t: t, clock)),
        StageLinks(activations_in=LinkReceiver(channels[0], lambda t: t, clock), gradients_out=backward),
    ]
    ops = [stage_ops("1f1b", k, 2, 2) for k in range(2)]
    start = clock.now()
    second = threading.Thread(target=train_stage, args=(linked[1], ops[1], links[1], None))
    second.start()
    train_stage(linked[0], ops[0], links[0], iter(batches), steps=3)  # its end stops the second stage
    second.join(timeout=60)
    assert not second.is_alive() and linked[1].stats.steps == 3
    alone = stages_of(twin)
    for batch in batches:  # the same updates, in one thread without links
        acts = [alone[0].forward(m, xm) for m, xm in enumerate(batch.chunk(2))]
        for m, a in enumerate(acts):
            alone[1].forward(m, a)
            alone[0].backward(m, alone[1].backward(m))
        for s in alone:
            s.update()
    for (name, a), b in zip(glow.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    boundary = glow.part(0, 3)(x.chunk(2)[0])[0]
    sent = 3 * 2 * boundary.numel() * 4  # 3 batches of 2 micro-batches, float32 activations
    assert linked[0].stats.bytes_forward == linked[1].stats.bytes_backward == sent
    # the race's cell: a step's bytes on the boundary's link are its activations forward and their gradients back
    from raylocal.bench.links import pipeline_figures

    stages = [{"stats": dataclasses.asdict(s.stats), "seconds": s.stats.seconds, "peak_rss_mb": 1.0} for s in linked]
    figures = pipeline_figures(stages, batch_size=len(x))
    assert figures["steps"] == 3 and figures["bytes_per_step"] == 2 * 2 * boundary.numel() * 4
    assert forward.stats.bytes_forward == backward.stats.bytes_forward == sent  # as the links counted them
    # each direction's wire carried its `sent` bytes one message after another (the two may overlap)
    assert clock.now() - start >= sent * 8 / 10e6
    # the first stage's 6 micro-batches, 6 activations into the second, 6 gradients back
    assert Counter(moved) == {x.chunk(2)[0].shape: 6, boundary.shape: 12}


def test_a_stage_skips_updates_without_a_finite_gradient_and_its_failure_stops_the_stage_upstream():
    """The last stage's weights are NaN: every gradient, its own and the one it
    sends back, is NaN. Both stages skip those updates (their weights stay as
    they were); the last fails after MAX_SKIPS_IN_A_ROW + 1 in a row, in one
    line, and the first, which tolerates more, stops at the end that failure sends."""
    glow, x = _glow_and_batch(torch.float32)
    stages = [PipelineStage(glow.part(a, b), CONFIG, 1e-3, 0, micro=2) for a, b in ((0, 3), (3, len(glow)))]
    with torch.no_grad():
        next(stages[1].part.parameters()).fill_(float("nan"))
    stages[0].guard.limit = 100
    before = copy.deepcopy(stages[0].part.state_dict())
    links = _two_stages_linked()
    ops = [stage_ops("gpipe", k, 2, 2) for k in range(2)]
    failures = _train_both(stages, ops, links, [x] * 50, 50, "the first stage did not stop at the last one's failure")
    assert len(failures) == 1 and isinstance(failures[0], DivergedError), failures
    message = str(failures[0])
    assert message.startswith(f"pipeline training diverged: {MAX_SKIPS_IN_A_ROW + 1} steps in a row without a finite")
    assert len(message.splitlines()) == 1
    assert stages[1].stats.steps == MAX_SKIPS_IN_A_ROW  # its failing update counts no step
    assert stages[0].stats.skipped == stages[0].stats.steps == MAX_SKIPS_IN_A_ROW + 1  # then the end came back
    with pytest.raises(ClusterError, match=r"stages trained \[6, 5\] batches each, not the same"):
        check_stages_agree([stages[0].stats.steps, stages[1].stats.steps])  # (on Ray, the failure surfaces first)
    check_stages_agree([3, 3])
    for name, weight in stages[0].part.state_dict().items():
        assert torch.equal(weight, before[name]), name


def test_the_pipelines_links_lose_nothing_in_an_outage():
    """A link of the parts loses a latent sent into an outage (tags 1-1000 are
    down); the pipeline's links, lossless, wait their outages out and send every
    activation and gradient, and both stages train every batch."""
    lossy = LinkSender(PacketChannel(4), LinkSpec.parse("outage=1:1000"), lambda t: t, WorkerStats(), 0)
    lossy.send({"kind": "data", "step": 5, "latent": torch.zeros(3), "weights": None})
    lossy.close()
    assert lossy.stats.outage_latents == 1 and lossy.stats.bytes_forward == 0

    # the rival's links time their outages (a step-based spec is refused for it): down a second
    # in every 1.1 on average, and on the fake clock every message (about 1 kB, 83 ms on the wire)
    # waits its outage out
    glow, x = _glow_and_batch(torch.float32)
    stages = [PipelineStage(glow.part(a, b), CONFIG, 1e-3, 0, micro=2) for a, b in ((0, 3), (3, len(glow)))]
    clock = FakeClock()
    start = clock.now()
    links = _two_stages_linked("bw=100kbit,mtbf=0.1s,mttr=1s", clock)
    ops = [stage_ops("1f1b", k, 2, 2) for k in range(2)]
    assert _train_both(stages, ops, links, [x] * 3, 3, "a stage waits for a message the link lost") == []
    assert stages[0].stats.steps == stages[1].stats.steps == 3
    assert links[0].activations_out.stats.outage_latents == links[1].gradients_out.stats.outage_latents == 0
    assert clock.now() - start > 3.0  # 12 messages (and 2 ends) waited for the link; no outage: about 0.5 s


def test_a_stages_clock_waits_for_its_device_before_it_stops(monkeypatch):
    """On a GPU the backward pass and the update return at their kernels' launch: the
    stage's compute time (what an injected straggler is slowed by) must wait for them."""
    import raylocal.baselines.pipeline_parallel as pipeline_parallel

    glow, x = _glow_and_batch()
    stage = PipelineStage(glow.whole(), CONFIG, 1e-3, 0, micro=1)
    waited = []
    monkeypatch.setattr(pipeline_parallel, "wait_for", lambda device: waited.append((device, stage.stats.compute_s)))
    stage.forward(0, x)
    before = stage.stats.compute_s
    stage.backward(0)
    assert waited == [(x.device, before)] and stage.stats.compute_s > before  # waited, then the clock stopped
    before = stage.stats.compute_s
    stage.update()  # so does the optimizer's step
    assert waited[1:] == [(x.device, before)] and stage.stats.compute_s > before


def test_the_first_stages_batches_go_to_its_device_through_to_device(monkeypatch):
    """As a part's data batches do (on a GPU a pinned, non-blocking copy)."""
    import raylocal.baselines.pipeline_on_ray as on_ray

    moved = []
    real = on_ray.to_device
    monkeypatch.setattr(on_ray, "to_device", lambda t, device: moved.append(t.dtype) or real(t, device))
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    config = CONFIG.replace(batch_size=16, init_batch_size=16)
    _, batches = on_ray.build_stage(config, [(0, 3), (3, 15)], 0, images, 2, torch.device("cpu"))
    x = next(batches)
    assert moved == [torch.uint8] and x.shape == (16, 1, 8, 8) and x.dtype == torch.float32


def test_a_stage_that_fails_takes_what_its_upstream_still_sends_so_that_none_waits_forever():
    """Under GPipe the first stage sends all its forwards before it reads a gradient.
    The second fails at its first forward; it must still take those activations up to
    their end, or the first waits for room on the link forever."""
    glow, x = _glow_and_batch(torch.float32)
    stages = [PipelineStage(glow.part(a, b), CONFIG, 1e-3, 0, micro=8) for a, b in ((0, 3), (3, len(glow)))]

    def fail(m, x):  # noqa: ANN001, ANN202
        raise RuntimeError("stage 2 fails")

    stages[1].forward = fail
    links = _two_stages_linked()
    ops = [stage_ops("gpipe", k, 2, 8) for k in range(2)]
    failures = _train_both(stages, ops, links, [x] * 3, 3, "a stage waits for room on a link its reader left")
    assert [str(e) for e in failures] == ["stage 2 fails"]
    assert stages[0].stats.steps == 0  # its first batch's gradients never came: the end did


def test_a_stage_sends_a_views_own_bytes_and_counts_the_time_the_link_made_it_wait():
    """A Split's output is half of its input's storage: what goes into the object
    store (and over a real link) must be that half alone."""

    class Link:
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def send(self, packet: dict) -> float:
            self.sent.append(packet)
            return 0.25  # seconds it waited for the wire to take the message

    whole = torch.arange(2 * 6 * 4 * 4, dtype=torch.float32).reshape(2, 6, 4, 4)
    half = whole.chunk(2, dim=1)[0]  # as Split returns it: a view of the whole storage
    link, stats = Link(), StageStats()
    assert _send(link, half, 7, stats) == half.numel() * 4
    (packet,) = link.sent
    sent = packet["latent"]
    assert torch.equal(sent, half) and packet["step"] == 7
    assert sent.untyped_storage().nbytes() == half.numel() * 4 < whole.untyped_storage().nbytes()
    assert len(pickle.dumps(sent)) < len(pickle.dumps(half))
    assert stats.send_s == 0.25 and stats.wait_s == 0.0


def test_both_directions_of_a_boundary_share_its_outages_whenever_their_stages_start():
    """A boundary's activations and gradients cross one link: stage 1's end of it
    starts seconds after stage 0's (actors start and build at their own pace), and
    an outage must still cut both directions at once."""
    from raylocal.baselines.pipeline_on_ray import stage_links

    config = CONFIG.replace(link="mtbf=2s,mttr=1s")
    clock = FakeClock()
    origin = clock.now()
    queues = [PacketChannel(2), PacketChannel(2)]
    first = stage_links(config, 0, 2, queues, [WorkerStats(), WorkerStats()], origin, lambda t: t, lambda t: t, clock)
    clock.sleep(5.0)  # stage 1 builds its links later
    second = stage_links(config, 1, 2, queues, [WorkerStats(), WorkerStats()], origin, lambda t: t, lambda t: t, clock)
    forward, backward = first.activations_out.wire, second.gradients_out.wire
    times = [origin + 0.05 * i for i in range(2000)]
    up = [forward.up(at=t) for t in times]
    assert 0 < sum(up) < len(up)  # the timeline has outages in it
    assert up == [backward.up(at=t) for t in times]
    assert first.activations_in is None and second.activations_out is None  # each stage's own ends only
    first.activations_out.close()
    second.gradients_out.close()


def test_the_pipelines_stages_start_from_e2es_weights_and_train_on_its_batches(mnist_dir, tmp_path, monkeypatch):
    """The rival is e2e split into stages: each stage process builds the model from the
    seed and initialises ActNorm through every stage, and the first stage draws the
    batches (and dequantisation noise) of e2e's single-process run, in its order."""
    from conftest import local_session

    import raylocal.training.schedules as schedules
    from raylocal.baselines.pipeline_on_ray import build_stage
    from raylocal.core.data import load_dataset

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        threads=1, schedule="e2e", epochs=2, samples=0, progress=False, device="cpu",
    )  # fmt: skip
    data = load_dataset("mnist", mnist_dir)
    e2e = local_session(config, data, tmp_path / "e2e")
    drawn = []
    real = schedules.train_batch

    def recorded(parts, trainers, active, x, *rest):  # noqa: ANN001, ANN002
        drawn.append(x.clone())
        return real(parts, trainers, active, x, *rest)

    monkeypatch.setattr(schedules, "train_batch", recorded)
    e2e.start()
    initial = {name: t.clone() for name, t in e2e.glow.state_dict().items()}
    for _ in range(6):  # past the end of the first epoch (4 batches): the next epoch's shuffle too
        e2e._batch(0, finetune=False)
    bounds = [(0, 3), (3, len(e2e.glow))]
    stages = [build_stage(config, bounds, k, data.train, 2, torch.device("cpu")) for k in range(2)]
    weights = {}
    for stage, _ in stages:
        weights.update(stage.part.state_dict())
    assert weights.keys() == initial.keys() and all(torch.equal(weights[n], t) for n, t in initial.items())
    batches = stages[0][1]
    assert stages[1][1] is None
    assert all(torch.equal(next(batches), x) for x in drawn) and len(drawn) == 6
