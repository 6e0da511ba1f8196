#!/usr/bin/env python
"""Train a Glow in parts on Ray, all parts at once: the entry point users type.

    python scripts/run_async.py --parts 3

With no other option: an embedded local Ray, the bundled MNIST and a Glow
small enough to finish in a few minutes on 2 CPU cores. ``--address auto``
(or RAY_ADDRESS) joins an existing cluster; every option of scripts/train.py
applies (``--help``), plus ``--config FILE``.
"""

import sys

from raylocal.cli import train
from raylocal.core.config import EMBEDDED_DEFAULT as DEFAULTS
from raylocal.core.config import RaylocalConfig

# What the default run's numbers mean, from docs/benchmarks.md ("The embedded
# default", and "120 epochs"), measured on 2 CPU cores.
E2E_SAME_TIME_BPD = 2.47  # the same model end to end for the default run's wall time (2.4655)


def reading(config: RaylocalConfig, summary: dict) -> str | None:
    """One line on what the default run's numbers mean (none for other runs)."""
    flat = config.flat()
    if any(flat[k] != v for k, v in DEFAULTS.items()):
        return None
    return (
        f"reading it: a short run, {summary['test_bpd']:.2f} BPD. The same model trained end to end for the same "
        f"time reaches {E2E_SAME_TIME_BPD:.2f}; a Glow twice as deep (K=8) trained for 120 epochs (1-2 hours on "
        "one core) lands at 1.35 end to end and 1.41 in parts + fine-tune (docs/benchmarks.md)."
    )


def main(argv: list[str] | None = None) -> int:
    """``train``'s command line with the async defaults and the default run's reading."""
    return train.main(argv, description=__doc__, defaults=DEFAULTS, epilogue=reading)


if __name__ == "__main__":
    sys.exit(main())
