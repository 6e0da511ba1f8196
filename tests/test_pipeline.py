"""The pipeline logic without Ray: links, packets, staleness, equivalence with `simultaneous`."""

from __future__ import annotations

import math
import queue
import threading

import pytest
import torch

from raylocal.config import RunConfig
from raylocal.data import load_dataset
from raylocal.errors import ConfigError
from raylocal.glow import Glow
from raylocal.links import LinkModel, check_links
from raylocal.parts import parse_part_spec
from raylocal.pipeline import PartWorker, run_part
from raylocal.schedules import SingleProcessRun


def test_link_models():
    assert all(LinkModel.parse("up").is_up(t) for t in range(1, 100))
    outage = LinkModel.parse("outage=10:5,30:2")
    assert [t for t in range(1, 40) if not outage.is_up(t)] == [10, 11, 12, 13, 14, 30, 31]
    p = LinkModel.parse("p=0.7", boundary=1, seed=3)
    ups = [p.is_up(t) for t in range(1, 4001)]
    assert 0.67 < sum(ups) / len(ups) < 0.73
    assert ups == [LinkModel.parse("p=0.7", boundary=1, seed=3).is_up(t) for t in range(1, 4001)]
    per_boundary = "up|outage=3:1"
    assert LinkModel.parse(per_boundary, 0).kind == "up"
    assert not LinkModel.parse(per_boundary, 1).is_up(3)


@pytest.mark.parametrize(
    "text,message",
    [
        ("sometimes", "is not 'up', 'p=<probability>'"),
        ("p=1.5", "p must be in (0, 1]"),
        ("outage=0:5", "outages need a start >= 1"),
    ],
)
def test_bad_links(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_links(text, 3)


def test_link_count_must_match_boundaries():
    with pytest.raises(ConfigError, match="names 3 boundaries, 3 parts have 2"):
        check_links("up|up|up", 3)


def _config(mnist_dir, **kw) -> RunConfig:
    values = dict(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, parts=2, part_spec="1|2", schedule="simultaneous", epochs=2,
        samples=0, progress=False, eval_batch_size=32,
    )  # fmt: skip
    values.update(kw)
    return RunConfig(**values)


def _run_threads(config: RunConfig, train: torch.Tensor, queue_size: int = 1):
    """Run the pipeline with one thread per part and in-memory queues."""
    glow = Glow((1, 8, 8), **config.glow_kwargs())
    bounds = list(parse_part_spec(config.part_spec, glow).bounds)
    workers = [PartWorker(config, bounds, k, (1, 8, 8), train) for k in range(len(bounds))]
    queues = [queue.Queue(maxsize=queue_size) for _ in range(len(bounds) - 1)]
    n_steps = config.epochs * (len(train) // config.batch_size)
    results = [None] * len(workers)

    def go(k):
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        inbox = queues[k - 1] if k > 0 else None
        outbox = queues[k] if k < len(workers) - 1 else None
        results[k] = run_part(workers[k], inbox, outbox, lambda x: x, lambda r: r, n_steps)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return workers, results


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_threaded_pipeline_equals_simultaneous_schedule(mnist_dir, tmp_path, lr_schedule):
    # with cosine decay this also checks that every worker decays over the same planned steps
    torch.set_num_threads(1)
    config = _config(mnist_dir, storage_path=str(tmp_path), lr_schedule=lr_schedule)
    data = load_dataset("mnist", mnist_dir)
    workers, stats = _run_threads(config, data.train)
    reference = SingleProcessRun(config, data, tmp_path / "ref")
    reference.run()
    expected = reference.glow.state_dict()
    got = {}
    for w in workers:
        got.update(w.weights())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), "weights differ from the simultaneous run"
    assert [s.steps for s in stats] == [8, 8]
    # part 1 outputs 2x4x4 float32 per image: the 64-image init batch, then 8 batches of 16
    assert stats[0].bytes_forward == (64 + 8 * 16) * 2 * 4 * 4 * 4
    assert all(s.bytes_backward == 0 for s in stats)


def test_outage_trains_on_stale_weights_with_the_modelled_staleness(mnist_dir, tmp_path):
    torch.set_num_threads(1)
    # 2 epochs of 4 batches = 8 steps; link down at sender steps 4, 5, 6; sync every 2 steps
    config = _config(mnist_dir, link="outage=4:3", sync_every=2, epochs=2)
    data = load_dataset("mnist", mnist_dir)
    workers, stats = _run_threads(config, data.train, queue_size=8)
    down = stats[1]
    assert down.stale_steps == 3
    # weights were synced at steps 0 (init), 2; step 3 is up but not due; 4-6 are down:
    # the copy is version 2 while the sender is at 4, 5, 6
    assert down.staleness == [2, 3, 4]
    # the first packet after the outage (step 7) refreshes the copy
    assert workers[1].versions[0] == 7


def test_stale_input_uses_the_synced_copy_not_the_live_upstream(mnist_dir):
    torch.set_num_threads(1)
    config = _config(mnist_dir)
    data = load_dataset("mnist", mnist_dir)
    glow = Glow((1, 8, 8), **config.glow_kwargs())
    bounds = list(parse_part_spec("1|2", glow).bounds)
    up = PartWorker(config, bounds, 0, (1, 8, 8), data.train)
    down = PartWorker(config, bounds, 1, (1, 8, 8), data.train)
    y = up.initialize(up.init_batch())
    down.load_upstream(0, 0, up.weights())
    down.initialize(y)
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


def test_a_part_short_of_steps_at_the_end_makes_them_up_on_local_inputs(mnist_dir):
    """After a restore, latents that were in flight are gone: the receiver gets
    the end packet before it has trained as many steps as its sender did."""
    config = _config(mnist_dir)
    data = load_dataset("mnist", mnist_dir)
    bounds = list(parse_part_spec("1|2", Glow((1, 8, 8), **config.glow_kwargs())).bounds)
    up = PartWorker(config, bounds, 0, (1, 8, 8), data.train)
    down = PartWorker(config, bounds, 1, (1, 8, 8), data.train)
    inbox: queue.Queue = queue.Queue()
    with torch.no_grad():
        inbox.put({"kind": "init", "latent": up.part(up.init_batch())[0], "weights": None})
        for t in range(1, 4):
            inbox.put({"kind": "data", "step": t, "latent": up.part(up.data_batch())[0], "weights": None})
    inbox.put({"kind": "end", "step": 6})  # the sender trained 6 steps; latents 4-6 were lost
    st = run_part(down, inbox, None, lambda x: x, lambda r: r, n_steps=6, overlap=False)
    assert down.step == st.steps == 6 and len(st.losses) == 6
    assert st.lost_packets == 3 and st.stale_steps == 3 and st.staleness == [4, 5, 6]  # never synced: version 0
    assert all(math.isfinite(v) for v in st.losses)
