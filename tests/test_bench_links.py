"""scripts/bench_links.py: the projection from the config alone, the cell order, and resuming."""

from __future__ import annotations

import json

import pytest

from raylocal.baselines.projection import StepModel, WireBytes, bandwidth_losing, wire_bytes_per_step
from raylocal.bench import links as bench_links
from raylocal.core.config import RaylocalConfig
from raylocal.training.trainer import build_glow


@pytest.fixture(scope="module")
def bench():
    return bench_links


@pytest.mark.parametrize("wire_dtype,bytes_per_value", [("float32", 4), ("bfloat16", 2)])
def test_projection_counts_latents_syncs_init_all_reduce_and_averaging_bytes_by_hand(wire_dtype, bytes_per_value):
    config = RaylocalConfig(
        n_levels=2, depth=2, hidden=8, batch_size=16, schedule="async", parts=2, part_spec="1|2",
        average_every=10, wire_dtype=wire_dtype, sync_every=50, init_batch_size=64,
    )  # fmt: skip
    b = wire_bytes_per_step(config, (1, 8, 8), steps=100, workers=4)
    glow = build_glow(config, (1, 8, 8))
    # block 1 squeezes 1x8x8 to 4x4x4 and splits half off: part 1 sends 2x4x4 per image; its weights
    # every 50 steps; the init packet's 64 latents once in the 100 steps
    latent = 2 * 4 * 4 * bytes_per_value
    part1 = sum(p.numel() * 4 for p in glow.part(0, 8).parameters())
    assert b.latents == 16 * latent
    assert b.parts == pytest.approx(16 * latent + part1 / 50 + 64 * latent / 100)
    params = sum(p.numel() for p in glow.parameters())
    assert b.parameters == params
    assert b.ddp == pytest.approx(2 * 3 / 4 * params * 4)  # a ring all-reduce over 4 workers
    assert b.local_sgd == pytest.approx(b.ddp / 10) and b.local_sgd_round == b.ddp
    assert b.pipeline == 2 * 16 * 2 * 4 * 4 * 4  # float32 activations forward, their gradients back


def test_step_time_models_by_hand():
    b = WireBytes(parameters=0, latents=0, parts=1e6, ddp=2e6, local_sgd=4e4, local_sgd_round=2e6, pipeline=5e5)
    m = StepModel(compute=0.3, parts=2, forward_share=1 / 3, buckets=3, average_every=50, micro_batches=4)
    bw, lat = 80e6, 0.01  # 10 MB/s
    assert m.parts_step(b, bw, lat) == pytest.approx(max(0.15, 0.1))
    assert m.ddp_step(b, bw, lat) == pytest.approx(0.1 + max(0.2, 0.2 + 3 * 0.01))
    assert m.local_sgd_step(b, bw, lat) == pytest.approx(0.3 + (0.2 + 0.01) / 50)
    assert m.pipeline_step(b, bw, lat) == pytest.approx(5 / 4 * 0.15 + 2 * (0.025 + 0.01))
    # parts lose 10% where their 1 MB takes 0.15 / 0.9 s: at 8e6 x 0.9 / 0.15 bit/s
    assert bandwidth_losing(lambda bw: m.parts_step(b, bw, 0.0)) == pytest.approx(8e6 * 0.9 / 0.15, rel=1e-6)
    assert bandwidth_losing(lambda bw: 1.5) == 1.0  # never link-bound: the lowest bandwidth it tries
    # against its own step on an infinitely fast link, latency included: 0.1 + 3 x 1.0 s; 10% more is
    # 3.1 / 0.9 s, which 2 MB fill at 16e6 / (3.1 / 0.9 - 3.1) bit/s
    assert bandwidth_losing(lambda bw: m.ddp_step(b, bw, 1.0)) == pytest.approx(16e6 / (3.1 / 0.9 - 3.1), rel=1e-6)


def test_cells_run_the_floor_first_and_each_fine_tune_after_what_it_chooses_from(bench):
    order = bench.cells(["inf", "10Mbit"])
    assert order[0] == ("one-device", None) and len(order) == 11
    for link in ("inf", "10Mbit"):
        ft = order.index(("parts+ft", link))
        assert all(order.index((m, link)) < ft for m in ("ddp", "local-sgd", "pipeline", "parts"))


OPTS = type("Opts", (), dict(budget=1.0, test_subset=10, train_subset=None, average_every=5, outer_lr=None))


def _cell(bench, method: str, link: str | None, **result) -> dict:
    """A finished cell's JSON, as a cell writes it: its result, its settings and its host."""
    return result | {"settings": bench.cell_settings(method, link, OPTS), "host": {"commit": "c", "cpu": "x"}}


def test_a_finished_cell_is_read_back_and_one_with_other_settings_is_refused_in_one_line(bench, tmp_path, monkeypatch):
    stored = _cell(bench, "ddp", "10Mbit", test_bpd=3.5)
    (tmp_path / "ddp-10Mbit.json").write_text(json.dumps(stored))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert bench.run_cell("ddp", "10Mbit", OPTS, tmp_path) == stored
    (tmp_path / "local-sgd-10Mbit.json").write_text(json.dumps(_cell(bench, "local-sgd", "10Mbit", test_bpd=3.4)))
    other = type("Opts", (OPTS,), dict(average_every=50))  # H 50 now, 5 when the cell ran
    with pytest.raises(SystemExit, match=r"local-sgd-10Mbit.json was run with other settings \(average_every 5 here, "
                       r"50 now\); move it away or use another --out$"):  # fmt: skip
        bench.run_cell("local-sgd", "10Mbit", other, tmp_path)
    (tmp_path / "parts-10Mbit.json").write_text(json.dumps({"test_bpd": 3.0}))  # from before cells recorded theirs
    with pytest.raises(SystemExit, match=r"parts-10Mbit.json was run with other settings \(none recorded\)"):
        bench.run_cell("parts", "10Mbit", OPTS, tmp_path)


def test_the_host_figures_name_the_commit_the_cpu_and_a_speed_probe(bench):
    host = bench.host_figures(0.2)
    assert len(host["commit"]) >= 7 and host["cpu"] != "" and 10 < host["probe_images_per_s"] < 1e5
    assert bench.host_figures(0)["probe_images_per_s"] is None


def test_the_inf_speedup_is_the_median_of_side_by_side_repeats(bench, tmp_path, monkeypatch):
    assert bench.repeat_cells(["10Mbit"], 3) == []  # the speed-up is measured at ∞ only
    order = bench.repeat_cells(["10Mbit", "inf"], 3)
    assert order == [("one-device", None, 2), ("parts", "inf", 2), ("one-device", None, 3), ("parts", "inf", 3)]
    # a repeat is a cell of its own: its own file, read back once finished
    (tmp_path / "parts-inf-run2.json").write_text(json.dumps(_cell(bench, "parts", "inf", images_per_s=350.0)))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert bench.run_cell("parts", "inf", OPTS, tmp_path, 2)["images_per_s"] == 350.0
    results = {("one-device", None): {"images_per_s": 100.0}, ("parts", "inf"): {"images_per_s": 150.0, "idle": 0.01}}
    again = {
        ("one-device", None, 2): {"images_per_s": 200.0}, ("parts", "inf", 2): {"images_per_s": 350.0},
        ("one-device", None, 3): {"images_per_s": 100.0}, ("parts", "inf", 3): {"images_per_s": 190.0},
    }  # fmt: skip
    assert bench.speedups(results, again) == [1.5, 1.75, 1.9]
    lines = bench.check_targets(results, ["inf"], again)
    median = "inf: parts / one device = 1.75x (median of 3 runs: 1.50, 1.75, 1.90; target >= 1.75x, median of 3)"
    assert lines[-1] == f"{median}: met"
    assert bench.check_targets(results, ["inf"])[-1].startswith("inf: parts / one device = 1.50x (one run;")


def test_the_figure_draws_each_method_from_the_slowest_link_to_the_fastest(bench):
    assert bench.by_bandwidth(["10Mbit", "inf", "10Mbit+outages", "1Mbit", "100Mbit"]) == [
        "1Mbit", "10Mbit", "100Mbit", "inf",
    ]  # fmt: skip


def test_only_the_first_parts_cell_keeps_the_weights_a_fine_tune_starts_from(bench, tmp_path, monkeypatch):
    calls = []

    def fake_subprocess_run(argv, **kwargs):  # runs the cell in this process, with a parts run that is instant
        calls.append(argv)
        bench.cell_main(json.loads(argv[-1]))
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})

    monkeypatch.setattr(bench, "run_parts", lambda args: {"test_bpd": 3.0, "state": {"w": bench.torch.zeros(2)}})
    monkeypatch.setattr(bench.subprocess, "run", fake_subprocess_run)
    for run in (1, 2):
        cell = bench.run_cell("parts", "inf", OPTS, tmp_path, run, host={"commit": "c"})
        assert cell == {"test_bpd": 3.0, "settings": bench.cell_settings("parts", "inf", OPTS), "host": {"commit": "c"}}
    assert len(calls) == 2 and (tmp_path / "parts-inf.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts-inf-run2.json", "parts-inf.json", "parts-inf.pt"]
