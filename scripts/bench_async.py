#!/usr/bin/env python
"""The async parts phase against one device: throughput and CPU use.

The same as ``raylocal bench-async``; see raylocal.bench.async_bench (``--help``).
"""

import sys

from raylocal.bench.async_bench import main

if __name__ == "__main__":
    sys.exit(main())
