#!/usr/bin/env bash
# Set up .venv and run the default job: LoRA on SmolLM2-135M-Instruct with the embedded Lumen dataset.
# Extra arguments go to `fasttune train` (e.g. --max_steps 20). The run is written to runs/default/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh plot
exec .venv/bin/fasttune train "$@"
