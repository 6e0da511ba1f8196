#!/usr/bin/env python
"""Glow kernel throughput: compiled or not, CPU or GPU.

The same as ``raylocal bench-glow``; see raylocal.bench.glow_bench (``--help``).
"""

import sys

from raylocal.bench.glow_bench import main

if __name__ == "__main__":
    sys.exit(main())
