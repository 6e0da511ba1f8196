"""Every kind of bad input is one line on stderr, exit status 2, and nothing half-written."""
# ruff: noqa: E501  (one case per line reads best as a table)

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_digits, tiny_options, write_idx_images
from PIL import Image

from raylocal.cli import run_async
from raylocal.cli.train import main
from raylocal.core.config import RaylocalConfig
from raylocal.errors import ConfigError
from raylocal.tune import cli as tune_lr


def _folder(root: Path, sizes=((6, 6), (6, 6)), bad: str | None = None) -> Path:
    for split in ("train", "test"):
        d = root / split / "a"
        d.mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if bad:
        (root / "train" / "a" / bad).write_text("this is not an image")
    return root


def _empty_folder(root: Path) -> Path:
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
    return root


def _bad_magic(root: Path) -> Path:
    root.mkdir()
    write_idx_images(root / "train-images-idx3-ubyte.gz", synthetic_digits(4), magic=2049)
    write_idx_images(root / "t10k-images-idx3-ubyte.gz", synthetic_digits(4))
    return root


def _config_file(tmp: Path, text: str) -> Path:
    path = tmp / "cfg.json"
    path.write_text(text)
    return path


def _broken_link(root: Path, name: str) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).symlink_to(root / "elsewhere")
    return name


# (id, extra options or a function of tmp_path giving them, expected fragment of the message)
CASES = [
    # part specs
    ("spec-empty-part", {"schedule": "alternating", "part_spec": "1||2"}, "part 2 of '1||2' is empty"),
    ("spec-overlap", {"schedule": "alternating", "part_spec": "1,2|2"}, "overlaps: layers"),
    ("spec-gap", {"schedule": "alternating", "part_spec": "layers:0-3|5-14"}, "gap: layers 4-4"),
    ("spec-out-of-range", {"schedule": "alternating", "part_spec": "1|2,3"}, "block 3 is out of range"),
    ("spec-syntax", {"schedule": "alternating", "part_spec": "first|second"}, "'first' is not a block"),
    ("more-parts-than-layers", {"schedule": "alternating", "parts": 100}, "100 parts but the model has only"),
    (
        "by-block-too-many",
        {"schedule": "alternating", "parts": 3, "split": "by-block"},
        "need at least 3 blocks",
    ),
    # config values
    ("negative-lr", {"lr": "-1"}, "every learning rate must be a positive number, got -1.0"),
    ("zero-lr", {"lr": "0"}, "got 0.0"),
    ("lr-not-number", {"lr": "fast"}, "expected numbers separated by commas, got 'fast'"),
    (
        "lr-count",
        {"schedule": "alternating", "parts": 3, "lr": "1e-3,1e-3"},
        "lr has 2 values but there are 3 parts",
    ),
    (
        "batch-size-zero",
        {"batch_size": 0},
        "batch_size: Input should be greater than or equal to 1 (got '0')",
    ),
    ("batch-size-text", {"batch_size": "big"}, "batch_size: Input should be a valid integer"),
    ("image-not-divisible", {"n_levels": 4}, "image size 8x8 is not divisible by 2^n_levels = 16"),
    ("unknown-schedule", {"schedule": "sometimes"}, "schedule: Input should be 'e2e', 'sequential'"),
    ("n-bits", {"n_bits": 9}, "n_bits: Input should be less than or equal to 8"),
    ("negative-epochs", {"epochs": -1}, "epochs: Input should be greater than or equal to 0"),
    (
        "alternate-every-wrong-schedule",
        {"schedule": "simultaneous", "parts": 2, "alternate_every": 10},
        "alternate_every=10 applies to the alternating schedule, not 'simultaneous'",
    ),
    ("bad-link", {"link": "sometimes"}, "link 'sometimes': 'sometimes' is not KEY=VALUE"),
    ("link-without-unit", {"link": "bw=10,lat=20ms"}, "bw=10 needs a unit, e.g. bw=10Mbit"),
    # the rivals' messages are timed: a link counted in a part's steps would do nothing
    (
        "rival-step-based-link",
        {"schedule": "data-parallel", "workers": 2, "finetune_epochs": 0, "link": "bw=1Gbit,p=0.9"},
        "link 'bw=1Gbit,p=0.9': p= and outage= count a part's steps",
    ),
    (
        "pipeline-step-based-outage",
        {"schedule": "pipeline", "parts": 2, "finetune_epochs": 0, "link": "outage=5:3"},
        "but a pipeline run sends by the clock; use mtbf= and mttr=",
    ),
    # so is a DDP fine-tune's: its parts would honour the outage, its fine-tune not
    (
        "ddp-finetune-step-based-link",
        {"schedule": "async", "parts": 2, "finetune_epochs": 1, "finetune_workers": 2, "link": "bw=1Gbit,outage=5:3"},
        "but its DDP fine-tune (finetune_workers=2) sends by the clock",
    ),
    ("bad-starve", {"starve": "never"}, "starve: Input should be 'wait' or 'stale'"),
    (
        "bad-wire-dtype",
        {"wire_dtype": "int4"},
        "wire_dtype: Input should be 'float32', 'bfloat16', 'float16' or 'int8'",
    ),
    ("unknown-flag", ["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1"),
    ("batch-larger-than-data", {"batch_size": 1000}, "batch size 1000 is larger than the 64 training images"),
    # config files
    (
        "config-unknown-key",
        lambda t: {"config": _config_file(t, '{"learning_rate": 1}')},
        "learning_rate: unknown option",
    ),
    (
        "config-wrong-type",
        lambda t: {"config": _config_file(t, '{"depth": [2]}')},
        "depth: Input should be a valid integer",
    ),
    ("config-not-json", lambda t: {"config": _config_file(t, "depth = 2")}, "not valid JSON"),
    ("config-missing", lambda t: {"config": t / "nope.json"}, "nope.json: config file does not exist"),
    ("config-not-object", lambda t: {"config": _config_file(t, "[1, 2]")}, "must hold a JSON object"),
    # data
    ("data-missing-dir", lambda t: {"data_root": t / "absent"}, "absent: MNIST directory does not exist"),
    ("data-bad-magic", lambda t: {"data_root": _bad_magic(t / "m")}, "magic number 2049, expected 2051"),
    (
        "folder-empty",
        lambda t: {"dataset": "folder", "data_root": _empty_folder(t / "f"), "cache_dir": t / "c"},
        "train: no images found",
    ),
    (
        "folder-non-image",
        lambda t: {"dataset": "folder", "data_root": _folder(t / "f", bad="x.jpg"), "cache_dir": t / "c"},
        "x.jpg: not a readable image",
    ),
    (
        "folder-mixed-sizes",
        lambda t: {
            "dataset": "folder",
            "data_root": _folder(t / "f", sizes=((6, 6), (8, 8))),
            "cache_dir": t / "c",
        },
        "all images must have the same size",
    ),
    ("cifar-missing", lambda t: {"dataset": "cifar10", "data_root": t}, "CIFAR-10 not found"),
    # resume and storage
    ("resume-no-checkpoint", {"resume": True, "run_name": "never"}, "--resume: no checkpoint at"),
    (
        "run-name-broken-link",
        lambda t: {"run_name": _broken_link(t / "runs", "gone")},  # t / "runs" is the storage path
        "run_name 'gone': ",
    ),
    (
        "storage-not-writable",
        {"storage_path": "/proc/raylocal"},
        "storage_path '/proc/raylocal' is not writable",
    ),
]


@pytest.mark.parametrize("case,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, extra, message, mnist_dir, tmp_path, capsys):
    storage = tmp_path / "runs"
    if callable(extra):
        extra = extra(tmp_path)
    if isinstance(extra, list):
        argv = tiny_options(mnist_dir, storage) + extra
    else:
        extra = dict(extra)
        if "data_root" not in extra:
            extra["data_root"] = mnist_dir
        argv = tiny_options(mnist_dir, storage, **extra)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert message in err[0], err[0]
    # nothing half-written: no run directory holds a checkpoint or summary
    assert not list(storage.glob("*/checkpoint.pt")) and not list(storage.glob("*/summary.json"))


def test_compile_without_a_cxx_compiler_is_one_line(mnist_dir, tmp_path, capsys):
    import torch._inductor.config

    storage = tmp_path / "runs"
    # inductor's own patcher: pytest's monkeypatch would delete the setting on undo
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-c++")}):
        assert main(tiny_options(mnist_dir, storage, compile=True, device="cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --compile on CPU needs a C++ compiler (g++ or $CXX); none was found"]
    assert not list(storage.glob("*/checkpoint.pt"))


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_unreachable_ray_address_is_one_line(mnist_dir, tmp_path):
    import subprocess
    import sys

    argv = tiny_options(mnist_dir, tmp_path / "runs", schedule="async", parts=2, address="127.0.0.1:1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent.parent / "scripts" / "train.py"), *argv],
        capture_output=True, text=True, timeout=180,
        env={**__import__("os").environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert proc.returncode == 2
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cannot reach Ray at '127.0.0.1:1'" in err[0], proc.stderr[-2000:]


def test_without_an_address_a_run_starts_a_ray_of_its_own_never_one_a_stale_file_names(tmp_path, monkeypatch):
    """A bare ``ray.init()`` joins whatever /tmp/ray/ray_current_cluster (or pgrep)
    finds, and waits minutes on a cluster that died; the embedded default must not."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    from raylocal.cluster import connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(connect, "drop_ray_noise", lambda *a: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect.connect(RaylocalConfig())
    assert [kw.get("address") for kw in calls] == ["local"]
    (tmp_path / "ray_current_cluster").write_text("192.0.2.9:1")  # a dead cluster's address file
    assert canonicalize_bootstrap_address("local", str(tmp_path)) is None  # Ray: "local" is a new instance


def test_a_tune_space_that_is_not_python_is_one_line(mnist_dir, tmp_path, capsys):
    notes = tmp_path / "space.txt"
    notes.write_text("not python\n")
    assert tune_lr.main(["--space", str(notes), *tiny_options(mnist_dir, tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {notes}: a tune space is a Python file (.py), see tune_spaces/"]


def test_run_async_help_shows_the_defaults_it_really_uses():
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "run_async.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(out.split())
    assert "number of parts K (default: 3)" in flat
    assert "| simultaneous | async (default: async)" in flat
    assert "(per part for sequential) (default: 3)" in flat


def test_the_default_run_ends_with_what_its_numbers_mean():
    config = RaylocalConfig(**run_async.DEFAULTS)
    line = run_async.reading(config, {"test_bpd": 2.5})
    assert "2.50 BPD" in line and f"reaches {run_async.E2E_SAME_TIME_BPD:.2f}" in line
    assert "docs/benchmarks.md" in line
    assert run_async.reading(config.replace(depth=2), {"test_bpd": 2.5}) is None


# An async run checks what it can in the driver before anything starts on Ray: each
# of these ends at once in one line, with no actor, placement group or run directory.
ASYNC_CASES = [
    ("parts-beyond-the-model", {"parts": 500}, "500 parts but the model has only 15 layers"),
    ("spec-block-beyond-the-model", {"parts": 2, "part_spec": "1|9"}, "block 9 is out of range"),
    ("spec-empty-slice", {"parts": 2, "part_spec": "1[5:2]|2"}, "1[5:2] selects no valid steps"),
    ("link-for-too-many-boundaries", {"parts": 2, "link": "bw=1Mbit|bw=2Mbit"}, "names 2 boundaries"),
    ("fault-for-a-missing-part", {"parts": 2, "inject": "ray-kill:5@3"}, "there is no part 5"),
    ("part-larger-than-any-node", {"parts": 2, "cpus_per_part": 3}, "a part's bundle of {CPU 3} fits no node"),
    ("spread-over-one-node", {"parts": 2, "placement": "spread"}, "but only 1 can hold one"),
    ("too-many-cpus-in-all", {"parts": 2, "cpus_per_part": 0.8}, "the cluster has 2"),
    ("storage-not-writable", {"parts": 2, "storage_path": "/proc/raylocal"}, "'/proc/raylocal' is not writable"),
]


@pytest.mark.parametrize("case,extra,message", ASYNC_CASES, ids=[c[0] for c in ASYNC_CASES])
def test_an_async_run_fails_fast_before_anything_starts(case, extra, message, mnist_dir, tmp_path, capsys, ray_session):
    import time

    storage = tmp_path / "runs"
    options = {"schedule": "async", "finetune_epochs": 1} | extra
    start = time.perf_counter()
    assert main(tiny_options(mnist_dir, storage, **options)) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not storage.exists() or not [p for p in storage.iterdir() if not p.name.startswith(".")]
    assert not ray_session.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray_session.util.placement_group_table().values()
    )


def test_every_option_is_in_one_section_and_help_lists_them_by_section():
    from raylocal.core.config import SECTIONS, build_parser

    names = [name for section in SECTIONS.values() for name in section]
    assert sorted(names) == sorted(RaylocalConfig().flat()) and len(set(names)) == len(names)  # each once
    text = build_parser("t").format_help()
    heads = [text.index(f"{section} options:") for section in SECTIONS]
    assert heads == sorted(heads)
    for section, fields in SECTIONS.items():  # every flag under its own section's heading
        start = text.index(f"{section} options:")
        end = min([h for h in heads if h > start] + [len(text)])
        assert all(f"--{f.replace('_', '-')}" in text[start:end] for f in fields), section


def test_a_config_file_by_section_is_the_flat_one_and_a_misplaced_key_is_one_line(mnist_dir, tmp_path, capsys):
    import json

    from raylocal.core.config import load_config_file, write_config_file

    flat = {"depth": 2, "hidden": 8, "lr": [2e-3], "link": "bw=10Mbit", "parts": 2, "seed": 3}
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    sectioned = {
        "model": {"depth": 2, "hidden": 8},
        "schedule": {"lr": [2e-3], "seed": 3},
        "links": {"link": "bw=10Mbit"},
    }
    (tmp_path / "sectioned.json").write_text(json.dumps(sectioned | {"parts": 2}))  # sections and flat keys mix
    a, b = load_config_file(tmp_path / "flat.json"), load_config_file(tmp_path / "sectioned.json")
    assert a == b and a.model.depth == 2 and a.links.link == "bw=10Mbit" and a != RaylocalConfig()
    write_config_file(b, tmp_path / "out.json")  # written by section, read back the same
    assert json.loads((tmp_path / "out.json").read_text())["model"]["depth"] == 2
    assert load_config_file(tmp_path / "out.json") == b
    for bad, message in [
        ({"model": {"lr": [1e-3]}}, "model.lr: belongs to section 'schedule'"),
        ({"model": {"depth": 2}, "depth": 3}, "depth is given twice"),
        ({"model": {"depht": 2}}, "depht: unknown option"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        assert main(tiny_options(mnist_dir, tmp_path / "runs", config=str(path))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {path}: {message}"], err
    assert not (tmp_path / "runs").exists()


def test_the_config_object_is_its_sections_and_reads_every_older_form():
    import json

    from raylocal.core.config import ConfigError, PartsSection, validate_config

    flat = {"depth": 3, "parts": 2, "schedule": "async", "lr": "1e-3,5e-4", "link": "bw=10Mbit", "workers": 4}
    config = RaylocalConfig(**flat)
    # each setting in its own section; the two that share their section's name are its count and its name
    assert (config.model.depth, config.parts.count, config.schedule.name) == (3, 2, "async")
    assert (config.schedule.lr, config.links.link, config.cluster.workers) == ([1e-3, 5e-4], "bw=10Mbit", 4)
    assert config.model.hidden == 64 and config.run.storage_path == "runs"  # the rest at their defaults
    # a checkpoint's record from before the sections (flat JSON), and sections keyed by the flags' own names
    before = json.dumps(config.flat(mode="json"))
    assert "count" not in before and RaylocalConfig.model_validate_json(before) == config
    by_flags = {"model": {"depth": 3}, "parts": {"parts": 2}, "schedule": {"schedule": "async", "lr": [1e-3, 5e-4]}}
    assert RaylocalConfig(**by_flags, link="bw=10Mbit", workers=4) == config
    assert RaylocalConfig.model_validate_json(config.model_dump_json()) == config  # written by section
    on_file = config.sectioned()  # what files hold: by section, each setting by its flag's name
    assert (on_file["parts"]["parts"], on_file["schedule"]["schedule"], on_file["model"]["depth"]) == (2, "async", 3)
    assert RaylocalConfig(**on_file) == config
    # a copy with flat names changed leaves the original alone; a name that is no setting is refused
    copy = config.replace(depth=5, parts=3)
    assert (copy.model.depth, copy.parts.count, config.model.depth, config.parts.count) == (5, 3, 3, 2)
    with pytest.raises(ValueError, match="deph: unknown option"):
        config.replace(deph=5)
    assert (
        RaylocalConfig(parts=PartsSection(count=2), split="by-block").parts.split == "by-block"
    )  # given, not defaults
    for bad, message in [
        ({"model": 5, "depth": 4}, "model: a section holds its settings as an object, got 5"),
        ({"run": "x", "resume": False}, "run: a section holds its settings as an object, got 'x'"),
    ]:
        with pytest.raises(ConfigError, match=f"^options: {message}$"):
            validate_config(bad, "options")
    # a section's bad value is named by its flag, as before the sections
    with pytest.raises(ConfigError, match=r"^options: parts: Input should be greater than or equal to 1 \(got 0\)$"):
        validate_config({"parts": {"count": 0}}, "options")


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("e2e", "interrupted: the last checkpoint is kept; rerun with --resume"),
        ("data-parallel", "interrupted: a data-parallel run does not resume; start it again"),
    ],
)
def test_ctrl_c_says_what_the_schedule_can_do_next(mnist_dir, tmp_path, capsys, schedule, message):
    def interrupted(config: RaylocalConfig) -> dict:
        raise KeyboardInterrupt

    assert main(tiny_options(mnist_dir, tmp_path / "runs", schedule=schedule), runner=interrupted) == 130
    assert capsys.readouterr().err.strip() == message


def test_a_finished_rivals_record_reads_back_with_a_setting_a_rival_now_refuses(tmp_path):
    """A rival run finished before a setting it ignored was refused: its record
    stays readable as it ran (the tools and the studies read it back), while
    the same settings given for a new run are refused in one line."""
    import json

    from raylocal.core.config import load_config_file

    record = tmp_path / "config.json"
    record.write_text(json.dumps({"schedule": {"schedule": "data-parallel", "max_rollbacks": 3}}))
    with pytest.raises(ConfigError, match="max_rollbacks=3: a data-parallel run never rolls back"):
        load_config_file(record)
    ran = load_config_file(record, recorded=True)
    assert ran.schedule.name == "data-parallel" and ran.schedule.max_rollbacks == 3
    record.write_text(json.dumps({"schedule": "data-parallel", "finetune_epochs": 2}))  # never ran: still refused
    with pytest.raises(ConfigError, match="finetune_epochs=2: the data-parallel schedule trains end to end"):
        load_config_file(record, recorded=True)
