#!/usr/bin/env python
"""The weak-link race: parts against DDP and local SGD over emulated links.

The same as ``raylocal bench-links``; see raylocal.bench.links (``--help``).
"""

import sys

from raylocal.bench.links import main

if __name__ == "__main__":
    sys.exit(main())
