#!/usr/bin/env bash
# Install the real llama.cpp for the export tests and `fasttune export ... --check`: the npm package
# node-llama-cpp (pinned) with its prebuilt CPU library for this platform, into .llamacpp/ (git-ignored).
# No compiler and no download at install time: --ignore-scripts skips the package's postinstall (which
# would look for a GPU build), and only this platform's prebuilt package is installed, not all of them.
# Needs Node >= 20 and npm; without them it says so and exits 0 (the llama.cpp tests then skip, unless
# FASTTUNE_REQUIRE_LLAMACPP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.21.1
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "==> node/npm not found: skipping node-llama-cpp (the llama.cpp export tests will skip)"
  exit 0
fi
platform=$(node -p 'process.platform === "darwin" ? "mac" : process.platform === "win32" ? "win" : process.platform')
arch=$(node -p 'process.arch')
if [ -f .llamacpp/node_modules/node-llama-cpp/package.json ] &&
   [ "$(node -p 'require("./.llamacpp/node_modules/node-llama-cpp/package.json").version')" = "$version" ]; then
  exit 0
fi
echo "==> installing node-llama-cpp@$version (@node-llama-cpp/$platform-$arch, prebuilt CPU llama.cpp) into .llamacpp/"
mkdir -p .llamacpp
[ -f .llamacpp/package.json ] || echo '{"private": true}' > .llamacpp/package.json
npm install --prefix .llamacpp --no-audit --no-fund --ignore-scripts --omit=optional --loglevel=error \
  "node-llama-cpp@$version" "@node-llama-cpp/$platform-$arch@$version" >/dev/null
