#!/usr/bin/env bash
# A Ray cluster of real nodes on one machine: each node in its own network
# namespace, joined by links shaped in the kernel (tbf), then a command on the
# head node, then everything torn down (also on failure and Ctrl-C). Needs root.
#     scripts/real_cluster.sh --rates 10mbit,10mbit -- python scripts/run_async.py --parts 2 --placement spread
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/with_env.sh python -m raylocal.cluster.netns "$@"
