#!/usr/bin/env python
"""Train configs side by side and tabulate them.

The same as ``raylocal compare``; see raylocal.study.compare (``--help``).
"""

import sys

from raylocal.study.compare import main

if __name__ == "__main__":
    sys.exit(main())
