#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (slow tests included), then the fast tests
# again without the POSIX-only modules (resource, fcntl, os.sysconf), as on Windows.
# The Triton kernel tests run in their own pytest process under TRITON_INTERPRET=1 (Triton picks
# interpreter or compiler when a kernel module is imported, so it cannot be switched per test).
# Extra arguments go to every pytest run (e.g. -x, -k NAME, -m "not slow").
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

echo "==> fast tests without resource, fcntl and os.sysconf (as on Windows)"
# tests/without_posix.py masks them before fasttune is imported, so an import or call of them in fasttune's
# own code fails here. Left out: tests/kernels (Triton kernels for the GPU, run under TRITON_INTERPRET=1 in
# their own process above; tests/test_imports.py imports every kernel module here) and the slow tests.
# Tests that need a real file lock are marked `posix` and skipped in this pass. Extra arguments come before
# -m "not slow", so the pass stays the fast set whatever they select.
masked=0
PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -p without_posix tests --ignore=tests/kernels \
  -q "$@" -m "not slow" || masked=$?
if [ "$masked" -ne 0 ]; then status=$masked; fi

if [ "$status" -ne 0 ]; then
  echo "==> FAILED (exit $status)"
fi
exit "$status"
