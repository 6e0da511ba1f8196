#!/usr/bin/env python
"""Train a Glow in parts on Ray, all parts at once: the entry point users type.

    python scripts/run_async.py --parts 3

With no other option: an embedded local Ray, the bundled MNIST and a Glow
small enough to finish in a few minutes on 2 CPU cores. ``--address auto``
(or RAY_ADDRESS) joins an existing cluster; every option of scripts/train.py
applies (``--help``), plus ``--config FILE``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raylocal.cli import main  # noqa: E402

# The embedded default: small enough for a few minutes on 2 CPU cores.
DEFAULTS = {
    "schedule": "async",
    "parts": 3,
    "n_levels": 2,
    "depth": 4,
    "hidden": 64,
    "epochs": 3,
    "finetune_epochs": 1,
    "train_subset": 20000,
    "test_subset": 5000,
    "warmup_steps": 100,
    "lr": [1e-3],
}

if __name__ == "__main__":
    sys.exit(main(description=__doc__, defaults=DEFAULTS))
