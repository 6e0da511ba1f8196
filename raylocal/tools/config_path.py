"""The modules a run's config passes through on the driver.

It runs a tiny async run with a fine-tune in this process and records, in
order, every call of a raylocal function that gets the config. That is the
config as an argument, or as ``self.config``; the config's own methods are left
out. Consecutive calls in one module count as one stop. The path of stops
shows how often each module is visited, and how often the path climbs back
to a module it had already left. The parts and the fine-tune run in their
own processes; only the driver's path is traced.

    python -m raylocal.tools.config_path --data-root data/mnist
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from collections import Counter
from typing import Any

from raylocal.core.config import RaylocalConfig

TINY = ["--n-levels", "2", "--depth", "2", "--hidden", "8", "--batch-size", "16", "--init-batch-size", "64",
        "--eval-batch-size", "32", "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--samples", "4",
        "--warmup-steps", "2", "--threads", "1", "--device", "cpu", "--no-progress"]  # fmt: skip


def stops(calls: list[tuple[str, str]]) -> list[str]:
    """The modules of ``calls`` ((module, function) in order), consecutive repeats as one."""
    path: list[str] = []
    for module, _ in calls:
        if not path or path[-1] != module:
            path.append(module)
    return path


def visits(path: list[str]) -> dict[str, int]:
    """Each module of the path visited more than once, and how often."""
    return {module: n for module, n in Counter(path).items() if n > 1}


def climbs(path: list[str]) -> int:
    """Stops that return to a module the path had already left."""
    return sum(module in path[:k] for k, module in enumerate(path))


def trace(argv: list[str]) -> list[tuple[str, str]]:
    """The driver's calls that get the config, while ``raylocal.cli.train.main(argv)`` runs."""
    from raylocal.cli.train import main

    calls: list[tuple[str, str]] = []

    def record(frame: Any, event: str, _: Any) -> None:
        module = frame.f_globals.get("__name__", "")
        if event != "call" or not module.startswith("raylocal.") or module == "raylocal.core.config":
            return
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            value = frame.f_locals.get(name)
            if isinstance(value, RaylocalConfig) or isinstance(getattr(value, "config", None), RaylocalConfig):
                calls.append((module.removeprefix("raylocal."), code.co_name))
                return

    sys.setprofile(record)
    threading.setprofile(record)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    if code != 0:
        raise SystemExit(f"error: the traced run failed ({code})")
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/mnist", help="MNIST's files (only the first 64 and 32 are used)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = ["--schedule", "async", "--parts", "2", "--finetune-epochs", "1", "--data-root", args.data_root]
        calls = trace([*run, *TINY, "--storage-path", tmp, "--run-name", "traced"])
    path = stops(calls)
    print("\n".join(f"{module}.{function}" for module, function in calls))
    print(f"\n{len(calls)} calls, {len(path)} stops: " + " -> ".join(path))
    print(f"modules visited more than once: {visits(path) or 'none'}; climbs back: {climbs(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
