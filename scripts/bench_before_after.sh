#!/usr/bin/env bash
# `spearfl bench` of one config from a checkout of REF (before), then from this working tree (after), one after the
# other on this machine, so their ratios compare like with like.
#   scripts/bench_before_after.sh REF CONFIG.yaml OUTPUT_DIR [bench options...]
# Writes OUTPUT_DIR/before.json and OUTPUT_DIR/after.json (and each run's tables in before.txt / after.txt).
set -euo pipefail
ref=$1; config=$(realpath "$2"); out=$(realpath -m "$3"); shift 3
root=$(git rev-parse --show-toplevel)
python=${PYTHON:-$root/.venv/bin/python}
tree=$(mktemp -d)/before
git -C "$root" worktree add --detach "$tree" "$ref" >/dev/null
trap 'git -C "$root" worktree remove --force "$tree"' EXIT
mkdir -p "$out"
(cd "$tree" && PYTHONPATH="$tree" "$python" -m spearfl bench "$config" "$@" --output "$out/before.json" | tee "$out/before.txt")
(cd "$root" && PYTHONPATH="$root" "$python" -m spearfl bench "$config" "$@" --output "$out/after.json" | tee "$out/after.txt")
