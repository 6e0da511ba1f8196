#!/usr/bin/env bash
# One check of a GPU host, in under 8 minutes on one GPU: what torch sees, Glow's
# throughput and memory at the reference size, TF32 against IEEE float32, a
# 3-part async run and a faults run on the GPU, and checkpoints that load on a
# CPU. Everything goes under $OUT (default gpu_check/). Without a GPU it runs
# the same steps on the CPU and says what it skipped (raylocal/tools/gpu_check.py).
#     scripts/gpu_check.sh
#     OUT=/tmp/gpu-check scripts/gpu_check.sh --data-root data/mnist
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/with_env.sh python -m raylocal.tools.gpu_check --out "${OUT:-gpu_check}" "$@"
