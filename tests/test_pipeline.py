"""The pipeline logic without Ray: packets, staleness, equivalence with `simultaneous`.

The link layer itself (bandwidth, latency, outages, the sender's policies) is
tested in test_links.py."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import local_session, run_local

from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.core.tensors import tensor_bytes
from raylocal.model.glow import Glow
from raylocal.model.parts import parse_part_spec
from raylocal.pipeline.channel import PacketChannel
from raylocal.pipeline.trace import packet_delays, paired
from raylocal.pipeline.worker import PartLoop, PartWorker, staleness_summary


def _config(mnist_dir, **kw) -> RaylocalConfig:
    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, parts=2, part_spec="1|2", schedule="simultaneous", epochs=2,
        samples=0, progress=False, eval_batch_size=32,
    )  # fmt: skip
    values.update(kw)
    return RaylocalConfig(**values)


def _run_threads(config: RaylocalConfig, train: torch.Tensor, queue_size: int = 1):
    """Run the pipeline with one thread per part and in-memory queues."""
    glow = Glow((1, 8, 8), **config.glow_kwargs())
    bounds = list(parse_part_spec(config.parts.part_spec, glow).bounds)
    workers = [PartWorker(config, bounds, k, (1, 8, 8), train) for k in range(len(bounds))]
    queues = [PacketChannel(queue_size) for _ in range(len(bounds) - 1)]
    n_steps = config.schedule.epochs * (len(train) // config.schedule.batch_size)
    results = [None] * len(workers)

    def go(k):
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        inbox = queues[k - 1] if k > 0 else None
        outbox = queues[k] if k < len(workers) - 1 else None
        results[k] = PartLoop(workers[k], inbox, outbox, lambda x: x, lambda r: r, n_steps).run()

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return workers, results


@pytest.mark.parametrize(
    "lr_schedule,wire_dtype,value_bytes",
    [("constant", "float32", 4), ("cosine", "float32", 4), ("constant", "bfloat16", 2), ("constant", "int8", 1)],
)
def test_threaded_pipeline_equals_simultaneous_schedule(mnist_dir, tmp_path, lr_schedule, wire_dtype, value_bytes):
    # with cosine decay this also checks that every worker decays over the same planned steps;
    # with bfloat16 on the wire, that the single-process twin rounds its latents as the wire does
    torch.set_num_threads(1)
    config = _config(mnist_dir, storage_path=str(tmp_path), lr_schedule=lr_schedule, wire_dtype=wire_dtype)
    data = load_dataset("mnist", mnist_dir)
    workers, stats = _run_threads(config, data.train)
    reference = local_session(config, data, tmp_path / "ref")
    run_local(reference)
    expected = reference.glow.state_dict()
    got = {}
    for w in workers:
        got.update(w.weights())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), "weights differ from the simultaneous run"
    assert [s.steps for s in stats] == [8, 8]
    # part 1 outputs 2x4x4 values per image: 8 batches of 16 (the init packet carries weights, no
    # latent: part 2 computes its init input itself; int8: and a float32 scale per channel per latent)
    scales = 8 * 2 * 4 if wire_dtype == "int8" else 0
    assert stats[0].bytes_forward == 8 * 16 * 2 * 4 * 4 * value_bytes + scales
    assert all(s.bytes_backward == 0 for s in stats)
    # nothing dropped: the receiver fetched every latent and weight sync that was sent
    assert stats[1].bytes_received == stats[0].bytes_forward + stats[0].bytes_weights > stats[0].bytes_forward


def test_latents_sent_into_an_outage_are_lost_and_weights_cross_when_the_link_is_back(mnist_dir):
    torch.set_num_threads(1)
    # 2 epochs of 4 batches = 8 steps; link down at sender steps 4, 5, 6; sync every 2 steps
    config = _config(mnist_dir, link="outage=4:3", sync_every=2, epochs=2)
    data = load_dataset("mnist", mnist_dir)
    workers, stats = _run_threads(config, data.train, queue_size=8)
    up, down = stats
    assert up.outage_latents == 3 and up.dropped_latents == 0
    # --starve wait: the receiver trains on latents 1, 2, 3, 7, 8 as they come, then, once the
    # sender has ended, on its own inputs through its copy of version 8 (synced with latent 8)
    assert down.fresh_steps == 5 and down.stale_steps == 3 and down.steps == 8
    assert [int(source) for source, _ in down.inputs] == [1, 2, 3, 7, 8, 8, 8, 8]
    assert workers[1].versions[0] == 8
    # one latent of 2x4x4 float32 per image of the 5 batches that crossed (the init crossed as weights)
    assert up.bytes_forward == 5 * 16 * 2 * 4 * 4 * 4
    # what was lost was never stored: the receiver fetched the 5 latents and every weight sync that crossed
    assert down.bytes_received == up.bytes_forward + up.bytes_weights


def test_three_parts_compute_their_init_inputs_from_their_upstream_copies_as_the_single_process_run_does(
    mnist_dir, tmp_path
):
    """No latent crosses a link for the init: parts 2 and 3 compute their init
    inputs through their copies of the initialised upstream parts (part 3 through
    two, rounded to bfloat16 at each boundary), and the run still equals its
    single-process twin bit for bit; the init packets carry the weights alone."""
    torch.set_num_threads(1)
    config = _config(mnist_dir, storage_path=str(tmp_path), parts=3, part_spec="1[:1]|1[1:]|2", wire_dtype="bfloat16")
    data = load_dataset("mnist", mnist_dir)
    workers, stats = _run_threads(config, data.train)
    reference = local_session(config, data, tmp_path / "ref")
    run_local(reference)
    got = {}
    for w in workers:
        got.update(w.weights())
    expected = reference.glow.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), "weights differ from the simultaneous run"
    with torch.no_grad():
        y1, _ = workers[0].part(torch.zeros(1, 1, 8, 8))
        y2, _ = workers[1].part(y1)
    for k, y in enumerate((y1, y2)):  # what crossed each boundary: 8 latents of 16 images, bfloat16; no init latent
        assert stats[k].bytes_forward == 8 * 16 * y.numel() * 2
        assert stats[k].bytes_weights > 0


def test_weights_held_by_an_outage_cross_with_the_first_latent_after_it(mnist_dir):
    torch.set_num_threads(1)
    # sync every 2: the syncs of steps 4 and 6 meet the outage; the newest (6) crosses with latent 7
    config = _config(mnist_dir, link="outage=4:3", sync_every=2, epochs=2)
    data = load_dataset("mnist", mnist_dir)
    glow = Glow((1, 8, 8), **config.glow_kwargs())
    bounds = list(parse_part_spec(config.parts.part_spec, glow).bounds)
    up = PartWorker(config, bounds, 0, (1, 8, 8), data.train)
    channel = PacketChannel(100)
    PartLoop(up, None, channel, lambda x: x, lambda r: r, n_steps=8).run()
    packets = [channel.get() for _ in range(channel.qsize())]
    assert [p["step"] for p in packets] == [0, 1, 2, 3, 7, 8, 8]  # init, data..., end
    synced = {p["step"]: p["weights"][0][0] for p in packets if p["weights"]}
    assert synced == {0: 0, 2: 2, 7: 6, 8: 8}


def test_staleness_summary_against_a_hand_count():
    upstream = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # upstream step i ended at time i
    # used at 2.5 (upstream had done step 2) on the latent of step 1: 1 step, 1.5 s behind; at 5.0 on
    # version 2: 3 steps, 3 s; at 0.5 on version 0 (the init): 0 steps, 0.5 s
    inputs = [[1, 2.5], [2, 5.0], [0, 0.5]]
    s = staleness_summary(upstream, inputs)
    assert s["steps"] == {"mean": pytest.approx(4 / 3), "p50": 1.0, "p95": 3.0, "max": 3.0}
    assert s["seconds"] == {"mean": pytest.approx(5 / 3), "p50": 1.5, "p95": 3.0, "max": 3.0}
    assert staleness_summary(upstream, [])["steps"]["max"] == 0.0


def test_a_traced_link_times_each_hop_of_its_first_packets_in_order(mnist_dir):
    torch.set_num_threads(1)
    config = _config(mnist_dir, trace_packets=4)
    workers, stats = _run_threads(config, load_dataset("mnist", mnist_dir).train)
    sent, received = stats[0].sent_trace, stats[1].received_trace
    assert [row[:2] for row in sent] == [[0, "init"], [1, "data"], [2, "data"], [3, "data"]]
    assert [row[:2] for row in received] == [row[:2] for row in sent]
    # the init packet carries part 1's weights and no latent; each data packet a latent of 16 images
    # of 2x4x4 float32 values and no weights (a sync every 50 steps)
    assert sent[0][2:4] == [tensor_bytes(workers[0].weights()), 1] and received[0][2] == 1
    assert [row[2:4] for row in sent[1:]] == [[16 * 2 * 4 * 4 * 4, 0]] * 3
    # the part takes every packet ("block"): each end's hops in order, and the receiver gets a packet
    # only once the sender has stored it and begun its put (one clock for both threads)
    for out, back in zip(sent, received):
        assert None not in out + back and out[4:] == sorted(out[4:]) and back[3:] == sorted(back[3:]), (out, back)
        assert out[7] <= back[3]
    assert stats[1].sent_trace == [] and stats[0].received_trace == []  # the ends of the pipeline
    delays = packet_delays(sent, received)
    assert delays["latent only"]["handed to taken"]["count"] == 3
    assert delays["with weights"]["from put to get"]["count"] == 1


def test_packet_delays_against_a_hand_count():
    sent = [
        [1, "data", 100, 0, 10.0, 10.1, 10.5, 10.6, 10.7],
        [2, "data", 900, 1, 20.0, 20.0, 21.0, 21.1, 21.3],
        [3, "data", 100, 0, 30.0, 30.0, 30.5, None, None],  # lost to an outage: never stored nor received
        [4, "data", 100, 0, 40.0, 40.0, 40.5, 40.6, 40.7],  # sent twice (a restarted sender): left out
        [4, "data", 100, 0, 50.0, 50.0, 50.5, 50.6, 50.7],
    ]
    received = [
        [1, "data", 0, 10.9, 11.0, 11.2, 11.25, 11.3, 11.4],
        [2, "data", 1, 21.4, 21.5, 21.6, 22.0, 22.1, None],  # superseded: never taken
        [9, "end", 0, 60.0, 60.0, 60.0, 60.0, 60.0, 60.0],  # not traced by the sender: left out
        [4, "data", 0, 40.8, 40.8, 40.8, 40.8, 40.8, 40.8],
    ]
    assert [(out[0], back[0]) for out, back in paired(sent, received)] == [(1, 1), (2, 2)]
    d = packet_delays(sent, received)
    latent = d["latent only"]
    assert latent["waiting for the link thread"]["p50"] == pytest.approx(0.1)
    assert latent["from put to get"]["p50"] == pytest.approx(0.3)  # stored at 10.6, got at 10.9
    assert latent["fetching the latent"]["max"] == pytest.approx(0.2)
    assert latent["handed to taken"] == pytest.approx(
        {"count": 1, "mean": 1.4, "min": 1.4, "p50": 1.4, "p95": 1.4, "max": 1.4}
    )
    weights = d["with weights"]
    assert weights["on the emulated wire"]["mean"] == pytest.approx(1.0)
    assert weights["fetching the weights"]["mean"] == pytest.approx(0.4)
    assert "until the part took it" not in weights and "handed to taken" not in weights


def test_stale_input_uses_the_synced_copy_not_the_live_upstream(mnist_dir):
    torch.set_num_threads(1)
    config = _config(mnist_dir)
    data = load_dataset("mnist", mnist_dir)
    glow = Glow((1, 8, 8), **config.glow_kwargs())
    bounds = list(parse_part_spec("1|2", glow).bounds)
    up = PartWorker(config, bounds, 0, (1, 8, 8), data.train)
    down = PartWorker(config, bounds, 1, (1, 8, 8), data.train)
    up.initialize(up.init_batch())
    down.load_upstream(0, 0, up.weights())
    down.initialize(down.init_input(torch.float32))
    old = up.weights()
    for _ in range(3):
        up.trainer.step(up.data_batch())
    # the stale input equals own data pushed through the version-0 copy
    gen_state = down.noise.get_state()
    stream_state = down.stream.state()
    x = down.stale_input()
    down.noise.set_state(gen_state)
    down.stream.restore(stream_state)
    reference = Glow((1, 8, 8), **config.glow_kwargs())
    reference_part = reference.part(*bounds[0])
    reference_part.load_state_dict(old)
    with torch.no_grad():
        expected, _ = reference_part(down.data_batch())
    assert torch.equal(x, expected)
    assert not all(torch.equal(old[k], v) for k, v in up.weights().items())


def test_a_part_short_of_steps_when_its_sender_ends_makes_them_up_on_local_inputs(mnist_dir):
    """After a restore, latents that were in flight are gone: the receiver gets
    the end packet before it has trained as many steps as its sender did."""
    config = _config(mnist_dir)
    data = load_dataset("mnist", mnist_dir)
    bounds = list(parse_part_spec("1|2", Glow((1, 8, 8), **config.glow_kwargs())).bounds)
    up = PartWorker(config, bounds, 0, (1, 8, 8), data.train)
    down = PartWorker(config, bounds, 1, (1, 8, 8), data.train)
    inbox = PacketChannel(10)
    with torch.no_grad():
        inbox.put({"kind": "init", "step": 0, "latent": up.part(up.init_batch())[0], "weights": None})
        for t in range(1, 4):
            inbox.put({"kind": "data", "step": t, "latent": up.part(up.data_batch())[0], "weights": None})
    inbox.put({"kind": "end", "step": 6, "weights": None})  # the sender trained 6 steps; latents 4-6 were lost
    st = PartLoop(down, inbox, None, lambda x: x, lambda r: r, n_steps=6).run()
    assert down.step == st.steps == 6 and len(st.losses) == 6
    assert st.fresh_steps == 3 and st.stale_steps == 3
    assert [int(source) for source, _ in st.inputs] == [1, 2, 3, 0, 0, 0]  # never synced: version 0
    assert all(math.isfinite(v) for v in st.losses)


def test_a_consumer_restarted_after_its_sender_ended_still_finds_the_end():
    """A part that dies after taking its upstream's end packet is restarted and
    asks again: the channel answers with the end, instead of nothing forever."""
    channel = PacketChannel(4)
    channel.put({"kind": "data", "step": 1})
    channel.put({"kind": "end", "step": 1, "weights": None})
    assert channel.get()["kind"] == "data" and channel.get()["kind"] == "end"  # the first life
    again: list[dict] = []
    restarted = threading.Thread(target=lambda: again.append(channel.get()), daemon=True)
    restarted.start()
    restarted.join(timeout=10)  # (a bound on the failure only: it returns at once)
    assert again == [{"kind": "end", "step": 1, "weights": None}]
