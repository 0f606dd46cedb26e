#!/usr/bin/env bash
# The host time of a CUDA training step at several git revisions, measured in turn.
#
#   scripts/host-time-compare.sh REV [REV ...]     # e.g. HEAD~3 HEAD
#   MODEL=alexnet BATCH=128 STEPS=1000 ROUNDS=4 scripts/host-time-compare.sh main my-branch
#
# Each round runs scripts/host-time.sh (over the fake GPU, see there) once per revision, from
# a git worktree of it under $BUILD/worktrees, so a swing in the machine's speed hits every
# revision alike; it prints each run, then each revision's minimum and median ms/step.
# The revisions need scripts/host-time.sh (commit c189a50 and later).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/host-time-compare.sh REV [REV ...]" >&2; exit 2; }
export BUILD=${BUILD:-$PWD/.host-time}
MODEL=${MODEL:-alexnet-owt} BATCH=${BATCH:-8} STEPS=${STEPS:-2000} ROUNDS=${ROUNDS:-5}
mkdir -p "$BUILD/worktrees"
declare -A tree
for rev in "$@"; do
    sha=$(git rev-parse --verify --short "$rev^{commit}" 2>/dev/null) || { echo "host-time-compare: no revision $rev" >&2; exit 2; }
    tree[$rev]=$BUILD/worktrees/$sha
    [ -d "${tree[$rev]}" ] || git worktree add -q --detach "${tree[$rev]}" "$sha"
    [ -x "${tree[$rev]}/scripts/host-time.sh" ] || { echo "host-time-compare: $rev has no scripts/host-time.sh" >&2; exit 2; }
done
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq "$ROUNDS"); do
    for rev in "$@"; do
        ms=$("${tree[$rev]}/scripts/host-time.sh" --model "$MODEL" --batch "$BATCH" --steps "$STEPS" 2>/dev/null \
             | awk '/^mpiconvnet cuda/ {print $3}')
        [ -n "$ms" ] || { echo "host-time-compare: $rev did not run; try ${tree[$rev]}/scripts/host-time.sh" >&2; exit 1; }
        echo "round $round  $rev  $ms ms/step"
        echo "$rev $ms" >> "$results"
    done
done
echo "$MODEL, batch $BATCH, $ROUNDS rounds of $STEPS steps: ms/step per revision, min / median"
python3 - "$results" "$@" <<'EOF'
import statistics
import sys

runs = {}
for line in open(sys.argv[1]):
    rev, ms = line.split()
    runs.setdefault(rev, []).append(float(ms))
for rev in sys.argv[2:]:
    print(f"  {rev:<20} {min(runs[rev]):.2f} / {statistics.median(runs[rev]):.2f}")
EOF
