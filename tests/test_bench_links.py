"""scripts/bench_links.py: the projection from the config alone, the race's blocks and paired verdicts, resuming."""

from __future__ import annotations

import json

import pytest
import torch

from raylocal.baselines.projection import StepModel, WireBytes, bandwidth_losing, wire_bytes_per_step
from raylocal.bench import links as bench_links
from raylocal.bench import race
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
    # every 50 steps, and once more in the init packet, once in the 100 steps
    latent = 2 * 4 * 4 * bytes_per_value
    part1 = sum(p.numel() * 4 for p in glow.part(0, 8).parameters())
    assert b.latents == 16 * latent
    assert b.parts == pytest.approx(16 * latent + part1 / 50 + part1 / 100)
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


def test_each_block_runs_every_contestant_in_an_order_that_rotates_and_the_fine_tune_last():
    cells = race.race_cells(["inf", "10Mbit"], [0, 1, 2])
    assert len(cells) == 2 * 3 * 6 and len(set(cells)) == len(cells)
    blocks = [cells[i : i + 6] for i in range(0, len(cells), 6)]
    # whole seeds first: seed 0 at both links, then seed 1, ...
    assert [(b[0].seed, b[0].link) for b in blocks] == [(s, link) for s in (0, 1, 2) for link in ("inf", "10Mbit")]
    for b in blocks:
        assert {c.method for c in b} == set(race.METHODS) and {(c.seed, c.link) for c in b} == {(b[0].seed, b[0].link)}
        assert b[-1].method == "parts+ft"  # after the parts, DDP and one device it starts from and chooses between
    five = [race.block_order(k)[:5] for k in range(5)]
    for position in range(5):  # over five blocks every contestant runs once in every position
        assert sorted(order[position] for order in five) == sorted(race.CONTESTANTS)


def test_a_race_of_some_methods_rotates_those_only_and_keeps_the_fine_tune_with_what_it_needs(bench):
    cells = race.race_cells(["10Mbit"], [4, 5, 6], ("local-sgd", "parts"))
    assert [(c.seed, c.method) for c in cells] == [
        (4, "local-sgd"), (4, "parts"), (5, "parts"), (5, "local-sgd"), (6, "local-sgd"), (6, "parts"),
    ]  # fmt: skip
    # two links, two methods: each link's order still alternates from seed to seed
    two = race.race_cells(["inf", "10Mbit"], [1, 2], ("local-sgd", "parts"))
    firsts = {(c.seed, c.link): c.method for c in two[::2]}
    assert firsts[(1, "inf")] != firsts[(2, "inf")] and firsts[(1, "10Mbit")] != firsts[(2, "10Mbit")]
    with_ft = race.block_order(1, ("one-device", "ddp", "parts", "parts+ft"))
    assert with_ft == ["ddp", "parts", "one-device", "parts+ft"]
    for methods, message in [
        ("parts,sgd", r"^error: --methods 'sgd' is not one of one-device, ddp, "),
        ("parts", r"^error: --methods parts: a race needs two methods at least$"),
        ("parts,local-sgd,parts+ft", r"^error: --methods parts\+ft needs one-device too \(it starts from"),
    ]:
        with pytest.raises(SystemExit, match=message):
            bench.race_plan(bench._options(["--methods", methods, "--sweep-budget", "0"]))
    assert bench._options([]).methods == race.METHODS


def test_a_race_of_some_methods_sweeps_those_alone(bench, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run_cell", lambda cell, *a, **k: ran.append(cell.method) or {
        "test_bpd": 3.0, "images_per_s": 1.0, "bytes_per_step": 1.0, "idle": 0.0})  # fmt: skip
    monkeypatch.setattr(bench, "host_figures", lambda probe: {"commit": "c"})
    opts = bench._options(["--methods", "parts,local-sgd,one-device", "--sweep-budget", "1"])
    best = bench.run_sweep(opts, ["10Mbit"], 0, tmp_path, SPLIT)
    assert set(ran) == {"parts", "local-sgd"} and set(best["10Mbit"]) == {"parts", "local-sgd"}


def test_two_methods_raced_are_one_hypothesis_not_a_holm_family_of_two():
    from scipy import stats as scipy_stats

    bpd = {"local-sgd": [3.10, 3.20, 3.15], "parts": [3.16, 3.24, 3.23]}
    results = _race(bpd, {})
    rows = {r["method"]: r for r in race.compare_at_link(results, "10Mbit", [0, 1, 2])}
    p = scipy_stats.ttest_1samp([a - b for a, b in zip(bpd["parts"], bpd["local-sgd"])], 0).pvalue
    assert 0.025 < p < 0.05  # decided unadjusted, and undecided had Holm counted the pair twice (2p > 0.05)
    assert rows["parts"]["p_difference_holm"] == rows["local-sgd"]["p_difference_holm"] == pytest.approx(p)
    assert (rows["parts"]["adjusted"], rows["local-sgd"]["adjusted"]) == ("worse", "better")
    lines = race.check_targets(results, ["10Mbit"], [0, 1, 2])  # no DDP raced: no parts / DDP line
    assert len(lines) == 1 and lines[0].startswith("10Mbit: 2 parts − the best rival (2 local-SGD workers)")
    table = race.results_table(results, ["10Mbit"], [0, 1, 2])
    assert "| 10Mbit | 2 parts | 1 |  | 0.1 MB | 1.0 |" in table  # no one device raced: no "slower than" count


OPTS = type("Opts", (), dict(
    budget=1.0, test_subset=10, train_subset=None, average_every=5, outer_lr=None, average_overlap=False,
    bucket_cap_mb=None, ddp_compression="none", sync_every=50, queue_size=1, micro_batches=4, finished_only=False,
))  # fmt: skip
SPLIT = "layers:0-9|10-20"


def _cell(bench, cell, **result) -> dict:
    """A finished cell's JSON, as a cell writes it: its result, its settings and its host."""
    return result | {"settings": bench.cell_settings(cell, OPTS, SPLIT), "host": {"commit": "c", "cpu": "x"}}


def test_a_finished_cell_is_read_back_and_one_with_other_settings_is_refused_in_one_line(bench, tmp_path, monkeypatch):
    ddp = race.Cell("ddp", "10Mbit", 0)
    stored = _cell(bench, ddp, test_bpd=3.5)
    (tmp_path / "ddp-10Mbit-s0.json").write_text(json.dumps(stored))
    monkeypatch.setattr(bench, "_run_cell_process", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert bench.run_cell(ddp, OPTS, tmp_path, None, SPLIT) == stored
    sgd = race.Cell("local-sgd", "10Mbit", 1)
    (tmp_path / "local-sgd-10Mbit-s1.json").write_text(json.dumps(_cell(bench, sgd, test_bpd=3.4)))
    other = type("Opts", (OPTS,), dict(average_every=50))  # H 50 now, 5 when the cell ran
    with pytest.raises(SystemExit, match=r"local-sgd-10Mbit-s1.json was run with other settings \(average_every 5 "
                       r"here, 50 now\); move it away or use another --out$"):  # fmt: skip
        bench.run_cell(sgd, other, tmp_path, None, SPLIT)
    parts = race.Cell("parts", "10Mbit", 0)
    (tmp_path / "parts-10Mbit-s0.json").write_text(json.dumps(_cell(bench, parts, test_bpd=3.0)))
    with pytest.raises(SystemExit, match=r"split 'layers:0-9\|10-20' here, 'layers:0-11\|12-20' now"):
        bench.run_cell(parts, OPTS, tmp_path, None, "layers:0-11|12-20")  # another split: another race
    (tmp_path / "pipeline-10Mbit-s0.json").write_text(json.dumps({"test_bpd": 3.0}))  # from before cells recorded
    with pytest.raises(SystemExit, match=r"pipeline-10Mbit-s0.json was run with other settings \(none recorded\)"):
        bench.run_cell(race.Cell("pipeline", "10Mbit", 0), OPTS, tmp_path, None, SPLIT)


def test_the_race_split_is_measured_once_and_kept_for_a_resumed_race(bench, tmp_path, monkeypatch):
    calls = []

    def plan(self, images):
        calls.append(1)
        return {"bounds": [[0, 12], [12, 21]]}

    monkeypatch.setattr(bench.ModelService, "plan", plan)
    opts = type("Opts", (OPTS,), dict(train_subset=64, test_subset=16))
    assert bench.race_split(opts, tmp_path) == "layers:0-11|12-20"
    monkeypatch.setattr(bench.ModelService, "plan", lambda *a: pytest.fail("measured again"))
    assert bench.race_split(opts, tmp_path) == "layers:0-11|12-20" and calls == [1]


def test_the_host_figures_name_the_commit_the_cpu_and_a_speed_probe(bench):
    host = bench.host_figures(0.2)
    assert len(host["commit"]) >= 7 and host["cpu"] != "" and 10 < host["probe_images_per_s"] < 1e5
    assert bench.host_figures(0)["probe_images_per_s"] is None


def _race(bpd: dict[str, list[float]], speed: dict[str, list[float]], link: str = "10Mbit") -> dict:
    return {
        race.Cell(m, link, s): {"test_bpd": bpd[m][s], "images_per_s": speed.get(m, [1.0] * 3)[s], "idle": 0.01,
                                "bytes_per_step": 1e5}
        for m in bpd for s in range(3)
    }  # fmt: skip


def test_each_method_is_paired_by_seed_with_the_best_other_and_holm_adjusted_within_the_link():
    from scipy import stats as scipy_stats
    from statsmodels.stats.multitest import multipletests

    bpd = {
        "one-device": [3.00, 3.10, 3.05], "ddp": [3.20, 3.30, 3.22], "local-sgd": [3.11, 3.19, 3.16],
        "pipeline": [3.50, 3.40, 3.45], "parts": [2.90, 3.05, 2.99], "parts+ft": [2.95, 3.02, 3.00],
    }  # fmt: skip
    rows = {r["method"]: r for r in race.compare_at_link(_race(bpd, {}), "10Mbit", [0, 1, 2])}
    # means: parts 2.98, parts+ft 2.99, one device 3.05: each compared with the best of the others
    assert rows["parts"]["against"] == "parts+ft" and rows["ddp"]["against"] == "parts"
    diffs = [a - b for a, b in zip(bpd["ddp"], bpd["parts"])]
    t = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(diffs) / 3**0.5
    assert rows["ddp"]["lo"] == pytest.approx(sum(diffs) / 3 - t)
    assert rows["ddp"]["hi"] == pytest.approx(sum(diffs) / 3 + t)
    # the parts and their fine-tune are each other's best other: one hypothesis, counted once by Holm
    distinct = [m for m in race.METHODS if m != "parts+ft"]
    p = [rows[m]["p_difference"] for m in distinct]
    assert p[1] == pytest.approx(scipy_stats.ttest_1samp(diffs, 0).pvalue)
    adjusted = dict(zip(distinct, multipletests(p, method="holm")[1])) | {"parts+ft": None}
    adjusted["parts+ft"] = adjusted["parts"]
    for m, a in adjusted.items():  # decided different after Holm exactly where its adjusted p is small
        assert rows[m]["adjusted"].startswith(("better", "worse")) == (a < 0.05), m
        assert rows[m]["p_difference_holm"] == pytest.approx(a), m
    assert rows["pipeline"]["verdict"].startswith("worse")
    assert (rows["one-device"]["verdict"], rows["one-device"]["adjusted"]) == ("worse", "undecided")  # Holm bites
    table = race.results_table(_race(bpd, {}), ["10Mbit"], [0, 1, 2]).splitlines()
    ddp_row = next(line for line in table if "| 2 DDP workers |" in line)
    half = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(bpd["ddp"]) / 3**0.5
    mean = sum(bpd["ddp"]) / 3
    assert f"| {mean:.4f} [{mean - half:.2f}, {mean + half:.2f}] | +0.260 [" in ddp_row
    assert ddp_row.endswith("| worse | worse |")


def test_the_targets_come_from_ratios_within_each_block():
    bpd = {m: [3.0, 3.0, 3.0] for m in race.METHODS}
    # the host was twice as fast in block 1: per-block ratios stay 1.5x, 2.0x, 1.8x
    speed = {"one-device": [100.0, 200.0, 100.0], "parts": [150.0, 400.0, 180.0], "ddp": [50.0, 100.0, 60.0]}
    results = _race(bpd, speed, "inf") | _race(bpd, speed, "10Mbit")
    lines = race.check_targets(results, ["inf", "10Mbit"], [0, 1, 2])
    assert lines[0].startswith("10 Mbit: parts / DDP images/s = 3.33 [") and lines[0].endswith("met")
    assert lines[-1].startswith("inf: parts / one device = 1.80x median of 3 blocks (1.50, 2.00, 1.80;")
    assert lines[-1].endswith("target >= 1.75x): met")
    assert lines[1].startswith("10Mbit: 2 parts − the best rival (2 DDP workers), test BPD +0.000")
    assert lines[1].endswith("(target: lower, decided): MISSED (identical)")  # equal BPDs: no difference, said so


def test_the_weak_link_target_takes_the_better_parts_and_the_best_rival_by_their_means():
    bpd = {
        "one-device": [3.0, 3.1, 3.0], "ddp": [3.3, 3.4, 3.35], "local-sgd": [3.20, 3.05, 3.30],
        "pipeline": [3.5, 3.5, 3.5], "parts": [3.10, 3.15, 3.12], "parts+ft": [3.00, 3.20, 3.02],
    }  # fmt: skip
    # parts+ft's mean 3.073 beats the parts' 3.123 (though not in seed 1); local SGD's 3.183 is the best rival
    line = race.parts_against_rivals(_race(bpd, {}, "1Mbit"), "1Mbit", [0, 1, 2])
    diffs = [a - b for a, b in zip(bpd["parts+ft"], bpd["local-sgd"])]
    from scipy import stats as scipy_stats

    t = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(diffs) / 3**0.5
    mean = sum(diffs) / 3
    assert line.startswith(
        f"1Mbit: 2 parts + fine-tune − the best rival (2 local-SGD workers), test BPD {mean:+.3f} "
        f"[{mean - t:+.3f}, {mean + t:+.3f}] (target: lower, decided): MISSED (undecided; about "
    )


def test_the_figure_draws_each_method_from_the_slowest_link_to_the_fastest():
    assert race.by_bandwidth(["10Mbit", "inf", "10Mbit+outages", "1Mbit", "100Mbit"]) == [
        "1Mbit", "10Mbit", "100Mbit", "inf",
    ]  # fmt: skip


def test_every_parts_cell_keeps_its_weights_and_the_fine_tune_chooses_from_its_own_block(bench, tmp_path, monkeypatch):
    def fake_cell_process(args, timeout):  # runs the cell in this process, with a parts run that is instant
        bench.cell_main(args)
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})

    monkeypatch.setattr(bench, "run_parts", lambda args: {"test_bpd": 3.0, "part_weight_bytes": 8,
                                                          "state": {"w": bench.torch.zeros(2)}})  # fmt: skip
    monkeypatch.setattr(bench, "_run_cell_process", fake_cell_process)
    for seed, ddp_speed in ((0, 300.0), (1, 50.0)):  # DDP beat one device in block 0, not in block 1
        for method, speed in (("one-device", 100.0), ("ddp", ddp_speed)):
            cell = race.Cell(method, "10Mbit", seed)
            (tmp_path / f"{cell.name}.json").write_text(json.dumps(_cell(bench, cell, images_per_s=speed)))
        bench.run_cell(race.Cell("parts", "10Mbit", seed), OPTS, tmp_path, {"commit": "c"}, SPLIT)
        assert (tmp_path / f"parts-10Mbit-s{seed}.pt").is_file()
    budget_spent = type("Opts", (OPTS,), dict(budget=0.0))  # no time left: the choice, and no training
    chosen = [
        bench.run_cell(race.Cell("parts+ft", "10Mbit", seed), budget_spent, tmp_path, None, SPLIT)["finetune_on"]
        for seed in (0, 1)
    ]
    assert chosen == ["ddp", "one device"]
    # the weights' gather: part 1's bytes over the emulated link (1 Mbit, 20 ms); over a real
    # link the parts' snapshot has already waited for them, so it is not charged twice
    weights = {"part_weight_bytes": 125_000}  # 1e6 bits
    assert bench.gather_seconds({"link": "1Mbit", "seed": 1}, weights) == pytest.approx(1.02)
    assert bench.gather_seconds({"link": "1Mbit", "seed": 1, "network": "real"}, weights) == 0.0


def test_the_sweep_tunes_each_rival_per_link_and_the_race_runs_each_at_its_best(bench, tmp_path, monkeypatch):
    from raylocal.bench import sweep

    ran = []

    def fake_run_cell(cell, opts, out, host, split, tuned=None):  # BPD from the setting: a known winner per link
        settings = bench.cell_settings(cell, opts, split, tuned)
        ran.append((cell, opts.budget, settings))
        if cell.variant == "micro2":  # a failure is kept, and never chosen
            raise bench.CellFailed(f"error: cell {cell.name} failed: boom")
        h = settings["average_every"] or 0
        bpd = {"10Mbit": abs(h - 250), "1Mbit": abs(h - 1000)}[cell.link] / 1000 + 3.0
        if cell.method == "ddp":
            bpd = (
                3.0 if (cell.link, settings["ddp_compression"]) in (("10Mbit", "bf16"), ("1Mbit", "powersgd")) else 3.5
            )
        if cell.method == "parts":
            bpd = 3.0  # every setting ties: the grid's first wins
        if cell.method == "pipeline":
            bpd = 3.0 if settings["micro_batches"] == 4 else 3.1
        return {"test_bpd": bpd, "images_per_s": 10.0, "bytes_per_step": 1e3, "idle": 0.0}

    monkeypatch.setattr(bench, "run_cell", fake_run_cell)
    monkeypatch.setattr(bench, "host_figures", lambda probe: {"commit": "c"})
    opts = type("Opts", (OPTS,), dict(sweep_budget=0.5, probe=0.0))
    opts = bench.argparse.Namespace(**{k: getattr(opts, k) for k in dir(opts) if not k.startswith("_")})
    best = bench.run_sweep(opts, ["10Mbit", "1Mbit", "10Mbit+straggler"], 7, tmp_path, SPLIT)  # tuned as 10Mbit
    per_link = sum(len(grid) for grid in sweep.SWEEP_GRID.values())
    assert len(ran) == 2 * per_link and {(c.seed, budget) for c, budget, _ in ran} == {(7, 0.5)}
    assert best["10Mbit"]["local-sgd"]["variant"] == "H250" and best["1Mbit"]["local-sgd"]["variant"] == "H1000"
    assert best["10Mbit"]["ddp"]["ddp_compression"] == "bf16" and best["1Mbit"]["ddp"]["variant"] == "cap0.1MB-powersgd"
    assert best["10Mbit"]["parts"]["variant"] == "sync50-q1" and best["1Mbit"]["pipeline"]["variant"] == "micro4"
    stored = json.loads((tmp_path / "sweep" / "pipeline-1Mbit-s7-micro2.json").read_text())
    assert (
        stored["failed"] == "error: cell pipeline-1Mbit-s7-micro2 failed: boom"
        and stored["settings"]["micro_batches"] == 2
    )
    assert json.loads((tmp_path / "sweep" / "best.json").read_text()) == json.loads(json.dumps(best))
    table = (tmp_path / "sweep" / "table.md").read_text().splitlines()
    assert len(table) == 2 + 2 * per_link and sum("**yes**" in row for row in table) == 2 * len(sweep.SWEEP_GRID)
    assert "| 1Mbit | 2 local-SGD workers | H1000 | 10 | 1.0 kB | 0.0 | 3.0000 | **yes** |" in table
    assert (
        "| 1Mbit | 2-stage pipeline (1F1B) | micro2 | failed: error: cell pipeline-1Mbit-s7-micro2 failed: boom |"
        in "\n".join(table)
    )
    # the race: each cell at its link's best, the flags where the sweep has nothing to say
    sgd = bench.cell_settings(race.Cell("local-sgd", "1Mbit", 0), OPTS, SPLIT, sweep.race_settings(best, race.Cell(
        "local-sgd", "1Mbit", 0)))  # fmt: skip
    assert (sgd["average_every"], sgd["variant"], sgd["bucket_cap_mb"]) == (1000, "H1000", None)
    ft = sweep.race_settings(best, race.Cell("parts+ft", "1Mbit", 0))
    assert (ft["sync_every"], ft["ddp_compression"], ft["variant"]) == (50, "powersgd", "sync50-q1+cap0.1MB-powersgd")
    assert sweep.race_settings({}, race.Cell("ddp", "1Mbit", 0)) == {}
    assert sweep.race_settings(best, race.Cell("ddp", "10Mbit+straggler", 0)) == best["10Mbit"]["ddp"]
    with pytest.raises(ValueError, match="not a setting of a cell: \\['lr'\\]"):
        bench.cell_settings(race.Cell("ddp", "1Mbit", 0), OPTS, SPLIT, {"lr": 1.0})


def test_a_race_cell_run_at_another_sweep_choice_is_refused(bench, tmp_path, monkeypatch):
    cell = race.Cell("local-sgd", "10Mbit", 0)
    chosen = {"average_every": 250, "outer_lr": None, "average_overlap": False, "variant": "H250"}
    stored = {"test_bpd": 3.0, "settings": bench.cell_settings(cell, OPTS, SPLIT, chosen)}
    (tmp_path / f"{cell.name}.json").write_text(json.dumps(stored))
    monkeypatch.setattr(bench, "_run_cell_process", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert bench.run_cell(cell, OPTS, tmp_path, None, SPLIT, chosen) == stored
    with pytest.raises(SystemExit, match=r"variant 'H250' here, 'H10' now, average_every 250 here, 10 now"):
        bench.run_cell(cell, OPTS, tmp_path, None, SPLIT, chosen | {"average_every": 10, "variant": "H10"})


def test_a_sweep_of_one_method_runs_its_grid_alone_and_feeds_no_race(bench, tmp_path, monkeypatch):
    from raylocal.bench import sweep

    ran = []

    def fake_run_cell(cell, opts, out, host, split, tuned=None):  # the lower outer LR wins
        ran.append(cell)
        return {"test_bpd": 3.0 if tuned["outer_lr"] == 0.3 else 3.5, "images_per_s": 1.0, "bytes_per_step": 1.0,
                "idle": 0.0}  # fmt: skip

    monkeypatch.setattr(bench, "run_cell", fake_run_cell)
    monkeypatch.setattr(bench, "host_figures", lambda probe: {"commit": "c"})
    opts = bench._options(["--sweep-only", "--sweep-methods", "local-sgd", "--sweep-budget", "1"])
    bench.race_plan(opts)  # accepted
    best = bench.run_sweep(opts, ["inf", "1Mbit"], 0, tmp_path, SPLIT)
    assert {c.method for c in ran} == {"local-sgd"} and len(ran) == 2 * len(sweep.SWEEP_GRID["local-sgd"])
    assert {link: list(m) for link, m in best.items()} == {"inf": ["local-sgd"], "1Mbit": ["local-sgd"]}
    assert best["1Mbit"]["local-sgd"]["variant"] == "H250-diloco0.3"
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "DDP" not in table and table.count("**yes**") == 2
    for argv, message in (
        (["--sweep-methods", "local-sgd"], "--sweep-methods needs --sweep-only"),
        (["--sweep-only", "--sweep-methods", "sgd"], "--sweep-methods: 'sgd' is not one of ddp, local-sgd, parts"),
        (["--sweep-only", "--sweep-budget", "0"], "--sweep-only needs a sweep here"),
    ):
        with pytest.raises(SystemExit, match="^error: " + message):
            bench.race_plan(bench._options(argv))


def test_the_sweep_chooses_on_held_out_training_images_and_never_on_the_race_test_images(bench, tmp_path, monkeypatch):
    from raylocal.core.config import data_source

    seen, run_cell = [], bench.run_cell

    def fake_run_cell(cell, opts, out, host, split, tuned=None):
        seen.append(bench.cell_settings(cell, opts, split, tuned))
        return {"test_bpd": 3.0, "images_per_s": 1.0, "bytes_per_step": 1.0, "idle": 0.0}

    monkeypatch.setattr(bench, "run_cell", fake_run_cell)
    monkeypatch.setattr(bench, "host_figures", lambda probe: {"commit": "c"})
    assert bench._options([]).sweep_validation == 2000  # held out unless asked otherwise
    argv = ["--sweep-only", "--sweep-methods", "parts", "--sweep-budget", "1", "--sweep-validation", "50"]
    opts = bench._options(argv)
    bench.run_sweep(opts, ["inf"], 0, tmp_path, SPLIT)
    assert [s["validation"] for s in seen] == [50] * 3
    assert "| held-out BPD |" in (tmp_path / "sweep" / "table.md").read_text().splitlines()[0]
    # a sweep cell trains on all but the last 50 training images and is scored on those 50
    full = data_source(bench._config({})).load()
    held = data_source(bench._config(seen[0] | {"test_subset": None})).load()
    assert torch.equal(held.test, full.train[-50:]) and torch.equal(held.train, full.train[:-50])
    # the race's cells keep the test images
    assert bench.cell_settings(race.Cell("parts", "inf", 1), opts, SPLIT)["validation"] is None
    assert torch.equal(data_source(bench._config({"test_subset": 10})).load().test, full.test[:10])
    # a sweep cell scored on the test images is not read back as a held-out one
    old = race.Cell("parts", "inf", 0, "sync50-q1")
    settings = {k: v for k, v in seen[0].items() if k != "validation"}
    (tmp_path / f"{old.name}.json").write_text(json.dumps({"test_bpd": 3.0, "settings": settings}))
    short = bench.argparse.Namespace(**vars(opts) | {"budget": 1.0, "validation": 50})
    with pytest.raises(SystemExit, match=r"was run with other settings \(validation None here, 50 now\)"):
        run_cell(old, short, tmp_path, None, SPLIT, bench.SWEEP_GRID["parts"]["sync50-q1"] | {"variant": "sync50-q1"})


def test_the_race_seeds_are_1_to_3_and_never_the_sweeps(bench):
    opts = bench._options([])
    opts.sweep_budget = 30.0
    assert bench.race_plan(opts)[1] == [1, 2, 3] and opts.sweep_seed == 0
    assert bench.race_plan(bench._options(["--repeats", "5"]))[1] == [1, 2, 3, 4, 5]
    assert bench.race_plan(bench._options(["--quick"]))[1] == [1, 2]  # a smoke run that fits 15 minutes
    clash = bench._options(["--seeds", "0-2"])
    clash.sweep_budget = 30.0
    with pytest.raises(SystemExit, match=r"^error: --sweep-seed 0 is also a race seed"):
        bench.race_plan(clash)
    clash.sweep_budget = 0.0  # no sweep: any seeds
    assert bench.race_plan(clash)[1] == [0, 1, 2]


def test_finished_only_runs_nothing_and_tables_only_whole_seeds(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_run_cell_process", lambda *a, **k: pytest.fail("a cell ran"))
    monkeypatch.setattr(bench, "host_figures", lambda probe: pytest.fail("a probe ran"))
    (tmp_path / "split.json").write_text(json.dumps({"split": SPLIT}))
    argv = ["--finished-only", "--out", str(tmp_path), "--links", "10Mbit", "--seeds", "1,2", "--sweep-budget", "0",
            "--budget", "1"]  # fmt: skip
    opts = bench._options(argv)
    opts.budget, opts.sweep_budget = 1.0, 0.0
    for seed in (1, 2):  # seed 1 whole, seed 2 without its fine-tune
        for m in race.METHODS[: None if seed == 1 else -1]:
            cell = race.Cell(m, "10Mbit", seed)
            result = {"test_bpd": 3.0 + seed, "images_per_s": 1.0, "bytes_per_step": 1.0, "idle": 0.0}
            result |= {"settings": bench.cell_settings(cell, opts, SPLIT), "host": None}
            (tmp_path / f"{cell.name}.json").write_text(json.dumps(result))
    bench.main(argv)
    out = capsys.readouterr().out
    assert "# 1 s per cell, 1 seeds" in out and "| 10Mbit | 2 parts | 1 | 0 of 1 blocks |" in out


def test_real_links_are_shaped_at_the_links_bandwidth_keep_its_latency_and_never_read_emulated_cells(
    bench, tmp_path, monkeypatch
):
    assert bench.real_link("10Mbit") == ("10000kbit", "bw=inf,lat=20ms")
    assert bench.real_link("1Mbit") == ("1000kbit", "bw=inf,lat=20ms")
    assert bench.real_link("inf") == (None, "bw=inf,lat=20ms")  # an unshaped veth
    with pytest.raises(SystemExit, match=r"^error: --real cannot run link '10Mbit\+outages': the kernel's links"):
        bench.real_link("10Mbit+outages")
    monkeypatch.setattr("raylocal.cluster.netns.available", lambda: "network namespaces are not permitted here")
    with pytest.raises(SystemExit, match=r"^error: --real: network namespaces are not permitted here$"):
        bench.race_plan(bench._options(["--real", "--links", "10Mbit"]))
    with pytest.raises(SystemExit, match=r"^error: --real cannot run link '10Mbit\+outages'"):
        bench.race_plan(bench._options(["--real", "--links", "10Mbit,10Mbit+outages"]))
    with pytest.raises(SystemExit, match=r"^error: --congestion sets the real links' TCP: it needs --real$"):
        bench.race_plan(bench._options(["--congestion", "reno", "--links", "10Mbit"]))
    monkeypatch.setattr("raylocal.cluster.netns.available", lambda: None)
    with pytest.raises(SystemExit, match=r"^error: --congestion: TCP congestion control 'vegas-x' is not one"):
        bench.race_plan(bench._options(["--real", "--congestion", "vegas-x", "--links", "10Mbit"]))
    # a cell run over the emulated link is never read back as a real one, nor the other way round
    ddp = race.Cell("ddp", "10Mbit", 1)
    (tmp_path / "ddp-10Mbit-s1.json").write_text(json.dumps(_cell(bench, ddp, test_bpd=3.5)))
    real = type("Opts", (OPTS,), dict(real=True))
    assert bench.cell_settings(ddp, real, SPLIT)["network"] == "real"
    assert bench.cell_settings(ddp, real, SPLIT)["congestion"] is None  # the host's: as cells before the setting
    reno = type("Opts", (OPTS,), dict(real=True, congestion="reno"))
    assert bench.cell_settings(ddp, reno, SPLIT)["congestion"] == "reno"
    assert bench.cell_settings(race.Cell("one-device", "10Mbit", 1), reno, SPLIT)["congestion"] is None  # no link
    with pytest.raises(SystemExit, match=r"\(network None here, 'real' now\)"):
        bench.run_cell(ddp, real, tmp_path, None, SPLIT)


def test_with_costs_each_rivals_link_charges_its_own_messages_and_stored_plain_cells_are_not_read_back(bench, tmp_path):
    costs = type("Opts", (OPTS,), dict(costs=True))
    settings = {m: bench.cell_settings(race.Cell(m, "1Mbit", 1), costs, SPLIT) for m in race.METHODS}
    assert {m: s["link_costs"] for m, s in settings.items()} == {
        m: None if m == "one-device" else "measured" for m in race.METHODS
    }
    # a cell's process builds its config from these settings: all-reduces for DDP, Ray objects for the parts
    ddp = bench._config(settings["ddp"], schedule="data-parallel")
    assert ddp.links.link == "bw=1Mbit,lat=20ms,eff=0.8547,msg=4.7ms"
    assert bench._config(settings["parts"], schedule="async").links.link == "bw=1Mbit,lat=20ms,eff=0.9009,msg=24.3ms"
    assert (
        bench._config(settings["ddp"] | {"link_costs": None}, schedule="data-parallel").links.link
        == "bw=1Mbit,lat=20ms"
    )
    # part 1's weights reach the fine-tune's machine as a part's packet does: 1.11x the bytes' time, and 24.3 ms
    plain = bench.gather_seconds(settings["parts+ft"] | {"link_costs": None}, {"part_weight_bytes": 125_000})
    assert plain == pytest.approx(1.0 + 0.02)
    costed = bench.gather_seconds(settings["parts+ft"], {"part_weight_bytes": 125_000})
    assert costed == pytest.approx(1.11 + 0.0243 + 0.02, rel=1e-4)
    ddp_cell = race.Cell("ddp", "1Mbit", 1)
    (tmp_path / f"{ddp_cell.name}.json").write_text(json.dumps(_cell(bench, ddp_cell, test_bpd=3.5)))
    with pytest.raises(SystemExit, match=r"\(link_costs None here, 'measured' now\)"):
        bench.run_cell(ddp_cell, costs, tmp_path, None, SPLIT)
    with pytest.raises(SystemExit, match=r"^error: --costs charges an emulated link what a real one costs"):
        bench.race_plan(bench._options(["--costs", "--real", "--links", "10Mbit"]))
    assert bench.race_plan(bench._options(["--costs", "--quick"]))[0] == ["inf", "10Mbit"]


def test_a_race_may_take_another_races_sweep_choices_and_a_bad_choice_file_is_one_line(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_sweep", lambda *a, **k: pytest.fail("a sweep ran"))
    best = {"10Mbit": {"ddp": {"bucket_cap_mb": 0.1, "ddp_compression": "bf16", "variant": "cap0.1MB-bf16"}}}
    (tmp_path / "race" / "sweep").mkdir(parents=True)
    path = tmp_path / "race" / "sweep" / "best.json"
    path.write_text(json.dumps(best))
    with pytest.raises(SystemExit, match=r"^error: --sweep-from .*best.json: its race's split.json \(.*race\) is"):
        bench.race_plan(bench._options(["--sweep-from", str(path), "--links", "10Mbit"]))
    (tmp_path / "race" / "split.json").write_text(json.dumps({"split": SPLIT}))
    opts = bench._options(["--sweep-from", str(path), "--links", "10Mbit+straggler"])
    bench.race_plan(opts)  # the straggler's block is tuned at its plain link
    assert bench.chosen_settings(opts, ["10Mbit+straggler"], tmp_path, SPLIT) == best
    # the parts and the pipeline are cut where the tuned race cut them, never measured anew
    monkeypatch.setattr(bench, "ModelService", lambda *a: pytest.fail("a split was measured"))
    here = tmp_path / "real"
    here.mkdir()
    assert bench.race_split(opts, here) == SPLIT and bench.race_split(opts, here) == SPLIT
    (here / "split.json").write_text(json.dumps({"split": "layers:0-11|12-20"}))
    with pytest.raises(SystemExit, match=r"split.json cuts at layers:0-11\|12-20, the race of --sweep-from at layers"):
        bench.race_split(opts, here)
    with pytest.raises(SystemExit, match=r"^error: --sweep-from .*best.json has no choices for link '1Mbit'$"):
        bench.race_plan(bench._options(["--sweep-from", str(path), "--links", "10Mbit,1Mbit"]))
    for bad in ("{not json", '{"10Mbit": [1, 2]}'):
        path.write_text(bad)
        with pytest.raises(SystemExit, match=r"^error: --sweep-from .*best.json: not a sweep's best.json \("):
            bench.race_plan(opts)


def test_the_weights_snapshot_is_taken_once_at_its_time_counted_from_the_first_poll(bench, monkeypatch):
    from raylocal.cluster import parts_phase

    now = iter([100.0, 105.0, 110.0, 110.5, 115.0])  # polls at 100, 105, 110 (+0.5 s to gather), 115
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(now))
    gathered = []
    monkeypatch.setattr(parts_phase, "gather_weights", lambda actors: gathered.append(1) or {"w": actors})
    snap = bench.WeightsSnapshot(at=10.0)
    for _ in range(4):
        snap(["a"], [])
    assert gathered == [1] and snap.state == {"w": ["a"]} and snap.seconds == 10.5
    assert bench.WeightsSnapshot(at=10.0).seconds is None  # never taken: the parts ended first


def test_the_twins_table_pairs_each_real_cell_with_its_emulated_twin_by_seed():
    from scipy import stats as scipy_stats

    bpd = {m: [3.0, 3.1, 3.2] for m in race.METHODS}
    real_bpd = bpd | {"parts": [3.10, 3.25, 3.28], "ddp": [3.0, 3.1, 3.2]}  # the parts worse by 0.1, 0.15, 0.08
    speed = {"one-device": [100.0, 200.0, 100.0], "parts": [150.0, 300.0, 160.0]}  # 1.5, 1.5, 1.6 of one device
    real_speed = {"one-device": [50.0, 50.0, 60.0], "parts": [60.0, 70.0, 78.0]}  # 1.2, 1.4, 1.3 on a slower host
    emulated, real = _race(bpd, speed), _race(real_bpd, real_speed)
    lines = race.twins_table(real, emulated, ["10Mbit"], [0, 1, 2]).splitlines()
    parts = next(line for line in lines if "| 2 parts |" in line)
    diffs = [0.10, 0.15, 0.08]
    t = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(diffs) / 3**0.5
    mean = sum(diffs) / 3
    # the speeds as shares of each block's own one device: a slower host's blocks cancel
    ratios = [1.2 / 1.5, 1.4 / 1.5, 1.3 / 1.6]
    r_mean = sum(ratios) / 3
    r_t = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(ratios) / 3**0.5
    assert parts.startswith(
        f"| 10Mbit | 2 parts | 1.30 / 1.53 | {r_mean:.2f} [{r_mean - r_t:.2f}, {r_mean + r_t:.2f}] | "
        f"{sum(real_bpd['parts']) / 3:.4f} / 3.1000 | {mean:+.3f} [{mean - t:+.3f}, {mean + t:+.3f}] | worse |"
    )
    ddp = next(line for line in lines if "| 2 DDP workers |" in line)
    assert ddp.endswith("| 3.1000 / 3.1000 | +0.000 [+0.000, +0.000] | identical | identical |")
    assert "| 2 parts + fine-tune |  |  | 3.1000 / 3.1000 |" in lines[-1]  # no speed of its own


def test_twin_of_tables_a_race_against_its_twin_on_the_other_network_and_refuses_a_mismatch(
    bench, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(bench, "_run_cell_process", lambda *a, **k: pytest.fail("a cell ran"))
    emulated_dir, real_dir = tmp_path / "emulated", tmp_path / "real"
    # the emulated side charges a real link's costs: twins differ in the network and in what it is charged
    argv = ["--finished-only", "--links", "10Mbit", "--seeds", "1,2", "--sweep-budget", "0", "--budget", "1", "--costs"]
    for where, real, shift in ((emulated_dir, False, 0.0), (real_dir, True, 0.25)):
        where.mkdir()
        (where / "split.json").write_text(json.dumps({"split": SPLIT}))
        plain = [a for a in argv if a != "--costs"]
        opts = bench._options([*plain, "--out", str(where), "--real"] if real else [*argv, "--out", str(where)])
        opts.budget, opts.sweep_budget = 1.0, 0.0
        for seed in (1, 2):
            for m in race.METHODS:
                cell = race.Cell(m, "10Mbit", seed)
                result = {"test_bpd": 3.0 + seed / 10 + shift * (m == "parts"), "images_per_s": 1.0,
                          "bytes_per_step": 1.0, "idle": 0.0}  # fmt: skip
                result |= {"settings": bench.cell_settings(cell, opts, SPLIT), "host": None}
                (where / f"{cell.name}.json").write_text(json.dumps(result))
    charged = {
        json.loads((d / "parts-10Mbit-s1.json").read_text())["settings"]["link_costs"] for d in (emulated_dir, real_dir)
    }
    assert charged == {"measured", None}
    bench.main([*argv, "--out", str(emulated_dir), "--twin-of", str(real_dir)])
    assert "# real links against their emulated twins, 2 seeds paired" in capsys.readouterr().out
    rows = (emulated_dir / "twins.md").read_text().splitlines()
    parts = next(row for row in rows if "| 2 parts |" in row)
    assert parts.startswith("| 10Mbit | 2 parts | 1.00 / 1.00 | 1.00 [1.00, 1.00] | 3.4000 / 3.1500 | +0.250 [")
    with pytest.raises(SystemExit, match=r"ran on the same network as"):
        bench.main([*argv, "--out", str(emulated_dir), "--twin-of", str(emulated_dir)])
    twin = json.loads((real_dir / "ddp-10Mbit-s1.json").read_text())
    twin["settings"]["budget"] = 60.0
    (real_dir / "ddp-10Mbit-s1.json").write_text(json.dumps(twin))
    with pytest.raises(SystemExit, match=r"ddp-10Mbit-s1.json was run with other settings \(budget 60.0 here, 1.0 now"):
        bench.main([*argv, "--out", str(emulated_dir), "--twin-of", str(real_dir)])
    with pytest.raises(SystemExit, match=r"--twin-of .*nowhere: no such directory"):
        bench.main([*argv, "--out", str(emulated_dir), "--twin-of", str(tmp_path / "nowhere")])
