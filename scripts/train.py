#!/usr/bin/env python
"""Train a Glow: e2e, sequential, alternating, simultaneous or async.

The same as ``raylocal train``; see raylocal.cli.train (``--help``).
"""

import sys

from raylocal.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
