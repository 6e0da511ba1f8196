"""The data-parallel baselines on Ray Train (DDP and local SGD, over emulated links), and the
async trainer's DDP fine-tune phase."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest
import torch
from conftest import lose_the_working_directory_on_joining, tiny_options
from torch import nn

from raylocal.baselines.ddp import (
    NLL,
    LinkedAllReduce,
    LossRecord,
    OuterNesterov,
    average_parameters,
    carry_first_broadcast,
)
from raylocal.baselines.guard import NonFiniteGuard
from raylocal.baselines.projection import ring_bytes
from raylocal.cli.train import main
from raylocal.cluster.placement import WorkerBundles
from raylocal.core.checkpoint import load_checkpoint
from raylocal.core.config import RaylocalConfig
from raylocal.core.links import FakeClock, LinkSpec, Wire

pytestmark = pytest.mark.usefixtures("ray_session")


def test_async_then_ddp_finetune_on_two_workers(mnist_dir, tmp_path, monkeypatch):
    import raylocal.cluster.preflight

    storage = tmp_path / "runs"
    lose_the_working_directory_on_joining(
        monkeypatch, tmp_path, raylocal.cluster.preflight
    )  # as under `ray job submit`
    args = tiny_options(
        mnist_dir, storage, run_name="d", schedule="async", parts=2, part_spec="1|2", epochs=2,
        finetune_epochs=2, finetune_workers=2, lr=3e-3, progress=False, link="bw=1Gbit,lat=5ms",
    )  # fmt: skip
    assert main(args) == 0
    s = json.loads((storage / "d" / "summary.json").read_text())
    # the DDP workers all-reduced every gradient over the parts' link, through the hook
    from raylocal.training.trainer import build_glow

    config = RaylocalConfig(n_levels=2, depth=2, hidden=8)
    params = sum(p.numel() * 4 for p in build_glow(config, (1, 8, 8)).parameters())
    assert s["finetune_link"]["bytes_per_step"] == pytest.approx(ring_bytes(params, 2), rel=1e-6)
    assert s["finetune_link"]["idle_s"] > 0
    ft = [h for h in s["history"] if h["phase"] == "finetune"]
    assert len(ft) == 2 and all(h["ddp_images_per_s"] > 0 for h in ft)
    assert s["phase_time"]["finetune"] > 0
    assert [p["name"] for p in s["phases"]] == ["ray parts", "ddp fine-tune", "service finish"]
    # the DDP fine-tune improved the assembled model
    assert s["curve"][-1]["test_bpd"] < s["curve"][0]["test_bpd"]
    assert s["curve"][-1]["epoch"] == 4


class _Bucket:
    def __init__(self, n: int, last: bool) -> None:
        self._buffer, self._last = torch.ones(n), last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def is_last(self) -> bool:
        return self._last


def _done_now(tensor: torch.Tensor) -> torch.futures.Future:
    """An all-reduce that finished at once (one worker's view of it)."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def test_the_ddp_hook_delays_a_bucket_by_latency_plus_ring_bytes_over_bandwidth():
    clock = FakeClock(50.0)
    hook = LinkedAllReduce(LinkSpec.parse("bw=8Mbit,lat=20ms"), world=4, clock=clock, all_reduce=_done_now)
    # 250 000 float32 = 1 MB; a ring all-reduce over 4 workers sends 2*3/4 of it: 1.5 s at 8 Mbit/s
    # 250 000 float32 = 1 MB; a ring all-reduce over 4 workers sends 2*3/4 of it: 1.5 s at 8 Mbit/s
    assert ring_bytes(1_000_000, 4) == 1.5e6
    reduced = hook(_Bucket(250_000, last=False)).wait()
    assert torch.equal(reduced, torch.full((250_000,), 0.25))  # averaged over the 4 workers
    assert clock.now() == pytest.approx(50.0 + 1.5 + 0.02)
    # two buckets at once: one wire, so the second's bytes follow the first's; the latency overlaps
    start = clock.now()
    with clock._lock:  # both handed over at the same moment: time cannot move meanwhile
        first, second = (hook(_Bucket(250_000, last=last)) for last in (False, True))
    first.wait(), second.wait()
    assert clock.now() == pytest.approx(start + 1.5 + 1.5 + 0.02)
    assert hook.bytes_sent == pytest.approx(3 * 1.5e6)
    # idle: from the hand-over of the step's last bucket until DDP got it back
    assert hook.idle_s == pytest.approx(3.02)


def test_a_gpu_bucket_goes_on_the_wire_once_its_gradients_are_computed(monkeypatch):
    """On a GPU, DDP hands a bucket over when its gradient kernels are queued, not
    done: the emulated wire starts when the device has computed them (0.5 s later
    here), as a real all-reduce would, and the link's idle time counts from then."""
    import raylocal.baselines.ddp as ddp

    clock = FakeClock(50.0)

    class Kernels:  # the bucket's gradients, done 0.5 s after the hand-over
        def synchronize(self) -> None:
            clock.sleep(0.5)

    monkeypatch.setattr(ddp, "queued_work", lambda tensor: Kernels())
    hook = LinkedAllReduce(LinkSpec.parse("bw=8Mbit,lat=20ms"), world=4, clock=clock, all_reduce=_done_now)
    hook(_Bucket(250_000, last=True)).wait()  # 1.5 MB of ring bytes: 1.5 s at 8 Mbit/s
    assert clock.now() == pytest.approx(50.0 + 0.5 + 1.5 + 0.02)
    assert hook.idle_s == pytest.approx(1.52)


def test_a_gpu_bucket_waiting_behind_another_for_the_wire_is_stamped_when_its_gradients_were_done(monkeypatch):
    """Two buckets handed over at once, their gradients done 0.5 and 0.8 s later:
    each is stamped then, though the first would hold the wire for 1.5 s."""
    import queue

    import raylocal.baselines.ddp as ddp

    clock = FakeClock(50.0)

    class Kernels:
        def __init__(self, done_at: float) -> None:
            self.done_at = done_at

        def synchronize(self) -> None:
            clock.sleep_until(self.done_at)

    done_at = iter([50.5, 50.8])
    monkeypatch.setattr(ddp, "queued_work", lambda tensor: Kernels(next(done_at)))
    hook = LinkedAllReduce(LinkSpec.parse("bw=8Mbit,lat=20ms"), world=4, clock=clock, all_reduce=_done_now)
    hook._jobs = stamped = queue.Queue()  # what goes to the wire, kept here: nothing moves the clock but the kernels
    with clock._lock:
        for last in (False, True):
            hook(_Bucket(250_000, last=last))
    assert [stamped.get(timeout=10)[-1] for _ in range(2)] == [50.5, 50.8]


def test_the_ddp_hook_charges_a_real_links_costs_per_bucket_and_counts_only_the_payload():
    clock = FakeClock(50.0)
    link = LinkSpec.parse("bw=8Mbit,lat=20ms,eff=0.5,msg=10ms")
    hook = LinkedAllReduce(link, world=4, clock=clock, all_reduce=_done_now)
    hook(_Bucket(250_000, last=True)).wait()  # 1.5 MB of ring bytes at half of 8 Mbit/s: 3 s, 10 ms per bucket
    assert clock.now() == pytest.approx(50.0 + 3.0 + 0.01 + 0.02)
    assert hook.bytes_sent == pytest.approx(1.5e6)


def test_ddps_first_broadcast_holds_the_sender_until_the_models_bytes_left_and_the_others_until_they_arrived():
    # 250 250 float32 weights, 250 BatchNorm weights and biases, its running mean and
    # variance (float32) and its step count (one int64): what DDP broadcasts
    model = nn.Sequential(nn.Linear(1000, 250), nn.BatchNorm1d(250))
    nbytes = 4 * 250_250 + 4 * 500 + 4 * 500 + 8
    for rank, waited in ((0, nbytes * 8 / 8e6), (1, nbytes * 8 / 8e6 + 0.02), (2, nbytes * 8 / 8e6 + 0.02)):
        clock = FakeClock(10.0)
        wire = Wire(LinkSpec.parse("bw=8Mbit,lat=20ms"), clock)
        assert carry_first_broadcast(model, wire, rank, world=3, clock=clock) == nbytes
        assert clock.now() - 10.0 == pytest.approx(waited)
        # the wire is busy until the bytes have left: a first all-reduce queues behind them
        assert wire.free_at == pytest.approx(10.0 + nbytes * 8 / 8e6)
    clock = FakeClock(10.0)  # alone, nothing to wait for
    carry_first_broadcast(model, Wire(LinkSpec.parse("bw=8Mbit"), clock), 1, world=1, clock=clock)
    assert clock.now() == 10.0


def test_the_ddp_hook_cannot_complete_a_bucket_during_an_outage():
    clock = FakeClock(0.0)
    spec = LinkSpec.parse("bw=8Mbit,mtbf=60s,mttr=15s", seed=2)
    hook = LinkedAllReduce(spec, world=2, clock=clock, all_reduce=_done_now)
    down_at = hook.wire.outages.next_change(0.0)
    back_at = hook.wire.outages.next_change(down_at)
    clock.t = down_at + 0.1
    hook(_Bucket(250_000, last=True)).wait()
    assert clock.now() == pytest.approx(back_at + 1.0)  # 1 MB over 2 workers: 1 MB on the ring, 1 s


def test_local_sgd_averages_to_the_mean_computed_by_hand():
    torch.manual_seed(0)
    workers = [[torch.randn(3, 2), torch.randn(5)] for _ in range(3)]
    expected = [torch.stack([w[i] for w in workers]).mean(0) for i in range(2)]
    total = sum(torch.cat([p.reshape(-1) for p in w]) for w in workers)
    for params in workers:
        nbytes = average_parameters(params, lambda flat: flat.copy_(total), world=3)
        assert nbytes == 11 * 4
        assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(params, expected))


def test_local_sgd_hands_on_the_workers_average_at_the_end_of_its_budget():
    """Rank 0's model after the last step is averaged with the other worker's unless
    the last step was itself an average (every H steps, without overlap)."""
    from raylocal.baselines.ddp import DataParallelWorker

    torch.manual_seed(0)
    other = nn.Linear(3, 2)  # the second worker's model at the end, as the all-reduce brings it
    theirs = torch.cat([p.detach().reshape(-1) for p in other.parameters()])
    for step, overlap, averaged in [(7, False, True), (10, False, False), (10, True, True)]:
        worker = DataParallelWorker.__new__(DataParallelWorker)
        worker.config = RaylocalConfig(average_every=5, average_overlap=overlap)
        worker.model, worker.step, worker.world, worker.round = nn.Linear(3, 2), step, 2, None
        worker.device, worker.outer, worker.idle_s, worker.bytes_averaged = torch.device("cpu"), None, 0.0, 0.0
        worker.link, worker.sync_s, worker.rounds_s, worker.budget_clock = LinkSpec.parse("bw=inf"), 0.0, 0.0, None
        # the other worker's parameters join the round's all-reduce; its meeting's one number stays as it is
        worker._all_reduce = lambda flat, op="sum": flat.add_(theirs) if flat.numel() == theirs.numel() else flat
        mine = torch.cat([p.detach().reshape(-1) for p in worker.model.parameters()])
        worker.end_rounds()
        handed_on = torch.cat([p.detach().reshape(-1) for p in worker.model.parameters()])
        torch.testing.assert_close(handed_on, (mine + theirs) / 2 if averaged else mine)
        assert worker.bytes_averaged == (ring_bytes(mine.numel() * 4, 2) if averaged else 0.0)


def test_local_sgd_forecasts_its_last_step_at_its_meetings_and_stops_there_without_meeting_again():
    """Between rounds local SGD needs no meeting: after its first round the workers
    stop at the step their meeting forecast from the slowest clock and step, every
    worker the same one; before it they meet every step to agree on a stop flag."""
    from raylocal.baselines.ddp import BudgetForecast, DataParallelWorker

    clock = BudgetForecast(budget=12.0, started=100.0)
    assert clock.reading(105.0, 10) == [5.0, 0.5]  # 5 s so far, 10 steps of 0.5 s
    clock.forecast(6.0, 0.8, 10)  # the workers' maxima: the slowest clock, the slowest step
    assert clock.last_step == 10 + 8  # (12 - 6) / 0.8 = 7.5 steps left: the 8th ends past the budget
    assert clock.reading(110.0, 20) == [10.0, 0.5]  # the period since the last meeting
    clock.forecast(13.0, 0.5, 20)  # past the budget already: stop at this step
    assert clock.last_step == 20

    worker = DataParallelWorker.__new__(DataParallelWorker)
    worker.device, worker.world, worker.step, worker.idle_s, worker.sync_s = torch.device("cpu"), 2, 3, 0.0, 0.0
    met: list[list[float]] = []
    worker._all_reduce = lambda tensor, op="sum": met.append(tensor.tolist())
    now = time.perf_counter()
    worker.budget_clock = BudgetForecast(budget=12.0, started=now)
    assert worker.out_of_time(started=now, budget=12.0) is False and len(met) == 1  # no forecast yet: a meeting
    worker.budget_clock.last_step = 5
    assert [worker.out_of_time(now, 12.0) for worker.step in (3, 4, 5)] == [False, False, True]
    assert len(met) == 1  # no meeting since the forecast


def test_local_sgd_within_a_time_budget_stops_both_workers_at_its_forecast_step(mnist_dir, tmp_path):
    """On Ray: two local-SGD workers with a budget far shorter than their epochs stop
    together (a worker that stopped alone would hang its last round) well before
    the epochs end, and meet only until their first round forecast the stop."""
    from raylocal.baselines.ddp import train_ddp
    from raylocal.core.data import load_dataset

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, samples=0, progress=False, average_every=2,
    )  # fmt: skip
    stats: dict = {}
    images = load_dataset("mnist", mnist_dir).train  # 64 images: 4 steps an epoch per worker
    two = WorkerBundles.plan(config, 2, cpus_per_worker=0.5)
    train_ddp(config, images, two, 500, 1e-3, tmp_path / "ddp", time_budget=2.0, stats=stats)
    assert 2 <= stats["steps"] < 500 * 4  # the budget, not the epochs, ended it
    assert stats["seconds"] > 1.0  # (forecast from the steps so far: about the budget, not far short of it)


def test_an_overlapped_round_lands_one_step_late_as_a_correction_that_keeps_that_step():
    from raylocal.baselines.ddp import OverlappedRound, apply_round

    torch.manual_seed(0)
    workers = [[torch.randn(3, 2), torch.randn(5)] for _ in range(2)]
    at_round = [torch.cat([p.reshape(-1) for p in w]) for w in workers]
    mean = (at_round[0] + at_round[1]) / 2
    moved = [[p + 0.1 * (k + 1) for p in w] for k, w in enumerate(workers)]  # the step trained meanwhile
    for k, params in enumerate(moved):
        apply_round(params, at_round[k], mean)
        flat = torch.cat([p.reshape(-1) for p in params])
        assert torch.allclose(flat, mean + 0.1 * (k + 1))  # the mean, plus this worker's own last step
    alone = [torch.ones(4)]
    one = OverlappedRound(alone, world=1, wire=None)  # one worker: the round changes nothing
    alone[0].add_(1.0)
    assert one.apply() >= 0.0 and torch.equal(alone[0], torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="average_overlap applies to local SGD"):
        RaylocalConfig(average_overlap=True)
    with pytest.raises(ValueError, match="without DiLoCo's outer_lr"):
        RaylocalConfig(average_overlap=True, average_every=5, outer_lr=0.7)


def test_diloco_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    start = [torch.tensor([1.0, 2.0])]
    outer = OuterNesterov(start, lr=0.7, momentum=0.9)
    averaged = [torch.tensor([0.5, 2.5])]  # the workers moved by (-0.5, +0.5) on average
    outer.step(averaged)
    g = torch.tensor([0.5, -0.5])  # anchor - average
    # first step of SGD with Nesterov: buffer = g, update = g + momentum * buffer
    assert torch.allclose(averaged[0], torch.tensor([1.0, 2.0]) - 0.7 * (g + 0.9 * g))


def test_a_local_sgd_run_over_a_link_sends_what_the_formula_says_and_records_its_model(
    mnist_dir, tmp_path, capsys, monkeypatch
):
    """The data-parallel schedule as a run of its own (``raylocal train --schedule
    data-parallel``): local SGD's bytes as the formula says, and a record whose
    BPD is its checkpoint's, evaluated independently."""
    import raylocal.cluster.preflight
    from raylocal.run.launch import finished_run
    from raylocal.training.trainer import build_glow, evaluate_bpd

    lose_the_working_directory_on_joining(monkeypatch, tmp_path, raylocal.cluster.preflight)
    storage = tmp_path / "runs"
    args = tiny_options(
        mnist_dir,
        storage,
        run_name="local",
        schedule="data-parallel",
        workers=2,
        cpus_per_part=0.5,
        link="bw=1Gbit,lat=10ms",
        average_every=3,
        outer_lr=0.7,
        images_from="node",
        samples=0,
    )  # fmt: skip  (each worker loads the 64 images itself)
    before = signal.getsignal(signal.SIGINT)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert any(line.startswith("data-parallel ") and " 2 workers, " in line for line in printed.splitlines())
    # Ray Train's Ctrl-C handler, which holds the finished run's controller, is gone with the fit
    assert signal.getsignal(signal.SIGINT) is before
    summary = json.loads((storage / "local" / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["data-parallel training", "finish"]
    stats = summary["data_parallel"]
    config = RaylocalConfig(n_levels=2, depth=2, hidden=8)
    params = sum(p.numel() * 4 for p in build_glow(config, (1, 8, 8)).parameters())
    # 64 images in global batches of 16: 4 steps; the parameters averaged at step 3 and once more at
    # the end, so that the model handed on is the workers' average
    assert stats["steps"] == 4 and stats["images"] == 64
    assert stats["bytes_per_step"] == pytest.approx(2 * ring_bytes(params, 2) / 4, rel=1e-6)
    assert stats["idle_s"] >= 2 * 0.01  # two rounds, each at least the latency
    # taken apart: the latency is the rounds' own, after their meeting; the waits at sync points are the rest
    assert stats["rounds_s"] >= 2 * 0.01 and stats["sync_s"] > 0
    # (each worker's idle is its sync + rounds exactly; the figures are each the most of any worker)
    assert max(stats["rounds_s"], stats["sync_s"]) <= stats["idle_s"] + 1e-9
    assert stats["idle_s"] <= stats["rounds_s"] + stats["sync_s"] + 1e-9
    assert stats["allreduce_s"] is None and stats["allreduce_exposed_s"] is None  # no DDP reducer to time it
    assert stats["allreduce_exposed_least_s"] is None
    assert stats["peak_rss_mb"] > 50
    assert summary["schedule"] == "data-parallel" and summary["steps"] == 4
    run_config, data, glow = finished_run(storage / "local")
    assert all(torch.isfinite(v).all() for v in glow.state_dict().values())
    expected = evaluate_bpd(glow, data.test, 32, torch.device("cpu"))
    assert summary["test_bpd"] == pytest.approx(expected, abs=1e-9) and run_config.cluster.average_every == 3
    assert summary["curve"][-1]["epoch"] == 1.0 and summary["stopped_early"] is None
    # its checkpoint records the run's own config, not the e2e stand-in that evaluated it
    checkpoint = load_checkpoint(storage / "local" / "checkpoint.pt", kind="run")
    recorded = RaylocalConfig.model_validate_json(checkpoint["config"])
    assert (recorded.schedule.name, recorded.cluster.workers, recorded.cluster.average_every) == ("data-parallel", 2, 3)
    # a data-parallel run trains in one go: a --resume must not take its checkpoint for an e2e run's
    assert main(tiny_options(mnist_dir, storage, run_name="local", resume=True)) == 2
    assert "is a data-parallel run, which does not resume" in capsys.readouterr().err


def test_a_rival_run_refuses_what_it_cannot_do_in_one_line(mnist_dir, tmp_path, capsys):
    storage = tmp_path / "runs"
    for extra, message in [
        ({"schedule": "data-parallel", "finetune_epochs": 1}, "the data-parallel schedule trains end to end"),
        ({"schedule": "pipeline", "parts": 2, "micro_batches": 3}, "batch_size=16 does not split into micro_batches=3"),
        ({"schedule": "data-parallel", "workers": 4, "cpus_per_part": 1}, "4 data-parallel workers of {CPU 1} need"),
        ({"schedule": "data-parallel", "inject": "straggle:3@2"}, "there is no worker 3 (the run has 2 workers)"),
        ({"schedule": "data-parallel", "inject": "nan:1@2"}, "a data-parallel run takes only straggle faults, not nan"),
        ({"schedule": "pipeline"}, "a pipeline needs at least 2 stages (--parts or --part-spec), got 1"),
        ({"schedule": "pipeline", "parts": 2, "wire_dtype": "int8"}, "the pipeline sends float32 activations"),
        ({"schedule": "data-parallel", "workers": 3, "batch_size": 16}, "batch_size=16 does not split among workers=3"),
        ({"schedule": "data-parallel", "epochs": 0}, "epochs=0: a data-parallel run trains at least one epoch"),
        # settings it would ignore
        ({"schedule": "data-parallel", "eval_every": 5}, "eval_every=5: a data-parallel run evaluates once"),
        ({"schedule": "pipeline", "parts": 2, "starve": "stale"}, "starve='stale': a pipeline run has no queue"),
        ({"schedule": "pipeline", "parts": 2, "average_every": 3}, "average_every=3: a pipeline run does not use it"),
        ({"schedule": "data-parallel", "micro_batches": 2}, "micro_batches=2: a data-parallel run does not use it"),
        ({"schedule": "data-parallel", "wire_dtype": "bfloat16"}, "a data-parallel run sends float32 gradients"),
        ({"schedule": "data-parallel", "compile": True}, "compile=True: a data-parallel run trains uncompiled"),
        ({"schedule": "data-parallel", "gpus_per_part": 0}, "gpus_per_part=0.0: a data-parallel run gives each worker"),
        ({"schedule": "pipeline", "parts": 2, "max_restarts": 0}, "max_restarts=0: a pipeline run does not restart"),
        ({"schedule": "pipeline", "parts": 2, "max_rollbacks": 3}, "max_rollbacks=3: a pipeline run never rolls back"),
        ({"schedule": "data-parallel", "lr_backoff": 0.3}, "lr_backoff=0.3: a data-parallel run never rolls back"),
        # its model is evaluated in the driver, after the training: refused before it
        ({"schedule": "pipeline", "parts": 2, "device": "cuda"}, "device 'cuda': a pipeline run evaluates its model"),
    ]:
        assert main(tiny_options(mnist_dir, storage, run_name="r", **extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (storage / "r").exists()


def test_overlapped_local_sgd_sends_the_same_rounds_and_hands_on_the_workers_average(mnist_dir, tmp_path):
    from raylocal.baselines.ddp import train_ddp
    from raylocal.core.data import load_dataset
    from raylocal.training.trainer import build_glow

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, samples=0, progress=False, link="bw=1Gbit,lat=10ms", average_every=3,
        average_overlap=True,
    )  # fmt: skip
    stats: dict = {}
    two = WorkerBundles.plan(config, 2, cpus_per_worker=0.5)
    weights, _ = train_ddp(config, load_dataset("mnist", mnist_dir).train, two, 1, 1e-3, tmp_path / "ddp", stats=stats)
    params = sum(p.numel() * 4 for p in build_glow(config, (1, 8, 8)).parameters())
    # 4 steps: the round of step 3, landed after step 4, and the final average
    assert stats["steps"] == 4 and stats["bytes_per_step"] == pytest.approx(2 * ring_bytes(params, 2) / 4, rel=1e-6)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_the_data_parallel_guard_skips_a_step_without_a_finite_gradient_and_fails_after_a_run_of_them():
    from raylocal.errors import DivergedError

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(grad_clip=50.0, limit=2)
    x = torch.ones(4, 3)
    assert guard.update(model, optimizer, model(x).pow(2).mean(), step=0)
    weights = [p.detach().clone() for p in model.parameters()]
    adam_steps = [float(optimizer.state[p]["step"]) for p in model.parameters()]
    for step in (1, 2):  # a NaN in the input: no update, and Adam's moments and step count untouched
        assert not guard.update(model, optimizer, model(x * float("nan")).mean(), step=step)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == adam_steps
    assert guard.skipped == 2 and guard.update(model, optimizer, model(x).pow(2).mean(), step=3)
    assert guard.in_a_row == 0 and not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for step in (4, 5):
        guard.update(model, optimizer, model(x * float("inf")).sum(), step=step)
    with pytest.raises(DivergedError, match="3 steps in a row without a finite gradient \\(up to step 6"):
        guard.update(model, optimizer, model(x * float("nan")).mean(), step=6)


def test_the_rivals_guard_clips_the_gradients_norm_and_a_clip_of_0_leaves_it():
    """Plain SGD at LR 1 moves the weights by minus the gradient it is given: by the
    clip when the gradient's norm exceeds it, by the whole gradient without one."""
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    for clip in (1e-3, 0.0):
        model = torch.nn.Linear(3, 2)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        loss = model(x).pow(2).sum()
        full = torch.cat(
            [g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)]
        ).norm()
        assert full > 1e-2  # the clip binds
        assert NonFiniteGuard(grad_clip=clip).update(model, torch.optim.SGD(model.parameters(), lr=1.0), loss, 0)
        moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm()
        assert float(moved) == pytest.approx(clip if clip else float(full), rel=1e-4)  # (torch adds 1e-6 to the norm)


def test_ddp_training_that_diverges_fails_in_one_line_with_its_reason(mnist_dir, tmp_path):
    from raylocal.baselines.ddp import train_ddp
    from raylocal.core.data import load_dataset
    from raylocal.errors import DivergedError

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=0, threads=1, samples=0, progress=False,
    )  # fmt: skip
    data = load_dataset("mnist", mnist_dir)
    with pytest.raises(DivergedError, match="^data-parallel training diverged: 6 steps in a row") as e:
        train_ddp(config, data.train, WorkerBundles.plan(config, 2, 0.5), 3, 1e6, tmp_path / "ddp")
    assert len(str(e.value).splitlines()) == 1


def test_a_ray_train_failure_is_one_line_and_a_workers_divergence_stays_a_divergence():
    """What Ray Train raises (its worker errors wrapped, in several lines) becomes one
    line naming what ran; a worker's own DivergedError, found inside, is raised as such."""
    from raylocal.cluster.ray_train import _raise_in_one_line
    from raylocal.errors import ClusterError, DivergedError

    class Failed(Exception):
        def __init__(self, text: str, failures: dict) -> None:
            super().__init__(text)
            self.worker_failures = failures

    class Wrapped(Exception):
        def __init__(self, cause: BaseException) -> None:
            self.cause = cause

    lost = Failed("Training failed.\nWorker 1 died.\n  Traceback ...", {1: Wrapped(RuntimeError("gone"))})
    with pytest.raises(ClusterError) as e:
        _raise_in_one_line(lost, "DDP training")
    assert str(e.value) == "DDP training failed: Training failed."
    diverged = Failed("Training failed.\n...", {0: Wrapped(RuntimeError("x")), 1: Wrapped(DivergedError("nan at 6"))})
    with pytest.raises(DivergedError, match="^nan at 6$"):
        _raise_in_one_line(diverged, "DDP training")
    with pytest.raises(DivergedError, match="^nan at 7$"):  # a failure that is the worker's error itself
        _raise_in_one_line(Failed("x", {0: DivergedError("nan at 7")}), "the fine-tune")
    with pytest.raises(ClusterError, match="^the fine-tune failed: Failed$"):  # no message: its type
        _raise_in_one_line(Failed("", {}), "the fine-tune")


def test_a_compressed_bucket_crosses_the_link_in_bfloat16_and_lands_decompressed():
    clock = FakeClock(0.0)
    hook = LinkedAllReduce(
        LinkSpec.parse("bw=8Mbit"), world=2, clock=clock, all_reduce=_done_now, compress=torch.bfloat16
    )
    bucket = _Bucket(250_000, last=True)
    bucket.buffer().copy_(torch.linspace(0, 1, 250_000))
    expected = (bucket.buffer() / 2).to(torch.bfloat16).float()
    reduced = hook(bucket).wait()
    assert reduced.dtype == torch.float32 and torch.equal(reduced, expected) and reduced is bucket.buffer()
    assert hook.bytes_sent == ring_bytes(250_000 * 2, 2) and clock.now() == pytest.approx(0.5)  # 0.5 MB at 1 MB/s


def test_ddp_with_a_bucket_cap_overlaps_more_than_one_bucket_and_sends_compressed_bytes(mnist_dir, tmp_path):
    """The tiny model's whole gradient fits one bucket under DDP's default; with a cap
    DDP all-reduces several per step (after its first, which is always one), and in
    bfloat16 each worker puts half the gradient's bytes on the link. Worker 2
    straggles (1.5x): it waits, beside its compute, half as long as that. The first
    broadcast of the model holds worker 2 until it has crossed the link."""
    from raylocal.baselines.ddp import train_ddp
    from raylocal.core.data import load_dataset
    from raylocal.training.trainer import build_glow

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, samples=0, progress=False, link="bw=1Mbit,lat=20ms", bucket_cap_mb=0.001,
        ddp_compression="bf16", inject="straggle:2@1.5",
    )  # fmt: skip
    stats: dict = {}
    two = WorkerBundles.plan(config, 2, cpus_per_worker=0.5)
    images = load_dataset("mnist", mnist_dir).train
    _, history = train_ddp(config, images, two, 1, 1e-3, tmp_path / "ddp", stats=stats, loss_every=2)
    params = sum(p.numel() * 4 for p in build_glow(config, (1, 8, 8)).parameters())
    assert stats["steps"] == 4 and stats["buckets_per_step"] > 2
    # rank 0's loss curve, a point every 2 steps; the epoch's loss is the mean of its 4 steps, not its last
    curve = stats["loss_curve"]
    assert [point["step"] for point in curve] == [2, 4] and all(math.isfinite(p["loss"]) for p in curve)
    assert history[0]["loss"] == pytest.approx((curve[0]["loss"] + curve[1]["loss"]) / 2, rel=1e-9)
    # wired in: 0.5 of its compute, so a third of its time on an idle host (the exact
    # sleeps are test_straggler.py's); a loaded host's time-sharing inflates what it measures
    assert 0 < stats["straggled_s"] < stats["seconds"] / 2
    assert stats["bytes_per_step"] == pytest.approx(ring_bytes(params / 2, 2), rel=1e-6)
    buffers = sum(b.numel() * b.element_size() for b in build_glow(config, (1, 8, 8)).buffers())
    assert stats["start_bytes"] == params + buffers  # the wrap's broadcast, once, beside the steps' bytes
    assert stats["buffers_broadcast_each_step"] is False  # constant buffers: never sent again
    # DDP's reducer timed its all-reduce: the last bucket, ready as the backward pass ends, lands 20 ms
    # of latency later at the least, so that much of each step's all-reduce is left exposed
    assert 0.02 <= stats["allreduce_exposed_s"] <= stats["allreduce_s"] < stats["seconds"] / stats["steps"]
    assert 0.02 <= stats["allreduce_exposed_least_s"] <= stats["allreduce_exposed_s"]
    # each worker's own timing, gathered by rank: the most and least exposed are the all-reduced extremes
    workers = stats["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["node_id"] for w in workers] == [stats["where"]["node_id"]] * 2  # (rank 0's, recorded apart; one node)
    assert max(w["allreduce_exposed_s"] for w in workers) == pytest.approx(stats["allreduce_exposed_s"], rel=1e-12)
    assert min(w["allreduce_exposed_s"] for w in workers) == pytest.approx(stats["allreduce_exposed_least_s"])
    assert max(w["allreduce_s"] for w in workers) == pytest.approx(stats["allreduce_s"], rel=1e-12)
    assert all(w["forward_s"] > 0 and w["backward_s"] > 0 for w in workers)
    # and its steps' times on the host's one clock: each step's update ends after both workers began it
    # (the all-reduce needs both)
    first, second = workers[0]["steps"], workers[1]["steps"]
    assert len(first) == len(second) == 4
    for a, b in zip(first, second):
        assert a[0] <= a[1] <= a[2] and b[0] <= b[1] <= b[2]
        assert min(a[1], b[1]) > max(a[0], b[0])
    assert all(later[0] >= row[2] for steps in (first, second) for row, later in zip(steps, steps[1:]))
    # each worker's wrap ends before its first step and holds the emulated first broadcast: its bytes
    # crossing the 1 Mbit link (about 0.13 s), the sender's until they left, the other's until they arrived
    for worker, steps in ((workers[0], first), (workers[1], second)):
        assert worker["wrapped"][0] <= worker["wrapped"][1] <= steps[0][0]
        assert worker["wrapped"][1] - worker["wrapped"][0] >= 0.9 * stats["start_bytes"] * 8 / 1e6


def test_a_step_timeline_keeps_its_first_steps_rows_whole_and_no_later_step_touches_them():
    from raylocal.baselines.ddp import StepTimeline

    ticks = iter(range(100))
    timeline = StepTimeline(kept=2, clock=lambda: float(next(ticks)))
    for _ in range(3):
        timeline.began()
        timeline.updated()
        timeline.done()
    assert timeline.rows == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # the third step's stamps went nowhere


def test_a_loss_record_keeps_each_epochs_mean_and_a_point_every_n_steps():
    record = LossRecord(every=3)
    for step, loss in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], start=1):
        record.add(loss, step)
    assert record.curve == [{"step": 3, "loss": 2.0}, {"step": 6, "loss": 5.0}]  # step 7 waits for 8 and 9
    assert record.end_epoch() == 4.0
    assert math.isnan(record.end_epoch())  # an epoch whose every step was skipped


def test_training_never_changes_glows_buffers_so_ddp_need_not_broadcast_them():
    """DDP runs with broadcast_buffers=False: right only while no buffer changes
    after the (identical) initialisation. A running statistic would break that."""
    from raylocal.model.objectives import preprocess
    from raylocal.training.trainer import build_glow, initialize

    config = RaylocalConfig(n_levels=2, depth=2, hidden=8)
    glow = build_glow(config, (1, 8, 8))
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = preprocess(images, 8, torch.Generator().manual_seed(1))
    initialize([glow.whole()], x)
    before = {k: v.clone() for k, v in glow.named_buffers()}
    assert before and any("initialized" in k for k in before)
    model = NLL(glow)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).mean().backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in glow.named_buffers())
    assert not all(torch.equal(a, b) for a, b in zip(glow.parameters(), build_glow(config, (1, 8, 8)).parameters()))


def test_a_bucket_of_several_messages_sends_each_after_the_one_before_is_back():
    clock = FakeClock(0.0)

    def two_messages(bucket):  # as PowerSGD: the P's (and uncompressed tensors), then the Q's
        return _done_now(bucket.buffer()), [500_000, 250_000]

    hook = LinkedAllReduce(LinkSpec.parse("bw=8Mbit,lat=20ms"), world=2, clock=clock, reduce=two_messages)
    bucket = _Bucket(1000, last=True)
    assert hook(bucket).wait() is bucket.buffer()
    # ring bytes of a 2-worker all-reduce equal the message: 0.5 s + 20 ms, then 0.25 s + 20 ms
    assert hook.bytes_sent == ring_bytes(750_000, 2) and clock.now() == pytest.approx(0.79)
    assert hook.idle_s == pytest.approx(0.79)


def test_powersgd_messages_follow_torchs_own_compression_rule():
    """For each gradient, torch's ``_should_compress`` (the rule ``powerSGD_hook``
    applies) decides whether it crosses whole (the first all-reduce) or as P (rows x r, the
    second) and Q (rest x r, the third)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    from raylocal.baselines.ddp import powersgd_messages

    grads = [torch.zeros(64, 8, 3, 3), torch.zeros(64), torch.zeros(10, 2304), torch.zeros(3, 3), torch.zeros(4, 1)]
    whole = ps = qs = 0
    for g in grads:
        n, m = g.shape[0], g.numel() // g.shape[0]
        r = min(n, m, 2)
        if _should_compress(n, m, r, 2)[0]:
            ps, qs = ps + n * r, qs + m * r
        else:
            whole += g.numel()
    assert powersgd_messages(grads, rank=2) == [whole, ps, qs]
    # the conv (64 x 72) and the linear layer (10 x 2304) compress; the bias and the small ones cross whole
    assert [whole, ps, qs] == [64 + 9 + 4, 64 * 2 + 10 * 2, 72 * 2 + 2304 * 2]


def test_ddp_with_powersgd_over_the_link_sends_fewer_bytes_once_it_compresses(mnist_dir, tmp_path):
    from raylocal.baselines.ddp import train_ddp
    from raylocal.core.data import load_dataset
    from raylocal.training.trainer import build_glow

    config = RaylocalConfig(
        data_root=str(mnist_dir), n_levels=2, depth=2, hidden=8, batch_size=16, init_batch_size=64,
        warmup_steps=2, threads=1, samples=0, progress=False, link="bw=1Gbit", ddp_compression="powersgd",
        powersgd_rank=1, powersgd_start=2,
    )  # fmt: skip
    stats: dict = {}
    two = WorkerBundles.plan(config, 2, cpus_per_worker=0.5)
    weights, _ = train_ddp(config, load_dataset("mnist", mnist_dir).train, two, 1, 1e-3, tmp_path / "ddp", stats=stats)
    whole = ring_bytes(sum(p.numel() * 4 for p in build_glow(config, (1, 8, 8)).parameters()), 2)
    # 4 steps: 2 of plain all-reduces, then 2 compressed to well under half the gradient
    assert stats["steps"] == 4 and whole / 2 < stats["bytes_per_step"] < 3 / 4 * whole
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
