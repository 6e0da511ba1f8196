#!/bin/bash
# The cells DECLARED.txt names: local SGD's plain twin at 100 Mbit, before and after 7b84f4b2, from
# worktrees of the two commits (/work/wt-before, /work/wt-after), each cell's result line kept.
set -euo pipefail
OUT=${1:?usage: run_cells.sh OUT}
mkdir -p "$OUT"
for S in 1 2 3; do
  if [ $S = 2 ]; then ORDER="after before"; else ORDER="before after"; fi
  for V in $ORDER; do
    ARGS=$(cd /work/wt-$V && PYTHONPATH=/work/wt-$V .venv/bin/python -c "from raylocal.tools.calibrate import cell_args; import json; print(json.dumps(cell_args('local-sgd', '100mbit', 'emulated', 60.0, $S)))")
    (cd /work/wt-$V && PYTHONPATH=/work/wt-$V .venv/bin/python -m raylocal.tools.calibrate --cell "$ARGS") | grep '^CELL ' | sed 's/^CELL //' > "$OUT/seed$S-$V.json"
    echo "seed $S $V done at $(date -u +%H:%M:%S)"
  done
done
