#!/usr/bin/env python
"""Run a study: arms over declared seeds, paired and decided.

The same as ``raylocal study``; see raylocal.study.studies (``--help``).
"""

import sys

from raylocal.study.studies import main

if __name__ == "__main__":
    sys.exit(main())
