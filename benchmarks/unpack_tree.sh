#!/usr/bin/env bash
# Unpack another commit's src/ and benchmarks/ into a folder, for an A/B run that compares two git trees
# (gpu_run.sh's `ab` suite runs that tree's bench_train.py with its src/ on PYTHONPATH, in processes of its own).
#
#   benchmarks/unpack_tree.sh REV [DEST]     # DEST defaults to .bench_assets/base_tree
#
# REV is anything git names (a commit, a branch, main~3). DEST/REV holds its short hash, which labels that
# tree's rows. Run from the repository root, then carry .bench_assets.
set -euo pipefail
rev=${1:?usage: benchmarks/unpack_tree.sh REV [DEST]}
dest=${2:-.bench_assets/base_tree}
commit=$(git rev-parse --verify --short "$rev^{commit}")
rm -rf "$dest"
mkdir -p "$dest"
git archive "$commit" src benchmarks | tar -x -C "$dest"
echo "$commit" > "$dest/REV"
echo "unpacked $rev ($commit) into $dest"
