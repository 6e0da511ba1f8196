#!/usr/bin/env python
"""Samples and reconstructions from a finished run.

The same as ``raylocal pictures``; see raylocal.tools.pictures (``--help``).
"""

import sys

from raylocal.tools.pictures import main

if __name__ == "__main__":
    sys.exit(main())
