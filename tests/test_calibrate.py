"""raylocal/tools/calibrate.py: the emulated twin of a shaped link, the comparison table, bad input."""

from __future__ import annotations

import json

import pytest

from raylocal.errors import ClusterError
from raylocal.tools import calibrate


def test_the_twin_of_a_tbf_rate_is_the_same_bandwidth_without_latency():
    from raylocal.core.links import LinkSpec

    assert calibrate.emulated_link("10mbit") == "bw=10Mbit,lat=0ms"
    assert LinkSpec.parse(calibrate.emulated_link("1mbit")).bandwidth == 1e6  # bits/s
    assert LinkSpec.parse(calibrate.emulated_link("512kbit")).bandwidth == 512e3
    assert LinkSpec.parse(calibrate.emulated_link("1mbit")).latency == 0
    with pytest.raises(ClusterError, match="^link rate '10 megabits' is not like 10mbit, 500kbit or 1gbit$"):
        calibrate.emulated_link("10 megabits")


def test_the_costed_twin_charges_what_one_message_of_its_kind_measured_at_its_rate():
    from raylocal.core.links import LinkSpec

    ddp = LinkSpec.parse(calibrate.costed_link("1mbit", "ddp"))  # a gloo all-reduce at 1 Mbit: c 1.17, d 4.7 ms
    assert (ddp.bandwidth, ddp.latency, ddp.per_message) == (1e6, 0.0, pytest.approx(0.0047))
    assert ddp.transfer_s(125_000) == pytest.approx(1.17 + 0.0047, rel=1e-4)  # 1 s of our bytes at the rate
    # a part's packet at 10 Mbit: its latent as a Ray object (c 1.05, d 1.5 ms), the queue's put and get (0.6 ms each)
    parts = LinkSpec.parse(calibrate.costed_link("10Mbit", "parts"))
    assert parts.transfer_s(1_250_000) == pytest.approx(1.05 + 0.0015 + 2 * 0.0006, rel=1e-4)
    with pytest.raises(ClusterError, match="^no measured costs at 512kbit"):
        calibrate.costed_link("512kbit", "local-sgd")
    # the cell's own run is charged so (by the race's link), and the cell records what it was charged
    from raylocal.bench import links as bench

    for kind, link in (("costed", calibrate.costed_link("1mbit", "ddp")), ("emulated", "bw=1Mbit,lat=0ms")):
        config = bench._config(calibrate.cell_args("ddp", "1mbit", kind, 30.0, 0), schedule="data-parallel", workers=2)
        assert config.links.link == link == calibrate.charged_link("ddp", "1mbit", kind)
    assert calibrate.charged_link("ddp", "1mbit", "real") == "up"


def test_the_table_sets_each_real_figure_beside_its_twin_and_the_kernel_bytes_beside_the_emulators():
    real = {"images_per_s": 90.0, "seconds": 30.0, "steps": 600, "idle": 0.2, "bytes_per_step": 0.0,
            "kernel_bytes": 2.5e6, "idle_bytes_per_s": 1000.0}  # fmt: skip
    twin = {"images_per_s": 100.0, "seconds": 30.0, "steps": 700, "idle": 0.1, "bytes_per_step": 2000.0}
    rows = calibrate.table({("10mbit", "local-sgd", "real"): real, ("10mbit", "local-sgd", "emulated"): twin})
    lines = rows.splitlines()
    assert "| 10mbit | local-sgd | images/s | 90 | 100 | 0.90 |" in lines
    assert "| 10mbit | local-sgd | s per step | 0.05 | 0.0429 | 1.17 |" in lines  # 30/600 against 30/700
    assert "| 10mbit | local-sgd | averaging % | 20 | 10 | 2.00 |" in lines
    # the emulator counts 2000 bytes a step per worker: 600 steps x 2 workers = 2.4 MB; the kernel saw 2.5
    assert lines[-2] == (
        "| 10mbit | local-sgd | bytes: kernel (Ray's idle traffic 30 kB of it) against ours | 2.5 MB | 2.4 MB | 1.04 |"
    )
    # 2.5 MB - 30 kB idle - 2.4 MB ours = 70 kB over 600 steps: 117 bytes a step
    assert lines[-1] == "| 10mbit | local-sgd | kernel bytes per step beyond ours and the idle traffic | 117 | | |"


def test_the_table_sets_the_costed_twin_beside_the_plain_one_where_it_ran():
    real = {"images_per_s": 9.0, "seconds": 30.0, "steps": 5, "idle": 0.0, "bytes_per_step": 0.0,
            "kernel_bytes": 7.0e6, "idle_bytes_per_s": 0.0}  # fmt: skip
    twin = {"images_per_s": 10.0, "seconds": 30.0, "steps": 6, "idle": 0.9, "bytes_per_step": 6e5}
    costed = twin | {"images_per_s": 9.5}
    cells = {("1mbit", "ddp", "real"): real, ("1mbit", "ddp", "emulated"): twin, ("1mbit", "ddp", "costed"): costed}
    lines = calibrate.table(cells).splitlines()
    assert lines[0].endswith("| real / emulated | emulated with the link's costs | real / that |")
    assert "| 1mbit | ddp | images/s | 9 | 10 | 0.90 | 9.5 | 0.95 |" in lines
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_ddps_count_holds_its_first_broadcast_of_the_model_once():
    real = {"images_per_s": 9.0, "seconds": 30.0, "steps": 5, "idle": 0.0, "bytes_per_step": 0.0,
            "kernel_bytes": 7.0e6, "idle_bytes_per_s": 0.0}  # fmt: skip
    twin = {"images_per_s": 10.0, "seconds": 30.0, "steps": 6, "idle": 0.9, "bytes_per_step": 6e5, "start_bytes": 6e5}
    lines = calibrate.table({("1mbit", "ddp", "real"): real, ("1mbit", "ddp", "emulated"): twin}).splitlines()
    # 5 steps x 2 workers x 600 kB, and the broadcast's 600 kB once: 6.6 MB; the kernel saw 7.0
    assert lines[-2].endswith("against ours | 7 MB | 6.6 MB | 1.06 |")


def test_ddps_all_reduce_figures_give_the_least_exposed_worker_and_the_workers_skew():
    cell = {"images_per_s": 9.0, "seconds": 30.0, "steps": 5, "start_spread_s": 0.0, "allreduce_s": 6.0,
            "allreduce_exposed_s": 5.9, "allreduce_exposed_least_s": 5.4}  # fmt: skip
    shown = calibrate.figures("ddp", cell)
    assert shown["all-reduce exposed ms per step"] == pytest.approx(5900)
    assert shown["all-reduce exposed ms, least worker"] == pytest.approx(5400)
    assert shown["all-reduce skew ms, most - least worker"] == pytest.approx(500)
    older = calibrate.figures("ddp", cell | {"allreduce_exposed_least_s": None})  # a cell from before the figure
    assert "all-reduce exposed ms, least worker" not in older and "all-reduce skew ms, most - least worker" not in older


def test_ddps_skew_is_taken_apart_into_the_late_workers_begin_and_compute_and_the_early_workers_end():
    """Rank 1 (the early worker: the more exposed) begins each of its two steps 100 ms before rank 0,
    computes 50 ms less and its update ends 30 ms after rank 0's: a skew of 180 ms in three terms."""

    def worker(rank: int, exposed: float, compute: float, begins: list[float], ends: list[float]) -> dict:
        steps = [[b, e, e + 0.01] for b, e in zip(begins, ends)]
        return {"rank": rank, "forward_s": 0.1, "backward_s": compute - 0.1, "allreduce_s": 6.0,
                "allreduce_exposed_s": exposed, "steps": steps}  # fmt: skip

    late = worker(0, 5.4, 0.35, [100.0, 106.2], [105.9, 112.1])
    early = worker(1, 5.58, 0.30, [99.9, 106.1], [105.93, 112.13])
    cell = {"images_per_s": 9.0, "seconds": 12.0, "steps": 2, "start_spread_s": 0.0, "allreduce_s": 6.0,
            "allreduce_exposed_s": 5.58, "allreduce_exposed_least_s": 5.4, "workers": [late, early]}  # fmt: skip
    shown = calibrate.figures("ddp", cell)
    assert shown["skew: the late worker began later by, ms"] == pytest.approx(100)
    assert shown["skew: its forward and backward took longer by, ms"] == pytest.approx(50)
    assert shown["skew: the early worker's update ended later by, ms"] == pytest.approx(30)
    assert shown["skew: the three terms' sum, ms"] == pytest.approx(shown["all-reduce skew ms, most - least worker"])
    # rank 0's second step began at 106.2 and its last ended at 112.11: 5.91 s for the one step after the first
    assert shown["s per step after the first"] == pytest.approx(5.91)
    # with each worker's node: rank 1 sits on the head node (198.51.100.1) and ended its second update
    # 30 ms after rank 0's (the first step is left out)
    nodes = {"a": {"address": "198.51.100.2"}, "b": {"address": "198.51.100.1"}}
    placed = cell | {"nodes": nodes, "workers": [late | {"node_id": "a"}, early | {"node_id": "b"}]}
    lag = calibrate.figures("ddp", placed)
    assert lag["the head node's rank ended later by, ms"] == pytest.approx(30)
    assert lag["steps the head node's rank ended later, %"] == 100
    assert "the head node's rank ended later by, ms" not in shown  # (the workers' nodes not recorded)
    # a cell that kept fewer steps than it took (or none) is not taken apart
    fewer = calibrate.figures("ddp", cell | {"steps": 3})
    assert not [name for name in fewer if name.startswith("skew:") or name.endswith("after the first")]


def test_a_bad_method_or_rate_is_one_line_before_anything_starts(capsys):
    assert calibrate.main(["--methods", "parts,allreduce"]) == 2
    assert capsys.readouterr().err.strip() == "error: 'allreduce' is not a method (parts, ddp, local-sgd)"
    assert calibrate.main(["--rates", "10mbit,10mbps"]) == 2
    assert capsys.readouterr().err.strip() == "error: link rate '10mbps' is not like 10mbit, 500kbit or 1gbit"
    assert calibrate.main(["--rates", "10mbit", "--queue-ms", "-5"]) == 2
    assert capsys.readouterr().err.strip() == "error: a link's queue must hold some ms, not -5.0"
    assert calibrate.main(["--rates", "512kbit", "--costs"]) == 2
    assert capsys.readouterr().err.strip() == "error: no measured costs at 512kbit (measured at 100mbit, 10mbit, 1mbit)"


def test_a_calibration_refuses_to_mix_its_stored_cells_with_another_queue(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate.netns, "available", lambda: None)  # (as where namespaces are allowed)
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "ddp-1mbit-real.json").write_text('{"queue_ms": 100.0}')
    assert calibrate.main(["--rates", "1mbit", "--queue-ms", "1000", "--out", str(tmp_path)]) == 2
    stored = tmp_path / "calibration" / "ddp-1mbit-real.json"
    assert capsys.readouterr().err.strip() == (
        f"error: {stored} ran with a 100 ms queue, not --queue-ms 1000: give another --out"
    )


def test_the_parts_rate_is_the_slower_parts_and_their_bytes_the_first_parts_sends():
    real = {"images_per_s": 50.0, "seconds": 30.0, "steps": [600, 500], "idle": 0.3, "bytes_per_step": 0.0,
            "behind_steps": [{"mean": 2.5}], "kernel_bytes": 7.0e6, "idle_bytes_per_s": 0.0}  # fmt: skip
    twin = {"images_per_s": 60.0, "seconds": 30.0, "steps": [700, 750], "idle": 0.1, "bytes_per_step": 10000.0,
            "behind_steps": [{"mean": 1.0}]}  # fmt: skip
    lines = calibrate.table({("1mbit", "parts", "real"): real, ("1mbit", "parts", "emulated"): twin}).splitlines()
    # a step of the whole model at the slower part's rate: 64 images at 50/s against 64 at 60/s
    assert "| 1mbit | parts | s per step | 1.28 | 1.07 | 1.20 |" in lines
    assert "| 1mbit | parts | idle % | 30 | 10 | 3.00 |" in lines
    assert "| 1mbit | parts | upstream steps behind | 2.5 | 1 | 2.50 |" in lines
    # part 1 sent 600 steps of 10 kB by the emulator's count: 6 MB against the kernel's 7; 1 MB over 600 steps
    bytes_row = "| 1mbit | parts | bytes: kernel (Ray's idle traffic 0 kB of it) against ours | 7 MB | 6 MB | 1.17 |"
    assert bytes_row in lines
    assert lines[-1] == "| 1mbit | parts | kernel bytes per step beyond ours and the idle traffic | 1667 | | |"


def test_the_kernels_bytes_are_set_against_what_the_cell_itself_counted_where_it_counts():
    # local SGD counts its own rounds: 2 rounds of 600 kB per worker over 96 steps, not the twin's
    # per-step average over its 105 steps (3 rounds) times 96
    real = {"images_per_s": 1.0, "seconds": 10.0, "steps": 96, "idle": 0.0, "bytes_per_step": 2 * 6e5 / 96,
            "kernel_bytes": 2.5e6, "idle_bytes_per_s": 0.0, "start_bytes": 0}  # fmt: skip
    twin = {"images_per_s": 1.0, "seconds": 10.0, "steps": 105, "idle": 0.0, "bytes_per_step": 3 * 6e5 / 105}
    assert calibrate.byte_terms("local-sgd", real, twin) == (96, pytest.approx(2 * 2 * 6e5), 0, 0.0)
    # the parts: what the second part fetched, not what the first put into the queue
    parts = {"steps": [100, 90], "bytes_per_step": 2e5, "bytes_received": [7e6], "seconds": 10.0,
             "idle_bytes_per_s": 10.0}  # fmt: skip
    assert calibrate.byte_terms("parts", parts, {"bytes_per_step": 1e5}) == (100, 7e6, 0.0, 100.0)
    # cells stored before the parts counted it: the twin's bytes per step for the first part's steps
    older = {k: v for k, v in parts.items() if k != "bytes_received"}
    assert calibrate.byte_terms("parts", older, {"bytes_per_step": 1e5}) == (100, 1e7, 0, 100.0)


def test_the_hops_table_sets_each_hop_of_the_real_parts_beside_its_twins_in_ms():
    def hop(p50, p95, count):
        return {"count": count, "mean": p50, "min": p50, "p50": p50, "p95": p95, "max": p95}

    real = {
        "packet_delays": [
            {"latent only": {"in the queue": hop(0.0123, 0.2, 90), "fetching the latent": hop(0.5, 1.0, 90)}}
        ]
    }
    twin = {"packet_delays": [{"latent only": {"in the queue": hop(0.002, 0.004, 300)}}]}
    cells = {("1mbit", "parts", "real"): real, ("1mbit", "parts", "emulated"): twin, ("1mbit", "ddp", "real"): {}}
    lines = calibrate.hops_table(cells).splitlines()
    assert lines[2:] == [
        "| 1mbit | latent only | in the queue | 12.3 (200.0) | 2.0 (4.0) | 90 / 300 |",
        "| 1mbit | latent only | fetching the latent | 500.0 (1000.0) | - | 90 / 0 |",
    ]


def test_the_table_says_which_host_ran_which_cells_and_which_cells_recorded_none():
    host = {"commit": "abc1234", "cpu": "AMD EPYC", "probe_images_per_s": 374.4}
    cells = {
        ("1mbit", "parts", "real"): {"host": host},
        ("1mbit", "parts", "emulated"): {"host": host},
        ("10mbit", "parts", "real"): {"host": host | {"probe_images_per_s": 640.0}},
        ("10mbit", "parts", "emulated"): {},  # a cell from before cells recorded their host
        ("1mbit", "ddp", "real"): {"host": host | {"tcp_congestion": "bbr"}, "congestion": "cubic"},
    }
    assert calibrate.hosts_lines(cells).splitlines() == [
        "- commit abc1234, AMD EPYC, probe 374 images/s: parts 1mbit real, parts 1mbit emulated",
        "- commit abc1234, AMD EPYC, probe 640 images/s: parts 10mbit real",
        "- host not recorded: parts 10mbit emulated",
        "- commit abc1234, AMD EPYC, host TCP bbr, probe 374 images/s: ddp 1mbit real (TCP cubic)",
    ]


def test_the_wire_costs_fit_recovers_a_known_per_byte_factor_and_per_message_cost():
    from raylocal.tools import wire_costs

    # rows made from a = 1.05 and b = 300 bytes a message, at sizes three decades apart
    rows = [
        {"ours": s * n, "messages": n, "kernel": 1.05 * s * n + 300 * n} for s, n in ((1e3, 200), (2e5, 25), (1e6, 5))
    ]
    a, b, worst = wire_costs.fit(rows, "ours", "kernel")
    assert a == pytest.approx(1.05, rel=1e-9) and b == pytest.approx(300, rel=1e-6) and worst < 1e-9
    rows[2]["kernel"] *= 1.1  # one row 10% off: no line through the rest passes it
    assert wire_costs.fit(rows, "ours", "kernel")[2] > 0.05


def test_the_wire_costs_table_gives_each_rows_bytes_and_time_per_message_against_its_payload():
    from raylocal.tools import wire_costs

    rows = {"ray-object": [{"size": 1000, "messages": 10, "ours": 10_000, "kernel": 12_000, "seconds": 0.016},
                           {"size": 0, "messages": 4, "ours": 0, "kernel": 2_000, "seconds": 0.004}],
            "gloo": [{"size": 10**6, "messages": 1, "ours": 2e6, "kernel": 2.1e6, "seconds": 1.0}]}  # fmt: skip
    result = {"rate": "10mbit", "bits_per_s": 1e7, "rows": rows, "idle_bytes_per_s": {"ray-object": 7000.0},
              "tcp": [{"size": 16384, "reached_bits_per_s": 9.5e6}]}  # fmt: skip
    text = wire_costs.table(result, wire_costs.fits(result)).splitlines()
    # 10 kB at 10 Mbit/s is 8 ms on the wire; the 10 messages took 16 ms: 2.00x, 1.6 ms each
    assert "| ray-object | 1,000 B | 10 | 1,200 | 1.200 | 1.6 ms | 2.00 |" in text
    assert "| ray-object | 0 B | 4 | 500 | - | 1.0 ms | - |" in text
    # an all-reduce of 1 MB puts 2 MB on the wire, 1 MB each way at once: 0.8 s at the rate; it took 1 s
    assert "| gloo | 1,000,000 B | 1 | 2,100,000 | 1.050 | 1000.0 ms | 1.25 |" in text
    assert "| 16,384 B | 9.5 Mbit/s | 95.0% |" in text
    assert wire_costs.messages_per_size(8, 1e7) == wire_costs.MOST
    assert wire_costs.messages_per_size(10**9, 1e7) == wire_costs.FEWEST


def test_wire_costs_refuses_a_bad_rate_in_one_line(capsys):
    from raylocal.tools import wire_costs

    assert wire_costs.main(["--rate", "10 megabits"]) == 2
    assert capsys.readouterr().err.strip() == "error: link rate '10 megabits' is not like 10mbit, 500kbit or 1gbit"
    assert wire_costs.main(["--rate", "10mbit", "--congestion", "vegas-x"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: TCP congestion control 'vegas-x' is not one this kernel")


def test_wire_costs_refuses_to_table_a_stored_run_of_another_congestion_control(tmp_path, capsys):
    from raylocal.tools import wire_costs

    stored = tmp_path / "wire-costs" / "costs-1mbit.json"
    stored.parent.mkdir()
    ran = {"rate": "1mbit", "bits_per_s": 1e6, "congestion": "bbr", "rows": {}, "tcp": [], "idle_bytes_per_s": {}}
    stored.write_text(json.dumps(ran))
    assert wire_costs.main(["--rate", "1mbit", "--congestion", "reno", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {stored} ran TCP's bbr congestion control, not reno: give another --out"
    )
    assert wire_costs.main(["--rate", "1mbit", "--out", str(tmp_path)]) == 0  # as stored: tabled again
    assert "(TCP bbr)" in capsys.readouterr().out


def test_the_overhead_fit_splits_the_kernels_excess_into_a_part_per_cell_and_a_part_per_step(tmp_path, capsys):
    def run(steps: int, extra: float) -> dict:
        # local SGD: ours is 1000 bytes a step per worker, 2 workers; idle traffic 100 B/s over 10 s
        kernel = 2000.0 * steps + 1000.0 + 5000.0 + 30.0 * steps + extra
        real = {"images_per_s": 1.0, "seconds": 10.0, "steps": steps, "idle": 0.0, "bytes_per_step": 0.0,
                "kernel_bytes": kernel, "idle_bytes_per_s": 100.0}  # fmt: skip
        twin = {"images_per_s": 1.0, "seconds": 10.0, "steps": steps, "idle": 0.0, "bytes_per_step": 1000.0}
        return {("10mbit", "local-sgd", "real"): real, ("10mbit", "local-sgd", "emulated"): twin}

    # three budgets on the line beyond = 5000 + 30 * steps, but for 300 bytes more in the middle one
    rows = calibrate.overhead_fit([run(100, 0.0), run(200, 300.0), run(400, 0.0)]).splitlines()
    # least squares by hand: steps 100, 200, 400 (mean 233.33), beyond 8000, 11300, 17000 (mean 12100);
    # slope = sum(dx*dy)/sum(dx^2) = 1,390,000/46,666.7 = 29.79, intercept = 12100 - 29.79 * 233.33 = 5150;
    # the worst cell, the first, is off by 8000 - 5150 - 2978.6 = -128.6 of its 209,000 kernel bytes: 0.06%,
    # and of its 8000 beyond ours and idle: 1.6% (the middle one: 192.9 of 11,300, 1.7%, the worst there);
    # p is 29.79 of ours' 2000 bytes a step: 0.015
    assert "| local-sgd | 10mbit | 3 | 5,150 | 30 | 0.015 | 0.1% | 1.7% |" in rows
    assert "| local-sgd | every rate | 3 | 5,150 | 30 | 0.015 | 0.1% | 1.7% |" in rows
    # cells of one run only, even at two rates of different steps: nothing to tell the parts apart
    one_run = run(100, 0.0) | {("1mbit", m, kind): c for (_, m, kind), c in run(400, 0.0).items()}
    assert len(calibrate.overhead_fit([one_run]).splitlines()) == 2

    def ddp(rate: str, steps: int) -> dict:
        # DDP: 600 kB a step per worker, its first broadcast (600 kB) once; beyond = 40 kB + 60 kB a step
        start, kernel = 6e5, 2 * 6e5 * steps + 6e5 + 40e3 + 60e3 * steps
        real = {"images_per_s": 1.0, "seconds": 10.0, "steps": steps, "idle": 0.0, "bytes_per_step": 0.0,
                "kernel_bytes": kernel, "idle_bytes_per_s": 0.0}  # fmt: skip
        twin = {"images_per_s": 1.0, "seconds": 10.0, "steps": steps, "idle": 0.0, "bytes_per_step": 6e5,
                "start_bytes": start}  # fmt: skip
        return {(rate, "ddp", "real"): real, (rate, "ddp", "emulated"): twin}

    # two runs (budgets) of two rates each, pooled over the rates; p against ours' 1.2 MB a step, not
    # counting the broadcast: 60e3 / 1.2e6 = 0.050 (with it, over these 18 steps: 0.045)
    rows = calibrate.overhead_fit([ddp("10mbit", 8) | ddp("1mbit", 2), ddp("10mbit", 3) | ddp("1mbit", 5)])
    assert "| ddp | every rate | 4 | 40,000 | 60,000 | 0.050 | 0.0% | 0.0% |" in rows.splitlines()
    assert "| ddp | 1mbit | 2 | 40,000 | 60,000 | 0.050 | 0.0% | 0.0% |" in rows.splitlines()
    # stored runs are read back from their folders (table.md and other files left alone)
    for k, budget in enumerate((run(100, 0.0), run(400, 0.0))):
        folder = tmp_path / f"b{k}" / "calibration"
        folder.mkdir(parents=True)
        (folder / "table.md").write_text("|")
        (folder / "notes.json").write_text("{}")
        for (rate, method, kind), cell in budget.items():
            (folder / f"{method}-{rate}-{kind}.json").write_text(json.dumps(cell))
    assert calibrate.stored_cells(tmp_path / "b0" / "calibration") == run(100, 0.0)
    assert calibrate.main(["--fit", f"{tmp_path / 'b0'},{tmp_path / 'b1'}"]) == 0
    assert "| local-sgd | 10mbit | 2 | 5,000 | 30 | 0.015 | 0.0% | 0.0% |" in capsys.readouterr().out.splitlines()
    assert calibrate.main(["--fit", f"{tmp_path / 'b0'},{tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --fit needs two or more calibrations; none stored in {tmp_path / 'nowhere'}"
    assert calibrate.main(["--fit", str(tmp_path / "b0")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --fit needs two or more calibrations; only {tmp_path / 'b0' / 'calibration'} given"


def test_the_raylets_ports_are_named_and_each_part_placed_by_its_nodes_address():
    nodes = {"n0": {"address": "198.51.100.1", "node_manager_port": 41000, "object_manager_port": 42000},
             "n1": {"address": "198.51.100.2", "node_manager_port": 43000, "object_manager_port": 44000}}  # fmt: skip
    assert calibrate.raylet_ports(nodes) == {
        ("198.51.100.1", 42000): "raylet's object manager", ("198.51.100.1", 41000): "raylet's node manager",
        ("198.51.100.2", 44000): "raylet's object manager", ("198.51.100.2", 43000): "raylet's node manager",
    }  # fmt: skip
    cell = {"nodes": nodes, "actor_nodes": ["n1", "n0"]}
    assert calibrate.where_parts(cell) == "; part 1 on 198.51.100.2, part 2 on 198.51.100.1"
    assert calibrate.where_parts({"actor_nodes": ["n1"]}) == ""  # stored before nodes were recorded


def test_each_methods_kinds_of_cell_take_turns_at_running_first_from_one_rate_to_the_next():
    for costs, apart, kinds in ((True, False, ["real", "emulated", "costed"]), (False, False, ["real", "emulated"]),
                                (False, True, ["real", "emulated", "apart"])):  # fmt: skip
        for method in range(3):  # over as many rates as there are kinds, each kind runs first once
            firsts = [calibrate.cell_order(rate, method, costs, apart)[0] for rate in range(len(kinds))]
            assert sorted(firsts) == sorted(kinds)
        for rate in range(3):  # and at each rate the methods do not all start alike
            assert len({calibrate.cell_order(rate, method, costs, apart)[0] for method in range(3)}) == len(kinds)


def test_a_calibration_refuses_to_mix_its_stored_cells_with_another_congestion_control(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate.netns, "available", lambda: None)  # (as where namespaces are allowed)
    monkeypatch.setattr(calibrate.netns, "host_congestion", lambda: "bbr")
    monkeypatch.setattr(calibrate.netns, "congestion_controls", lambda: ["reno", "bbr", "cubic"])
    (tmp_path / "calibration").mkdir()
    stored = tmp_path / "calibration" / "ddp-1mbit-real.json"
    stored.write_text('{"queue_ms": 100.0, "congestion": "bbr"}')
    assert calibrate.main(["--rates", "1mbit", "--congestion", "reno", "--out", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {stored} ran TCP's bbr congestion control, not reno: give another --out"
    )
    stored.write_text('{"queue_ms": 100.0}')  # from before cells recorded it
    assert calibrate.main(["--rates", "1mbit", "--congestion", "reno", "--out", str(tmp_path)]) == 2
    assert "ran TCP's unrecorded congestion control, not reno" in capsys.readouterr().err
    assert calibrate.main(["--rates", "1mbit", "--congestion", "vegas-x", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: TCP congestion control 'vegas-x' is not one this kernel")


def test_a_calibration_refuses_to_mix_its_stored_cells_with_another_agents_report_period(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate.netns, "available", lambda: None)  # (as where namespaces are allowed)
    monkeypatch.setattr(calibrate.netns, "host_congestion", lambda: "bbr")
    (tmp_path / "calibration").mkdir()
    stored = tmp_path / "calibration" / "ddp-1mbit-real.json"
    stored.write_text('{"queue_ms": 100.0, "congestion": "bbr", "agent_report_ms": null}')
    assert calibrate.main(["--rates", "1mbit", "--agent-report-ms", "60000", "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err.strip()
    assert said == f"error: {stored} ran with Ray's agents reporting at Ray's default period, not every 60000 ms: " + (
        "give another --out"
    )
    assert calibrate.main(["--rates", "1mbit", "--agent-report-ms", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --agent-report-ms must be a positive number of ms, not 0"
    stored.write_text('{"queue_ms": 100.0, "congestion": "bbr", "agent_report_ms": 60000}')
    assert calibrate.refusal(["1mbit"], ["ddp"], 100.0, tmp_path / "calibration", agent_report_ms=60000) is None


def test_a_calibration_refuses_a_bad_nice_value_and_to_mix_cells_of_another(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate.netns, "available", lambda: None)  # (as where namespaces are allowed)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setattr(calibrate.netns, "host_congestion", lambda: "bbr")
    (tmp_path / "calibration").mkdir()
    stored = tmp_path / "calibration" / "parts-10mbit-emulated.json"
    stored.write_text('{"queue_ms": 100.0}')  # from before cells recorded it: Ray's default
    assert calibrate.main(["--rates", "10mbit", "--worker-niceness", "0", "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err.strip()
    assert said == f"error: {stored} ran Ray's workers at Ray's default nice, not at nice 0: give another --out"
    for bad in ("20", "-1"):
        assert calibrate.main(["--rates", "10mbit", "--worker-niceness", bad, "--out", str(tmp_path)]) == 2
        said = capsys.readouterr().err.strip()
        assert said == f"error: --worker-niceness must be a nice value from 0 to 19, not {bad}"
    stored.write_text('{"queue_ms": 100.0, "worker_niceness": 0}')
    assert calibrate.refusal(["10mbit"], ["parts"], 100.0, tmp_path / "calibration", worker_niceness=0) is None
    monkeypatch.setenv("RAY_worker_niceness", "5")  # the cells would run at it, not at what they record
    assert calibrate.main(["--rates", "10mbit", "--worker-niceness", "0", "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err.strip()
    assert said == "error: RAY_worker_niceness=5 is set here: unset it and give --worker-niceness, " + (
        "which the cells record"
    )


def test_a_twin_cells_own_ray_starts_its_workers_at_the_nice_value_asked_for(monkeypatch):
    """The one-node twin starts its own Ray in the cell's process: the environment it runs
    in carries the workers' nice value, and Ray's default where none is asked for."""
    envs = []

    def run(argv, env, **kwargs):
        envs.append(env)
        return calibrate.subprocess.CompletedProcess(argv, 0, 'CELL {"images_per_s": 1.0}', "")

    monkeypatch.setattr(calibrate.subprocess, "run", run)
    monkeypatch.delenv(calibrate.WORKER_NICENESS_ENV, raising=False)
    args = calibrate.cell_args("parts", "10mbit", "emulated", 1.0, 0)
    assert calibrate.emulated_cell(args, 0)["images_per_s"] == 1.0
    calibrate.emulated_cell(args)
    assert envs[0]["RAY_worker_niceness"] == "0" and "RAY_worker_niceness" not in envs[1]
    assert envs[0]["PATH"] == calibrate.os.environ["PATH"]  # beside this process's own environment


def test_the_namespaced_ray_nodes_all_start_with_the_environment_asked_for(monkeypatch):
    """Every node's ``ray start`` (the processes it starts inherit it) gets ``ray_env`` beside the
    cluster's own environment and its node's gloo interface."""
    started = []

    class Nodes:
        rates, tag = ["1mbit", "1mbit"], "t"

        def address(self, k: int) -> str:
            return f"198.51.100.{k + 1}"

        def gloo_env(self, k: int) -> dict[str, str]:
            return {"GLOO_SOCKET_IFNAME": f"n{k}"}

        def run(self, k: int, argv: list[str], env: dict[str, str], **kwargs: object):
            started.append((k, argv[1], env))
            return calibrate.subprocess.CompletedProcess(argv, 0, "", "")

    env = calibrate.netns.start_ray(Nodes(), 1, ray_env=calibrate.ray_env(60000, 3))
    assert [(k, what) for k, what, _ in started] == [(0, "start"), (1, "start")]
    for k, _, node_env in started:
        assert node_env["REPORTER_UPDATE_INTERVAL_MS"] == "60000" and node_env["GLOO_SOCKET_IFNAME"] == f"n{k}"
        assert node_env["RAY_worker_niceness"] == "3"
        assert node_env["RAY_ADDRESS"] == env["RAY_ADDRESS"] == "198.51.100.1:6379"
    assert "REPORTER_UPDATE_INTERVAL_MS" not in env  # the command that joins runs without it


def test_the_twin_apart_runs_on_the_real_cells_two_nodes_unshaped_with_its_bandwidth_emulated(tmp_path, monkeypatch):
    apart = calibrate.cell_args("parts", "10mbit", "apart", 60.0, 4)
    real = calibrate.cell_args("parts", "10mbit", "real", 60.0, 4)
    plain = calibrate.cell_args("parts", "10mbit", "emulated", 60.0, 4)
    assert (apart["join"], apart["placement"], apart["link_spec"]) == (True, "spread", "bw=10Mbit,lat=0ms")
    assert (real["join"], real["placement"], real["link_spec"]) == (True, "spread", "up")
    assert (plain["join"], plain["placement"], plain["link_spec"]) == (False, "pack", "bw=10Mbit,lat=0ms")
    assert calibrate.charged_link("parts", "10mbit", "apart") == "bw=10Mbit,lat=0ms"
    ran: list[tuple[str, object]] = []  # each cell as run_cells runs it: on which network, at which rate
    host = {"commit": "c", "cpu": "x", "probe_images_per_s": 1.0}
    monkeypatch.setattr(calibrate, "host_figures", lambda seconds: host)
    monkeypatch.setattr(
        calibrate, "real_cell",
        lambda args, rate, queue_ms, tcp, agents, nice: ran.append(("nodes", rate, tcp, agents, nice)) or {},
    )  # fmt: skip
    monkeypatch.setattr(
        calibrate, "emulated_cell", lambda args, nice: ran.append(("one node", args["link_spec"], nice)) or {}
    )
    args = calibrate.argparse.Namespace(
        costs=False, apart=True, seed=0, budget=1.0, variant=None, queue_ms=100.0, congestion="cubic",
        agent_report_ms=60000, worker_niceness=0,
    )  # fmt: skip
    cells = calibrate.run_cells(["10mbit"], ["parts"], args, tmp_path)
    # None: unshaped; both namespaced cells under the congestion control and with the agents' period asked
    # for, and every cell's Ray workers at the nice value asked for
    assert ran == [
        ("nodes", "10mbit", "cubic", 60000, 0),
        ("one node", "bw=10Mbit,lat=0ms", 0),
        ("nodes", None, "cubic", 60000, 0),
    ]
    assert sorted(kind for _, _, kind in cells) == ["apart", "emulated", "real"]
    assert json.loads((tmp_path / "parts-10mbit-apart.json").read_text())["link"] == "bw=10Mbit,lat=0ms"
    assert {cell["worker_niceness"] for cell in cells.values()} == {0}


def test_the_table_sets_real_against_the_twin_apart_and_the_twin_apart_against_the_one_node_twin():
    real = {"images_per_s": 9.0, "seconds": 30.0, "steps": 5, "idle": 0.0, "bytes_per_step": 0.0,
            "kernel_bytes": 7.0e6, "idle_bytes_per_s": 0.0}  # fmt: skip
    twin = {"images_per_s": 12.0, "seconds": 30.0, "steps": 6, "idle": 0.9, "bytes_per_step": 6e5}
    cells = {("1mbit", "ddp", "real"): real, ("1mbit", "ddp", "emulated"): twin,
             ("1mbit", "ddp", "apart"): twin | {"images_per_s": 10.0}}  # fmt: skip
    lines = calibrate.table(cells).splitlines()
    assert lines[0].endswith("| real / emulated | emulated on the two nodes | real / that | that / emulated |")
    assert "| 1mbit | ddp | images/s | 9 | 12 | 0.75 | 10 | 0.90 | 0.83 |" in lines  # 0.75 = 0.90 x 0.83
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    # a figure only the two-node cells give (the head node's rank, which the one-node twin has not)
    rows = [[0.0, 5.0, 5.1], [5.1, 10.0, 10.1]]
    workers = [{"rank": r, "node_id": f"n{r}", "allreduce_exposed_s": None, "steps": rows} for r in (0, 1)]
    nodes = {"n0": {"address": "198.51.100.1"}, "n1": {"address": "198.51.100.2"}}
    placed = {"steps": 2, "workers": workers, "nodes": nodes, "start_spread_s": 0.0}
    cells = {k: cell | placed for k, cell in cells.items()} | {("1mbit", "ddp", "emulated"): twin | {"steps": 2}}
    lines = calibrate.table(cells).splitlines()
    assert "| 1mbit | ddp | the head node's rank ended later by, ms | 0 | nan | nan | 0 | nan | nan |" in lines


def test_a_costed_cell_that_charged_other_costs_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate.netns, "available", lambda: None)  # (as where namespaces are allowed)
    stored = tmp_path / "calibration" / "local-sgd-10mbit-costed.json"
    stored.parent.mkdir()
    stored.write_text(json.dumps({"link": "bw=10Mbit,lat=0ms,eff=0.5,msg=9ms"}))
    assert calibrate.main(["--rates", "10mbit", "--costs", "--out", str(tmp_path)]) == 2
    today = calibrate.costed_link("10mbit", "local-sgd")
    assert capsys.readouterr().err.strip() == (
        f"error: {stored} charged bw=10Mbit,lat=0ms,eff=0.5,msg=9ms, not today's {today}: give another --out"
    )


def test_the_cpu_table_gives_each_roles_cores_per_second_of_its_cell_and_the_hosts_states():
    def cpu(wall: float, parts: float, raylet: float, softirq: float) -> dict:
        kernel = {"user": 1.0, "nice": parts, "system": 1.0, "softirq": softirq, "idle": 2.0}
        return {"wall_s": wall, "roles": {"part actors": parts, "raylet": raylet}, "kernel": kernel}

    cells = {
        ("100mbit", "parts", "real"): {"cpu": cpu(40.0, 48.0, 8.0, 2.0) | {"ledger_s": 1.0}},
        ("100mbit", "parts", "emulated"): {"cpu": cpu(20.0, 30.0, 1.0, 0.0)},
        ("100mbit", "ddp", "real"): {},  # stored before cells accounted their CPU: no column
    }
    lines = calibrate.cpu_table(cells).splitlines()
    assert lines[0] == "| cores used on average | parts 100mbit real | parts 100mbit emulated |"
    assert "| part actors | 1.200 | 1.500 |" in lines  # 48 / 40 and 30 / 20
    assert "| raylet | 0.200 | 0.050 |" in lines
    assert "| host: softirq | 0.050 | 0.000 |" in lines
    assert "| host: nice | 1.200 | 1.500 |" in lines
    assert "| the connection ledger's ss processes | 0.025 | 0.000 |" in lines  # real cells only
    assert lines[-1] == "| seconds of the cell's process | 40.0 | 20.0 |"
    assert calibrate.cpu_table({("1mbit", "ddp", "real"): {}}) == ""
    training = {("100mbit", "parts", "real"): {"cpu_training": cpu(30.0, 54.0, 3.0, 0.0)}}
    lines = calibrate.cpu_table(training, over="cpu_training").splitlines()
    assert "| part actors | 1.800 |" in lines and lines[-1] == "| seconds of the training | 30.0 |"


def test_a_variant_of_the_races_sweep_reaches_the_cells_run_and_is_refused_where_it_does_not_fit(
    tmp_path, capsys, monkeypatch
):
    # the keys the race's own DDP cell reads its settings from (raylocal.bench.links.run_data_parallel)
    tuned = calibrate.cell_args("ddp", "10mbit", "costed", 30.0, 1, "cap0.1MB-bf16")
    assert (tuned["bucket_cap_mb"], tuned["ddp_compression"], tuned["link_costs"]) == (0.1, "bf16", "measured")
    plain = calibrate.cell_args("ddp", "10mbit", "costed", 30.0, 1)
    assert (plain["bucket_cap_mb"], plain["ddp_compression"]) == (None, "none")
    assert calibrate.main(["--methods", "ddp", "--variant", "cap9MB"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("error: --variant cap9MB: not one of the race's settings for --methods ddp (one-bucket, cap0.1MB,")
    )
    assert calibrate.main(["--variant", "cap0.1MB"]) == 2  # every method: a variant names one
    assert "(one --methods only)" in capsys.readouterr().err
    monkeypatch.setattr(calibrate.netns, "available", lambda: None)  # (as where namespaces are allowed)
    (tmp_path / "calibration").mkdir()
    stored = tmp_path / "calibration" / "ddp-10mbit-real.json"
    stored.write_text('{"queue_ms": 100.0}')  # from before variants: the default settings
    argv = ["--methods", "ddp", "--rates", "10mbit", "--out", str(tmp_path)]
    assert calibrate.main([*argv, "--variant", "cap0.1MB-bf16"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {stored} ran the default settings, not the cap0.1MB-bf16 ones: give another --out"
    )


def test_a_cell_records_its_cpu_over_its_process_and_over_its_parts_training_where_it_has_parts():
    class Account:  # what CpuAccount answers, by hand
        def figures(self) -> dict:
            return {"wall_s": 40.0}

        def between(self, start: float, end: float) -> dict:
            return {"wall_s": end - start}

    parts = calibrate.with_cpu({"part_window": [100.0, 130.0]}, Account(), ledger_s=1.5)
    assert parts["cpu"] == {"wall_s": 40.0, "ledger_s": 1.5} and parts["cpu_training"] == {"wall_s": 30.0}
    assert calibrate.with_cpu({"steps": 9}, Account())["cpu_training"] is None  # DDP, local SGD: no parts
