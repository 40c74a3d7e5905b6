#!/usr/bin/env bash
# Download the wheels the GPU benchmarks need into .whl/ (git-ignored), for a GPU machine that reaches no
# package registry. That machine is assumed to have Python 3.12 with torch, triton, transformers, peft,
# accelerate, safetensors, tokenizers, numpy and pyarrow; this adds what it lacks. Run from the repository
# root on a machine with network, then carry .whl and start the GPU command with the line printed at the end
# (gpu_run.sh runs that line itself).
#
#   benchmarks/wheelhouse.sh [--peers] [--serve] [NAME==VERSION ...]
#
# Always: bitsandbytes (QLoRA and AdamW 8-bit; only its CUDA 13 libraries kept) and gguf (fasttune imports it).
# --peers: the stacks fasttune is compared with: Liger Kernel, and Unsloth with what it imports (unsloth
# without its web app, unsloth_zoo, trl, datasets, torchao, cut_cross_entropy, small pure-Python packages).
# --serve: what bench_serve.py needs besides (the server's starlette and uvicorn, the openai client).
# Base alone is ~7 MB, with --peers ~22 MB; a device call carries at most 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEELHOUSE:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"
base=(bitsandbytes==0.50.2 gguf==0.19.0)
peers=(liger-kernel==0.8.5 unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5
       torchao==0.18.0 cut-cross-entropy==25.1.1 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19
       tyro==1.0.17 docstring-parser==0.18.0 shtab==1.13.0 typeguard==4.6.1 msgspec==0.22.0
       structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0 pydantic==2.14.4 pydantic-core==2.50.5
       annotated-types==0.8.0 typing-inspection==0.4.5)
serve=(starlette==1.10.0 uvicorn==0.54.0 click==8.5.1 h11==0.16.0 anyio==4.16.0 idna==3.21 sniffio==1.3.1
       openai==3.51.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 jiter==0.19.0 pydantic==2.14.4
       pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
want=("${base[@]}")
for a in "$@"; do
  case "$a" in
    --peers) want+=("${peers[@]}") ;;
    --serve) want+=("${serve[@]}") ;;
    *) want+=("$a") ;;
  esac
done
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  plat+=(--platform "${p}_x86_64")
done
for w in "${want[@]}"; do  # wheels for the GPU machine's CPython 3.12 on x86-64 Linux, without dependencies
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$dest" "$w" 2>&1 | grep -v '^WARNING: Location' || true
  name=${w%%==*}
  compgen -G "$dest/${name//-/_}-*.whl" >/dev/null || { echo "wheelhouse: $w was not downloaded" >&2; exit 1; }
done
slim() {  # slim WHEEL GLOB...: delete matching members from a wheel in place (keeps the carried tree small)
  "$python" - "$@" <<'PY'
import fnmatch, os, sys, zipfile
whl, pats = sys.argv[1], sys.argv[2:]
tmp = whl + ".tmp"
with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not any(fnmatch.fnmatch(item.filename, p) for p in pats):
            zout.writestr(item, zin.read(item.filename))
os.replace(tmp, whl)
PY
}
for w in "$dest"/bitsandbytes-*.whl; do
  [ -f "$w" ] && slim "$w" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' \
    'bitsandbytes/libbitsandbytes_xpu*.so'
done
for w in "$dest"/unsloth-20*.whl; do
  [ -f "$w" ] && slim "$w" 'studio/*'
done
du -sh "$dest"
echo "On the GPU machine (carry $dest), begin the command with:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $dest/*.whl && export PYTHONPATH=/tmp/site:\$PWD/src"
