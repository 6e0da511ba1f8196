"""scripts/bench_links.py: the projection from the config alone, the cell order, and resuming."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from raylocal.config import RunConfig
from raylocal.train import build_glow


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_links")


@pytest.mark.parametrize("wire_dtype,bytes_per_value", [("float32", 4), ("bfloat16", 2)])
def test_projection_counts_latents_all_reduce_and_averaging_bytes_by_hand(bench, wire_dtype, bytes_per_value):
    config = RunConfig(
        n_levels=2, depth=2, hidden=8, batch_size=16, schedule="async", parts=2, part_spec="1|2",
        average_every=10, wire_dtype=wire_dtype,
    )  # fmt: skip
    b = bench.wire_bytes_per_step(config, (1, 8, 8), workers=4)
    # block 1 squeezes 1x8x8 to 4x4x4 and splits half off: part 1 sends 2x4x4 per image
    assert b["parts"] == 16 * 2 * 4 * 4 * bytes_per_value
    params = sum(p.numel() for p in build_glow(config, (1, 8, 8)).parameters())
    assert b["parameters"] == params
    assert b["ddp"] == pytest.approx(2 * 3 / 4 * params * 4)  # a ring all-reduce over 4 workers
    assert b["local-sgd"] == pytest.approx(b["ddp"] / 10)
    assert bench.link_bound_below(1e6, 0.5) == 16e6  # 1 MB per half-second step: 16 Mbit/s


def test_cells_run_the_floor_first_and_each_fine_tune_after_what_it_chooses_from(bench):
    order = bench.cells(["inf", "10Mbit"])
    assert order[0] == ("one-device", None) and len(order) == 9
    for link in ("inf", "10Mbit"):
        ft = order.index(("parts+ft", link))
        assert all(order.index((m, link)) < ft for m in ("ddp", "local-sgd", "parts"))


def test_a_finished_cell_is_read_back_not_run_again(bench, tmp_path, monkeypatch):
    (tmp_path / "ddp-10Mbit.json").write_text(json.dumps({"test_bpd": 3.5}))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("a finished cell ran again"))
    opts = type("Opts", (), dict(budget=1.0, test_subset=10, train_subset=None, average_every=5, outer_lr=None))
    assert bench.run_cell("ddp", "10Mbit", opts, tmp_path) == {"test_bpd": 3.5}


def test_the_inf_speedup_is_the_median_of_side_by_side_repeats(bench, tmp_path, monkeypatch):
    assert bench.repeat_cells(["10Mbit"], 3) == []  # the speed-up is measured at ∞ only
    order = bench.repeat_cells(["10Mbit", "inf"], 3)
    assert order == [("one-device", None, 2), ("parts", "inf", 2), ("one-device", None, 3), ("parts", "inf", 3)]
    # a repeat is a cell of its own: its own file, read back once finished
    (tmp_path / "parts-inf-run2.json").write_text(json.dumps({"images_per_s": 350.0}))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("a finished cell ran again"))
    opts = type("Opts", (), dict(budget=1.0, test_subset=10, train_subset=None, average_every=5, outer_lr=None))
    assert bench.run_cell("parts", "inf", opts, tmp_path, 2) == {"images_per_s": 350.0}
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
    opts = type("Opts", (), dict(budget=1.0, test_subset=10, train_subset=None, average_every=5, outer_lr=None))
    for run in (1, 2):
        assert bench.run_cell("parts", "inf", opts, tmp_path, run) == {"test_bpd": 3.0}
    assert len(calls) == 2 and (tmp_path / "parts-inf.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts-inf-run2.json", "parts-inf.json", "parts-inf.pt"]
