#!/usr/bin/env bash
# Unpack the fasttune source of another commit into a folder, for an A/B run that compares two git trees
# (gpu_run.sh's `ab` suite puts that folder's src/ first on PYTHONPATH in its own process).
#
#   benchmarks/unpack_tree.sh REV [DEST]     # DEST defaults to .bench_assets/base_tree
#
# REV is anything git names (a commit, a branch, main~3). DEST/src is the commit's src/, DEST/REV its
# short hash, which labels that tree's rows. Run from the repository root, then carry .bench_assets.
set -euo pipefail
rev=${1:?usage: benchmarks/unpack_tree.sh REV [DEST]}
dest=${2:-.bench_assets/base_tree}
commit=$(git rev-parse --verify --short "$rev^{commit}")
rm -rf "$dest"
mkdir -p "$dest"
git archive "$commit" src | tar -x -C "$dest"
echo "$commit" > "$dest/REV"
echo "unpacked $rev ($commit) into $dest"
