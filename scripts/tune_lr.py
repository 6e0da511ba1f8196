#!/usr/bin/env python
"""Search per-part learning rates with Ray Tune.

The same as ``raylocal tune``; see raylocal.tune.cli (``--help``).
"""

import sys

from raylocal.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
