#!/usr/bin/env bash
# The whole test suite at the commit before the renovation (issue 33) and at today's
# commit, in the order A B B A, each from a frozen worktree of its commit with its own
# code first on PYTHONPATH, one pytest run at a time, nothing else running. Every
# test's own time is kept (--durations=0), so that the tests of both suites
# (kept_tests.txt) can be told apart from those added since.
#     bash docs/results/suite-time/run_block.sh OUT_DIR OLD_COMMIT NEW_COMMIT
set -euo pipefail
out=$1; old=$2; new=$3
here="$(cd "$(dirname "$0")" && pwd)"
main="$(cd "$here/../../.." && pwd)"
mkdir -p "$out"
for label in old new; do
    commit=$([ "$label" = old ] && echo "$old" || echo "$new")
    wt="/work/wt-suite-$label"
    [ -d "$wt" ] || git -C "$main" worktree add -f "$wt" "$commit" --detach -q
    ln -sfn "$main/.venv" "$wt/.venv"
    touch -r "$main/pyproject.toml" "$wt/pyproject.toml"
done
grep "model name" /proc/cpuinfo | head -1 > "$out/host.txt"
for label in old new new old; do
    wt="/work/wt-suite-$label"
    start=$(date -u +%H:%M:%S)
    (cd "$wt" && PATH="$wt/.venv/bin:$PATH" PYTHONPATH="$wt" RAY_AUTH_MODE=disabled \
        .venv/bin/python -m pytest -q -p no:cacheprovider --durations=0 > "$out/$label-$start.txt" 2>&1) || true
    echo "$label $(git -C "$wt" rev-parse --short HEAD) $start-$(date -u +%H:%M:%S) $(tail -1 "$out/$label-$start.txt")" | tee -a "$out/times.txt"
done
