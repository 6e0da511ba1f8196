"""The repository's own set-up files agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pip_section(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    out = []
    for line in lines[start + 1 :]:
        if not line.strip() or len(line) - len(line.lstrip()) < indent:
            break
        out.append(line.strip()[2:].strip())
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = set(_pip_section((ROOT / "environment.yml").read_text())) - {"-e ."}
    assert env == wanted
    assert "torch==2.14.1" in wanted and "torchvision==0.29.1" in wanted
    assert any(d.startswith("ray[default,train,tune]") for d in wanted)


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    commands = [c for b in block for c in b.splitlines() if c.strip() and not c.startswith("#")]
    assert len(commands) == 2, commands
    assert "scripts/run_async.py --parts 3" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def test_bundled_mnist_matches_shared_copy_checksums():
    import hashlib

    sums = {
        "t10k-images.idx3-ubyte.gz": "f72c2dff3457595ec2fe452d25d97b7f974a74ad5b006687704212bedd1486d8",
        "train-images.idx3-ubyte.gz": "b09d8b89df4ad239afc76a323dbe9559169cd8cca365467dfe8aa1f7ca54109b",
    }
    for name, digest in sums.items():
        assert hashlib.sha256((ROOT / "data" / "mnist" / name).read_bytes()).hexdigest() == digest


def test_every_committed_config_file_validates():
    from raylocal.config import read_config_file, validate_config

    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "configs").glob("*/*.json"))
    assert len(files) >= 10
    for f in files:
        config = validate_config(read_config_file(f), str(f))
        assert config.run_name, f  # compare.py keys its reuse of finished runs on it
