"""The emulated links: bandwidth, latency, outages, and the sender's and receiver's policies.

Time comes from an injected FakeClock: nothing here sleeps."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.core.links import FakeClock, LinkSpec, TimedOutages, Wire, check_links
from raylocal.errors import ConfigError
from raylocal.model.glow import Glow
from raylocal.model.parts import parse_part_spec
from raylocal.pipeline.channel import PacketChannel
from raylocal.pipeline.trace import packet_delays
from raylocal.pipeline.worker import LinkReceiver, LinkSender, PartLoop, PartWorker, WorkerStats


def test_specs_compose_and_name_their_units():
    s = LinkSpec.parse("bw=10Mbit,lat=20ms,mtbf=60s,mttr=15s")
    assert (s.bandwidth, s.latency, s.mtbf, s.mttr) == (10e6, 0.02, 60.0, 15.0)
    assert LinkSpec.parse("bw=1Gbit").bandwidth == 1e9 and math.isinf(LinkSpec.parse("bw=inf").bandwidth)
    s = LinkSpec.parse("outage=100:20,300:50,bw=100Kbit")
    assert s.outages == ((100, 20), (300, 50)) and s.bandwidth == 1e5
    assert LinkSpec.parse("up").ideal and not LinkSpec.parse("lat=1ms").ideal
    per_boundary = "up|outage=3:1"
    assert LinkSpec.parse(per_boundary, 0).always_up
    assert not LinkSpec.parse(per_boundary, 1).up_at_step(3)


def test_step_based_availability():
    outage = LinkSpec.parse("outage=10:5,30:2")
    assert [t for t in range(1, 40) if not outage.up_at_step(t)] == [10, 11, 12, 13, 14, 30, 31]
    p = LinkSpec.parse("p=0.7", boundary=1, seed=3)
    ups = [p.up_at_step(t) for t in range(1, 4001)]
    assert 0.67 < sum(ups) / len(ups) < 0.73
    assert ups == [LinkSpec.parse("p=0.7", boundary=1, seed=3).up_at_step(t) for t in range(1, 4001)]


@pytest.mark.parametrize(
    "text,message",
    [
        ("sometimes", "'sometimes' is not KEY=VALUE"),
        ("p=1.5", "p must be in (0, 1]"),
        ("outage=0:5", "outages need a start >= 1"),
        ("outage=5", "outage=5 is not START:LEN"),
        ("bw=10", "bw=10 needs a unit, e.g. bw=10Mbit"),
        ("bw=10Mbyte", "bw=10Mbyte needs a unit"),
        ("bw=0Mbit", "bw=0Mbit must be more than 0"),
        ("lat=fast", "lat=fast needs a unit, e.g. lat=20ms"),
        ("lat=-5ms", "lat=-5 is not a number >= 0"),
        ("mtbf=60s", "random outages need both mtbf and mttr"),
        ("mtbf=60s,mttr=0s", "mttr=0s must be more than 0"),
        ("jitter=5ms", "unknown property 'jitter'"),
        ("bw=1Gbit,bw=10Mbit", "bw is given twice"),
        ("bw=1Mbit,eff=0", "eff=0 must be in (0, 1]"),
        ("bw=1Mbit,eff=1.2", "eff=1.2 must be in (0, 1]"),
        ("bw=1Mbit,eff=-0.5", "eff=-0.5 must be in (0, 1]"),
        ("bw=1Mbit,eff=most", "eff=most must be in (0, 1]"),
        ("bw=1Mbit,msg=2", "msg=2 needs a unit, e.g. msg=1.5ms"),
    ],
)
def test_bad_link_specs_say_what_is_wrong_in_one_line(text, message):
    with pytest.raises(ConfigError) as e:
        check_links(text, 3)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_rivals_link_refuses_step_based_availability_and_keeps_timed_outages():
    for text in ("p=0.9", "bw=1Gbit,outage=3:2", "up|p=0.5"):
        check_links(text, 3)  # the parts count their steps
        with pytest.raises(ConfigError, match="p= and outage= count a part's steps, but a rival sends by the clock"):
            check_links(text, 3, timed_by="a rival")
    check_links("bw=10Mbit,mtbf=60s,mttr=15s", 3, timed_by="a rival")


def test_link_count_must_match_boundaries():
    with pytest.raises(ConfigError, match="names 3 boundaries, 3 parts have 2"):
        check_links("up|up|up", 3)


def test_a_message_takes_its_bytes_over_the_bandwidth_plus_the_latency():
    clock = FakeClock(100.0)
    wire = Wire(LinkSpec.parse("bw=8Mbit,lat=20ms"), clock)
    arrival = wire.transmit(1_000_000)  # 8 Mbit at 8 Mbit/s: 1 s on the wire
    assert arrival == pytest.approx(100.0 + 1.0 + 0.02)
    assert clock.now() == pytest.approx(101.0)  # the sender's thread spent the wire time, not the latency
    # one wire: the next message starts when the last one's bytes are out
    assert wire.transmit(500_000) == pytest.approx(101.0 + 0.5 + 0.02)


def test_a_real_links_costs_stretch_each_messages_bytes_and_add_a_fixed_time_per_message():
    s = LinkSpec.parse("bw=8Mbit,lat=20ms,eff=0.8,msg=15ms")
    assert (s.efficiency, s.per_message) == (0.8, 0.015) and not LinkSpec.parse("msg=1ms").ideal
    clock = FakeClock(100.0)
    wire = Wire(s, clock)
    # 1 MB is 1 s at 8 Mbit/s; at 80% of the rate 1.25 s, and 15 ms for the message
    assert wire.transmit(1_000_000) == pytest.approx(100.0 + 1.25 + 0.015 + 0.02)
    assert wire.transmit(500_000) == pytest.approx(101.265 + 0.625 + 0.015 + 0.02)  # serialised behind it
    # many small messages cost their count, not their bytes: 100 of 100 B at an infinite rate
    fast = Wire(LinkSpec.parse("bw=inf,msg=2ms"), FakeClock(0.0))
    assert [fast.transmit(100) for _ in range(100)][-1] == pytest.approx(100 * 0.002)


def test_a_schedules_real_costs_are_charged_per_boundary_at_its_bandwidth():
    from raylocal.core.links import with_real_costs

    # a part's packet at 10 Mbit: a Ray object (c 1.05, d 1.5 ms), the queue's put and get (0.6 ms each)
    parts = LinkSpec.parse(with_real_costs("bw=10Mbit,lat=20ms", "async"))
    assert parts.transfer_s(1_250_000) == pytest.approx(1.05 + 0.0015 + 2 * 0.0006, rel=1e-4)
    assert parts.latency == 0.02 and with_real_costs("bw=10Mbit", "pipeline") == with_real_costs("bw=10Mbit", "async")
    # a DDP bucket or local-SGD round at 1 Mbit: a gloo all-reduce (c 1.17, d 4.7 ms); per boundary, inf uncharged
    both = with_real_costs("bw=1Mbit|bw=inf,lat=5ms", "data-parallel")
    assert LinkSpec.parse(both, 0).transfer_s(125_000) == pytest.approx(1.17 + 0.0047, rel=1e-4)
    assert both.split("|")[1] == "bw=inf,lat=5ms"
    assert with_real_costs("bw=1Mbit", "e2e") == "bw=1Mbit"  # one device sends nothing
    with pytest.raises(ConfigError, match=r"^link 'bw=512Kbit': no measured costs at its bandwidth \(measured at 100"):
        with_real_costs("bw=512Kbit", "async")


def test_nothing_crosses_a_link_that_is_down_by_step():
    wire = Wire(LinkSpec.parse("outage=4:3,lat=5ms"), FakeClock())
    assert [wire.transmit(100, step) is None for step in range(1, 9)] == [False] * 3 + [True] * 3 + [False] * 2


def test_random_outages_are_seeded_and_down_as_often_as_mttr_says():
    a, b = TimedOutages(60.0, 15.0, seed=1), TimedOutages(60.0, 15.0, seed=1)
    times = [i * 0.5 for i in range(400_000)]  # 200 000 s: about 2 700 cycles
    ups = [a.is_up(t) for t in times]
    assert ups[:5000] == [b.is_up(t) for t in times[:5000]]
    assert sum(not u for u in ups) / len(ups) == pytest.approx(15 / 75, abs=0.02)
    assert ups[0]  # a link starts up


def test_nothing_crosses_a_link_in_a_timed_outage_and_deliver_waits_for_it():
    clock = FakeClock(0.0)
    wire = Wire(LinkSpec.parse("bw=8Mbit,mtbf=60s,mttr=15s"), clock)
    down_at = wire.outages.next_change(0.0)
    back_at = wire.outages.next_change(down_at)
    clock.t = down_at + 1e-6
    assert not wire.up() and wire.transmit(10) is None
    clock.t = down_at - 0.5  # a 1-second message that the outage cuts after 0.5 s is lost
    assert wire.transmit(1_000_000) is None and clock.now() == pytest.approx(down_at)
    # a message that must cross (a weight sync, a DDP bucket) waits for the link and is then sent
    assert wire.deliver(1_000_000) == pytest.approx(back_at + 1.0)


def _sender(full: str, clock: FakeClock, channel: PacketChannel, link: str = "up") -> tuple[LinkSender, WorkerStats]:
    stats = WorkerStats()
    return LinkSender(channel, LinkSpec.parse(link), lambda x: x, stats, index=0, full=full, clock=clock), stats


def test_the_sender_stamps_arrival_times_of_back_to_back_messages():
    clock = FakeClock(0.0)
    channel = PacketChannel(10)
    sender, stats = _sender("block", clock, channel, link="bw=8Mbit,lat=20ms")
    latent = torch.zeros(250_000)  # 1 MB of float32: 1 s at 8 Mbit/s
    for step in range(1, 4):
        sender.send({"kind": "data", "step": step, "latent": latent, "weights": None})
    sender.close()
    packets = [channel.get() for _ in range(4)]
    arrivals = [p["arrive_at"] for p in packets[:3]]
    assert arrivals == pytest.approx([1.02, 2.02, 3.02])
    assert stats.bytes_forward == 3 * 1_000_000 and packets[-1]["kind"] == "end"


def _run_with_timeout(fn, seconds: float = 30.0) -> None:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"


def test_drop_oldest_never_blocks_counts_its_drops_and_keeps_their_weights():
    channel = PacketChannel(2)  # nobody reads it
    sender, stats = _sender("drop-oldest", FakeClock(), channel)
    weights = {0: [1, {"w": torch.ones(3)}, 12]}

    def produce():
        for step in range(1, 21):
            synced = weights if step == 1 else None
            sender.send({"kind": "data", "step": step, "latent": torch.zeros(4), "weights": synced})

    _run_with_timeout(produce)  # with --full block this would wait forever on the full queue
    got: list[dict] = []

    def read_until_end():
        while not got or got[-1]["kind"] != "end":
            got.append(channel.get())

    reader = threading.Thread(target=read_until_end, daemon=True)
    reader.start()
    _run_with_timeout(sender.close)  # the end packet waits for room: the reader makes it
    reader.join(10)
    packets = got[:-1]
    in_flight = len(packets)
    assert stats.dropped_latents + in_flight == 20
    assert packets[-1]["step"] == 20
    # the sync of step 1 was dropped with its latent, yet still crosses with a newer one
    assert any(p["weights"] and p["weights"][0][0] == 1 for p in packets)


def test_block_waits_for_room():
    channel = PacketChannel(1)
    sender, stats = _sender("block", FakeClock(), channel)
    sent = []

    def produce():
        for step in range(1, 6):
            sender.send({"kind": "data", "step": step, "latent": torch.zeros(4), "weights": None})
            sent.append(step)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30  # however slow the machine: until three sends are through
    while len(sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.join(0.2)
    # one packet in the channel, one on the link's thread, one in its slot: the fourth send waits
    assert thread.is_alive() and len(sent) == 3
    got = [channel.get()["step"] for _ in range(5)]
    thread.join(5)
    assert got == [1, 2, 3, 4, 5] and stats.dropped_latents == 0


def test_the_receiver_hands_over_a_packet_only_once_it_has_arrived():
    clock = FakeClock(10.0)
    channel = PacketChannel(4)
    channel.put({"kind": "data", "step": 1, "latent": torch.ones(2, dtype=torch.bfloat16), "arrive_at": 12.5})
    receiver = LinkReceiver(channel, lambda r: r, clock)
    packet = receiver.get()
    assert clock.now() == pytest.approx(12.5)  # its thread waited out the latency
    assert packet["latent"].dtype == torch.float32  # the receiver trains in float32


def test_a_traced_packet_spends_its_bytes_over_the_bandwidth_on_the_wire_and_the_latency_before_it_is_ready():
    clock = FakeClock(1000.0)
    channel = PacketChannel(4)
    stats = WorkerStats()
    spec = LinkSpec.parse("bw=8Mbit,lat=20ms")
    sender = LinkSender(channel, spec, lambda x: x, stats, 0, "block", clock, trace_packets=5)
    receiver = LinkReceiver(channel, lambda r: r, clock, trace=stats.received_trace, trace_packets=5)
    sender.send({"kind": "data", "step": 1, "latent": torch.zeros(250_000), "weights": None})  # 1 MB: 1 s
    receiver.get()
    sender.close()
    assert receiver.get()["kind"] == "end"
    assert stats.sent_trace[0] == [1, "data", 1_000_000, 0, 1000.0, 1000.0, 1001.0, 1001.0, 1001.0]
    # got as the put returned; ready once the 20 ms are over; taken at once (the part was waiting)
    assert stats.received_trace[0] == pytest.approx([1, "data", 0, 1001.0, 1001.02, 1001.02, 1001.02, 1001.02, 1001.02])
    delays = packet_delays(stats.sent_trace, stats.received_trace)["latent only"]
    assert delays["on the emulated wire"]["max"] == pytest.approx(1.0)
    assert delays["waiting out the emulated latency"]["max"] == pytest.approx(0.02)
    # the end packet, sent once the part had taken the latent, has no bytes: it waits only the latency
    assert delays["handed to taken"]["count"] == 2 and delays["handed to taken"]["max"] == pytest.approx(1.02)
    assert delays["handed to taken"]["min"] == pytest.approx(0.02)
    # the end packet is traced like any (its step: the sender's step count, 0 here without a part loop)
    assert [row[:2] for row in stats.received_trace] == [[1, "data"], [0, "end"]]


def _worker_pair(mnist_dir, **kw):
    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, parts=2, part_spec="1|2", schedule="async", epochs=2, samples=0,
        progress=False,
    )  # fmt: skip
    values.update(kw)
    config = RaylocalConfig(**values)
    data = load_dataset("mnist", mnist_dir)
    bounds = list(parse_part_spec("1|2", Glow((1, 8, 8), **config.glow_kwargs())).bounds)
    return [PartWorker(config, bounds, k, (1, 8, 8), data.train) for k in range(2)]


def test_starve_stale_never_waits_for_a_latent(mnist_dir, monkeypatch):
    torch.set_num_threads(1)
    up, down = _worker_pair(mnist_dir, starve="stale")
    inbox = PacketChannel(4)
    with torch.no_grad():
        inbox.put({"kind": "init", "step": 0, "latent": up.part(up.init_batch())[0], "weights": None})
    blocking = []
    original = LinkReceiver.get

    def recording_get(self, block=True):
        blocking.append(block)
        return original(self, block)

    monkeypatch.setattr(LinkReceiver, "get", recording_get)
    stats = {}
    loop = PartLoop(down, inbox, None, lambda x: x, lambda r: r, n_steps=5)
    thread = threading.Thread(target=lambda: stats.update(st=loop.run()), daemon=True)
    thread.start()
    for _ in range(3000):  # its 5 steps, none of them waiting for the upstream
        if down.step == 5:
            break
        threading.Event().wait(0.01)
    inbox.put({"kind": "end", "step": 0, "weights": None})  # then the upstream ends, and the part with it
    thread.join(30)
    st = stats["st"]
    # the upstream never sent a latent after the init: every step trained on a local input at once
    assert st.steps == 5 and st.stale_steps == 5 and st.fresh_steps == 0
    assert blocking == [True] + [False] * 5  # only the init was waited for


def test_wire_dtype_halves_the_bytes_and_the_receiver_trains_in_float32(mnist_dir):
    torch.set_num_threads(1)
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        up, down = _worker_pair(mnist_dir, wire_dtype=dtype)
        channel = PacketChannel(64)
        st_up = PartLoop(up, None, channel, lambda x: x, lambda r: r, n_steps=4).run()
        st_down = PartLoop(down, channel, None, lambda x: x, lambda r: r, n_steps=4).run()
        sizes[dtype] = st_up.bytes_forward
        assert st_down.fresh_steps == 4 and all(math.isfinite(v) for v in st_down.losses)
    assert sizes["bfloat16"] * 2 == sizes["float32"]


def test_every_latent_a_part_receives_goes_to_its_device_through_pinned_memory(mnist_dir, monkeypatch):
    """As the data batches do (``to_device``: on a GPU a pinned, non-blocking copy,
    so that the training thread does not stall on a pageable one)."""
    import raylocal.pipeline.worker as worker_module

    moved = []
    real = worker_module.to_device
    monkeypatch.setattr(worker_module, "to_device", lambda x, device: moved.append(x) or real(x, device))
    torch.set_num_threads(1)
    up, down = _worker_pair(mnist_dir, wire_dtype="bfloat16")
    channel = PacketChannel(64)
    PartLoop(up, None, channel, lambda x: x, lambda r: r, n_steps=4).run()
    moved.clear()  # the first part's data batches
    st = PartLoop(down, channel, None, lambda x: x, lambda r: r, n_steps=4).run()
    assert st.fresh_steps == 4 and len(moved) == 4 and all(x.dtype == torch.float32 for x in moved)


def test_a_part_that_finishes_first_lets_its_sender_finish_too(mnist_dir):
    """With --starve stale (or a time budget) the receiver can be done while its
    sender still sends: it must take what comes, or the sender waits forever."""
    torch.set_num_threads(1)
    up, down = _worker_pair(mnist_dir, starve="stale")
    channel = PacketChannel(1)
    done = {}

    def sender():
        done["up"] = PartLoop(up, None, channel, lambda x: x, lambda r: r, n_steps=8).run()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    receiver = PartLoop(down, channel, None, lambda x: x, lambda r: r, n_steps=2)
    _run_with_timeout(lambda: done.update(down=receiver.run()))
    thread.join(30)
    assert not thread.is_alive(), "the sender waited for room on a finished part"
    assert done["up"].steps == 8 and done["down"].steps == 2


def test_deliver_through_many_outages_at_wall_clock_magnitudes_ends():
    """At time.time()'s magnitude (1.8e9 s) a time shifted by the origin rounds;
    a retry that landed just before an outage's change point found the same
    outage forever (seen as a DDP run that never ended)."""
    clock = FakeClock(1.764e9 + 0.123456789)
    wire = Wire(LinkSpec.parse("bw=10Mbit,mtbf=2s,mttr=1s", seed=4), clock)
    done = []

    def send_many():
        for _ in range(300):  # 0.5 s each: many are cut by an outage and sent again
            done.append(wire.deliver(625_000))

    _run_with_timeout(send_many, 20)
    assert len(done) == 300 and done == sorted(done)
    assert all(wire.outages.is_up(a - wire.origin - 1e-4) for a in done)  # each arrived over an up link


def test_a_lost_init_latent_initialises_the_part_from_the_next_latent(mnist_dir):
    """An upstream that crashed before its init latent was fetched restarts from its
    checkpoint and sends no init again: the downstream initialises from its next latent."""
    torch.set_num_threads(1)
    up, down = _worker_pair(mnist_dir)
    with torch.no_grad():
        first = up.part(up.init_batch())[0]
    inbox = PacketChannel(4)
    inbox.put({"kind": "init", "step": 0, "latent": "gone", "weights": None})  # died with its owner
    inbox.put({"kind": "data", "step": 1, "latent": first, "weights": None})
    inbox.put({"kind": "end", "step": 1, "weights": None})
    store_get = {"gone": None}.get  # what get_or_none gives for an object lost with its owner
    st = PartLoop(down, inbox, None, lambda x: x, lambda r: r if torch.is_tensor(r) else store_get(r), 2).run()
    assert st.lost_packets == 1 and st.steps == 2
    # its ActNorms were initialised on that latent: the part's output is standardised on it
    with torch.no_grad():
        y = down.part(first)[0]
    assert y.mean().abs() < 0.1 and (y.std() - 1).abs() < 0.2


def test_drop_oldest_keeps_the_newest_packets():
    """A full channel makes room by dropping its oldest data packet, never the newest:
    what waits there is always the latest the sender produced."""
    channel = PacketChannel(2)
    dropped = [channel.put_latest({"kind": "data", "step": s, "weights": None}) for s in range(1, 6)]
    assert dropped == [0, 0, 1, 1, 1]
    assert [channel.get()["step"] for _ in range(2)] == [4, 5]
    # the init packet is no data packet: it stays, whatever comes after it
    channel.put({"kind": "init", "step": 0, "weights": None})
    for s in range(1, 4):
        channel.put_latest({"kind": "data", "step": s, "weights": None})
    assert [channel.get()["kind"], channel.get()["step"]] == ["init", 3]


def _arrived(step: int, weights: dict | None = None) -> dict:
    return {"kind": "data", "step": step, "latent": torch.full((2,), float(step)), "weights": weights, "arrive_at": 0}


@pytest.mark.parametrize("keep_latest", [True, False])
def test_a_receiver_fed_faster_than_it_consumes_delivers_the_newest_under_drop_oldest(keep_latest):
    """Under --full drop-oldest the part takes the newest latent that has arrived,
    whatever waited before it (the weight syncs of those replaced carried on);
    under --full block, every latent in order."""
    channel = PacketChannel(8)
    sync = {0: [3, {"w": torch.ones(1)}, 4]}
    for step in range(1, 7):
        channel.put(_arrived(step, sync if step == 3 else None))
    receiver = LinkReceiver(channel, lambda r: r, FakeClock(10.0), keep_latest=keep_latest)
    deadline = time.monotonic() + 30  # until the receiver has taken what it can: all, or two (slot and hand)

    def settled() -> bool:
        return receiver.superseded == 5 if keep_latest else channel.qsize() == 4

    while not settled() and time.monotonic() < deadline:
        time.sleep(0.01)
    packet = receiver.get()
    if keep_latest:
        assert packet["step"] == 6 and receiver.superseded == 5
        assert packet["weights"] == {0: sync[0]} and torch.equal(packet["states"][0]["w"], torch.ones(1))
    else:
        assert [packet["step"], receiver.get()["step"]] == [1, 2] and receiver.superseded == 0


def test_the_receiver_never_replaces_the_init_or_the_end():
    channel = PacketChannel(8)
    channel.put({"kind": "init", "step": 0, "latent": torch.zeros(2), "weights": None, "arrive_at": 0})
    channel.put(_arrived(1))
    channel.put({"kind": "end", "step": 1, "weights": None, "arrive_at": 0})
    receiver = LinkReceiver(channel, lambda r: r, FakeClock(10.0), keep_latest=True)
    assert [receiver.get()["kind"] for _ in range(3)] == ["init", "data", "end"]


def test_int8_on_the_wire_is_within_half_a_scale_and_a_quarter_of_the_bytes():
    from raylocal.core.tensors import tensor_bytes
    from raylocal.pipeline.worker import to_wire
    from raylocal.training.trainer import from_wire

    x = torch.randn(64, 4, 14, 14, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1, 10, 0]).view(
        1, 4, 1, 1
    )  # channels of very different sizes, one all zeros
    payload, _ = to_wire(x, torch.int8)
    assert payload["int8"].dtype == torch.int8 and payload["scale"].shape == (4,)
    scale = payload["scale"].view(1, 4, 1, 1)
    back = from_wire(payload)
    assert back.dtype == torch.float32
    assert bool(((back - x).abs() <= scale / 2 * (1 + 1e-6)).all())  # round to nearest: half a step at most
    assert float((back - x).abs().max()) > 0  # (it really quantised)
    assert torch.equal(back[:, 3], x[:, 3])  # zeros stay zeros
    assert tensor_bytes(payload) == x.numel() + 4 * 4  # the scales are counted
    assert tensor_bytes(payload) <= 0.27 * tensor_bytes(x)


def test_tensor_bytes_counts_every_tensor_of_a_nested_payload_at_its_own_width():
    from raylocal.core.tensors import tensor_bytes
    from raylocal.model.glow import Glow

    payload = {"a": torch.zeros(3, 5), "b": [torch.zeros(7, dtype=torch.bfloat16), (torch.zeros(2, dtype=torch.int8),)]}
    assert tensor_bytes(payload | {"step": 4, "name": "x"}) == 3 * 5 * 4 + 7 * 2 + 2 * 1  # non-tensors count 0
    glow = Glow((1, 8, 8), n_levels=2, depth=1, hidden=8)
    assert glow.param_bytes() == 4 * sum(p.numel() for p in glow.parameters())  # float32
    assert glow.double().param_bytes() == 8 * sum(p.numel() for p in glow.parameters())
