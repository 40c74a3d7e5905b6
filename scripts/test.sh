#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (slow tests included).
# The Triton kernel tests run in their own pytest process under TRITON_INTERPRET=1 (Triton picks
# interpreter or compiler when a kernel module is imported, so it cannot be switched per test).
# Extra arguments go to both pytest runs (e.g. -x, -k NAME, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
py=.venv/bin/python
# Where node is installed, setup.sh has installed llama.cpp: its export tests must run, not skip.
if command -v node >/dev/null; then export FASTTUNE_REQUIRE_LLAMACPP=1; fi
status=0

echo "==> kernel tests (TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 "$py" -m pytest tests/kernels -q "$@" || status=$?

echo "==> all other tests"
rest=0
"$py" -m pytest tests --ignore=tests/kernels -q "$@" || rest=$?
# pytest's 5 means "no test ran": a failure here too, never a silent pass
if [ "$rest" -ne 0 ]; then status=$rest; fi

if [ "$status" -ne 0 ]; then
  echo "==> FAILED (exit $status)"
fi
exit "$status"
