#!/usr/bin/env python
"""Train a Glow: ``--schedule e2e|sequential|alternating|simultaneous|async``.

python scripts/train.py --schedule alternating --parts 2 --epochs 4 --finetune-epochs 2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raylocal.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
