#!/usr/bin/env python
"""Train a Glow in parts on Ray, all parts at once (the embedded default with no options).

The same as ``raylocal run-async``; see raylocal.cli.run_async (``--help``).
"""

import sys

from raylocal.cli.run_async import main

if __name__ == "__main__":
    sys.exit(main())
