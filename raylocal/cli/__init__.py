"""The ``raylocal`` command: one subcommand per entry point, each the same as its
script (``raylocal run-async --parts 3`` is ``python scripts/run_async.py --parts 3``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("raylocal.cli.train", "Train a Glow: e2e, sequential, alternating, simultaneous or async."),
    "run-async": (
        "raylocal.cli.run_async",
        "Train a Glow in parts on Ray, all at once (no options: the embedded default).",
    ),
    "tune": ("raylocal.tune.cli", "Search per-part learning rates with Ray Tune."),
    "study": ("raylocal.study.studies", "Run a study: arms over declared seeds, paired and decided."),
    "compare": ("raylocal.study.compare", "Train configs side by side and tabulate them."),
    "bench-links": ("raylocal.bench.links", "The weak-link race: parts against DDP and local SGD over emulated links."),
    "bench-async": ("raylocal.bench.async_bench", "The async parts phase against one device: throughput and CPU use."),
    "bench-glow": ("raylocal.bench.glow_bench", "Glow kernel throughput: compiled or not, CPU or GPU."),
    "bench-memory": ("raylocal.bench.memory", "Memory of the parts phase: per-process RSS and the object store."),
    "pictures": ("raylocal.tools.pictures", "Samples and reconstructions from a finished run."),
    "outliers": ("raylocal.tools.outliers", "A finished run's test BPD image by image: its median and worst images."),
    "netns": ("raylocal.cluster.netns", "Ray nodes in network namespaces joined by shaped links, around a command."),
    "gpu-check": ("raylocal.tools.gpu_check", "The GPU check: kernels, a short run and their figures."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    return f"usage: raylocal COMMAND [OPTIONS]  (raylocal COMMAND --help)\n\ncommands:\n{rows}"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``raylocal COMMAND ...`` to that command's ``main``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    sys.argv = [f"raylocal {args[0]}", *args[1:]]  # argparse names the command in its usage and errors
    return module.main(args[1:]) or 0
