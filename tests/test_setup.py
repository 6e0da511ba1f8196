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
    from raylocal.core.config import read_config_file, validate_config

    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "configs").glob("*/*.json"))
    assert len(files) >= 10
    for f in files:
        config = validate_config(read_config_file(f), str(f))
        assert config.run.run_name, f  # compare.py keys its reuse of finished runs on it


# The sub-packages from the ground floor up: a package imports only packages below it.
LAYERS = [
    "core", "model", "training", "pipeline", "cluster", "baselines", "run", "tune", "study", "bench", "cli", "tools",
]  # fmt: skip


def package_imports() -> list[tuple[str, str, str]]:
    """(file, its package, the raylocal package it imports) for every import of every module."""
    import ast

    found = []
    for path in sorted((ROOT / "raylocal").rglob("*.py")):
        inside = path.relative_to(ROOT / "raylocal").parts
        if len(inside) == 1:
            continue  # raylocal/errors.py and __init__.py: imported by all, import nothing of ours
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("raylocal.") and name.split(".")[1] != "errors":
                    found.append((str(path.relative_to(ROOT)), inside[0], name.split(".")[1]))
    return found


def test_every_module_sits_in_a_layer_and_imports_only_layers_below_it():
    imports = package_imports()
    assert len(imports) > 100 and {here for _, here, _ in imports} == set(LAYERS)
    upward = [f"{f}: {here} imports {there}" for f, here, there in imports if LAYERS.index(there) > LAYERS.index(here)]
    assert upward == []


def test_scripts_are_thin_wrappers_around_the_package():
    from raylocal.cli import COMMANDS

    modules = {module for module, _ in COMMANDS.values()}
    for script in sorted((ROOT / "scripts").glob("*.py")):
        text = script.read_text()
        imported = re.findall(r"^from (raylocal[\w.]*) import main$", text, re.M)
        assert len(imported) == 1 and imported[0] in modules, script.name
        assert "sys.path" not in text and len(text.splitlines()) <= 15, script.name


def test_the_raylocal_command_dispatches_and_refuses_an_unknown_command_in_one_line(capsys):
    from raylocal.cli import COMMANDS, main

    assert main(["study", "reference", "--show"]) == 0
    shown = capsys.readouterr().out
    assert '"name": "reference"' in shown and '"2p-across"' in shown
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: unknown command 'trian'; one of {', '.join(COMMANDS)}"]


def test_no_function_is_past_60_lines_and_no_class_past_300():
    """Issue 33's sizes, as it states them."""
    import ast

    long = []
    for path in sorted((ROOT / "raylocal").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                size, limit = node.end_lineno - node.lineno + 1, 300 if isinstance(node, ast.ClassDef) else 60
                if size > limit:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} is {size} lines")
    assert long == []


def test_what_a_ray_driver_runs_after_joining_ray_imports_nothing_of_ours_inside_a_function():
    """Under `ray job submit` the job's working directory (this code's uploaded copy) can be removed
    once the driver has joined Ray (where nodes share a Ray temp directory): the modules a driver runs from
    then on (cluster/, baselines/, run/, tune/tuning.py) import ours at their top, and the only
    imports inside a function are those that run before joining (the Ray phases, chosen in run.py)."""
    import ast

    before_joining = {"raylocal/run/run.py"}
    late = []
    for folder in ("cluster", "baselines", "run", "tune"):
        for path in sorted((ROOT / "raylocal" / folder).glob("*.py")):
            name = str(path.relative_to(ROOT))
            if name in before_joining:
                continue
            for func in ast.walk(ast.parse(path.read_text())):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    module = node.module if isinstance(node, ast.ImportFrom) else None
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [module]
                    late += [f"{name}:{node.lineno}: {m}" for m in modules if m and m.startswith("raylocal")]
    assert late == []
