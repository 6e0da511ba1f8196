"""A straggler (``--inject straggle:K@F``) waits F - 1 times its own compute: in a part, a pipeline stage, the race."""

from __future__ import annotations

import threading

import pytest
import torch

from raylocal.baselines.pipeline_parallel import PipelineStage
from raylocal.bench import links as bench
from raylocal.bench import race
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.core.faults import Straggler, parse_faults
from raylocal.core.links import FakeClock
from raylocal.errors import ConfigError
from raylocal.model.glow import Glow
from raylocal.model.parts import parse_part_spec
from raylocal.pipeline.channel import PacketChannel
from raylocal.pipeline.worker import PartLoop, PartWorker
from raylocal.training.trainer import build_glow, initialize


def test_only_the_named_worker_straggles_and_waits_its_factor_less_one_times_its_compute():
    waits: list[float] = []
    faults = parse_faults("straggle:2@2.5,slow:1@0.1")
    slow, fast = Straggler(faults, 1, waits.append), Straggler(faults, 0, waits.append)
    slow.after(0.2)
    fast.after(0.2)
    slow.after(-1.0)  # a clock that stepped back: no wait
    assert waits == [pytest.approx(0.3)] and slow.waited_s == pytest.approx(0.3) and fast.factor == 1.0
    with pytest.raises(ConfigError, match=r"inject 'straggle:2@0.5': a straggler's factor is at least 1"):
        parse_faults("straggle:2@0.5")
    with pytest.raises(ConfigError, match="KIND ray-kill, sigkill, nan, slow or straggle"):
        parse_faults("lag:2@2")


def test_a_straggling_stage_waits_once_more_its_forward_and_backward_compute():
    config = RaylocalConfig(n_levels=2, depth=2, hidden=8, batch_size=8, warmup_steps=0)
    torch.manual_seed(0)
    glow = build_glow(config, (1, 8, 8))
    x = torch.rand(8, 1, 8, 8) - 0.5
    initialize([glow.whole()], x)
    stages = [PipelineStage(glow.part(a, b), config, 1e-3, 0, micro=2) for a, b in ((0, 3), (3, len(glow)))]
    waits: list[float] = []
    stages[1].straggler = Straggler(parse_faults("straggle:2@3"), 1, waits.append)
    for m, xm in enumerate(x.chunk(2)):
        stages[1].forward(m, stages[0].forward(m, xm))
    for m in range(2):
        stages[0].backward(m, stages[1].backward(m))
    assert len(waits) == 4  # two forwards, two backwards of the second stage; none of the first
    assert sum(waits) == pytest.approx(2 * stages[1].stats.compute_s) and stages[0].straggler.waited_s == 0


def test_a_straggling_part_waits_on_its_clock_and_trains_what_it_would_have(mnist_dir):
    """Two parts in lockstep (queue bound 1, --starve wait) on a fake clock: the
    second waits twice its compute on that clock; the weights are the same as
    without a straggler, which slows a part and changes nothing it computes."""
    data = load_dataset("mnist", mnist_dir)
    train = data.train[:64]

    def run(inject: str | None):
        torch.manual_seed(0)
        config = RaylocalConfig(
            data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
            warmup_steps=2, threads=1, parts=2, part_spec="1|2", schedule="simultaneous", epochs=2, samples=0,
            inject=inject,
        )  # fmt: skip
        glow = Glow((1, 8, 8), **config.glow_kwargs())
        bounds = list(parse_part_spec(config.parts.part_spec, glow).bounds)
        workers = [PartWorker(config, bounds, k, (1, 8, 8), train) for k in range(2)]
        channel, clock = PacketChannel(1), FakeClock()
        loops = [
            PartLoop(workers[0], None, channel, lambda p: p, lambda r: r, 8, clock=clock),
            PartLoop(workers[1], channel, None, lambda p: p, lambda r: r, 8, clock=clock),
        ]
        first = threading.Thread(target=loops[0].run)
        first.start()
        loops[1].run()
        first.join(timeout=60)
        return workers, loops

    plain, _ = run(None)
    workers, loops = run("straggle:2@3")
    assert loops[1].straggler.factor == 3 and loops[0].straggler.waited_s == 0
    assert loops[1].straggler.waited_s == pytest.approx(2 * workers[1].stats.compute_s)
    for a, b in zip(plain, workers):
        assert all(torch.equal(v, b.weights()[k]) for k, v in a.weights().items())


def test_the_race_straggles_every_two_worker_method_and_reports_what_each_keeps(tmp_path):
    opts = type("Opts", (), dict(
        budget=1.0, test_subset=10, train_subset=None, average_every=5, outer_lr=None, average_overlap=False,
        bucket_cap_mb=None, ddp_compression="none", sync_every=50, queue_size=1, micro_batches=4,
    ))  # fmt: skip
    settings = {m: bench.cell_settings(race.Cell(m, "10Mbit+straggler", 0), opts, "s") for m in race.METHODS}
    assert settings["one-device"]["straggler"] is None
    assert {settings[m]["straggler"] for m in race.METHODS if m != "one-device"} == {"straggle:2@2"}
    args = {"link": "10Mbit+straggler", "seed": 0}
    assert bench._config(args, schedule="async").run.inject == "straggle:2@2"
    assert bench._config(args, schedule="e2e").run.inject is None  # one device: nobody to wait for
    # a cell stored before the straggler setting existed is still the same cell
    plain = bench.cell_settings(race.Cell("ddp", "10Mbit", 0), opts, "s")
    stored = {k: v for k, v in plain.items() if k != "straggler"}
    assert bench._differing(stored, plain) == ""
    assert bench._differing(stored, plain | {"straggler": "straggle:2@2"}) == "straggler None here, 'straggle:2@2' now"
    # per block over its own one device, then straggler over plain
    speed = {("one-device", "10Mbit"): [100, 200], ("one-device", "10Mbit+straggler"): [50, 200],
             ("parts", "10Mbit"): [150, 300], ("parts", "10Mbit+straggler"): [70, 270],
             ("ddp", "10Mbit"): [80, 160], ("ddp", "10Mbit+straggler"): [20, 80]}  # fmt: skip
    results = {
        race.Cell(m, link, s): {"images_per_s": v[s], "part_images_per_s": [2 * v[s], v[s]]}
        for (m, link), v in speed.items() for s in (0, 1)
    }  # fmt: skip
    for m in ("local-sgd", "pipeline"):
        for link in ("10Mbit", "10Mbit+straggler"):
            results |= {race.Cell(m, link, s): {"images_per_s": 1.0} for s in (0, 1)}
    lines = race.straggler_lines(results, [0, 1])
    parts = [100 * (70 / 50) / (150 / 100), 100 * (270 / 200) / (300 / 200)]  # 93.3 and 90.0
    assert lines[0].startswith(f"10 Mbit with a 2x straggler: parts keep {sum(parts) / 2:.0f}% [")
    assert lines[0].endswith("(target >= 90%): met")
    assert lines[1].startswith(f"10 Mbit with a 2x straggler: the parts' first part keeps {sum(parts) / 2:.0f}% [")
    # local SGD and the pipeline kept their images/s while the one device of the straggler's block 0 halved:
    # 200% and 100%, mean 150 +- t(0.975, 1) * 50 = 635.3
    assert lines[2] == (
        "10 Mbit with a 2x straggler, the rivals keep: ddp 50% [50, 50], local-sgd 150% [-485, 785], "
        "pipeline 150% [-485, 785]"
    )  # ddp: (20/50)/(80/100) and (80/200)/(160/200)
