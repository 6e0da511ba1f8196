#!/usr/bin/env python
"""Memory of the parts phase: per-process RSS and the object store.

The same as ``raylocal bench-memory``; see raylocal.bench.memory (``--help``).
"""

import sys

from raylocal.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
