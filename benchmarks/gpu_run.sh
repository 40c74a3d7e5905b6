#!/usr/bin/env bash
# Rerun the GPU tables of benchmarks/RESULTS.md on one CUDA machine (see benchmarks/README.md).
#
#   bash benchmarks/gpu_run.sh SUITE[,SUITE...]          a whole suite, or one part of it: SUITE/PART
#
# suite     parts                                   the RESULTS.md table it reproduces
# tests     kernels, rest                           (the GPU tiers of the test suite, `-m gpu`)
# headline  bf16, qlora, hf, liger                  Llama-3.1-8B, 8 x 2048, beside the peers
# batch2    llama31, llama2, profile                batch 2 x 2048; profile: one step of each stack (QLoRA,
#                                                   bf16) under the torch profiler and under cProfile
# long      32k, 131k, 262k, 262k-unsloth,          long context, QLoRA, batch 1
#           327k-unsloth, l2-32k, l2-131k
# shapes    qwen, mistral, llama32, llama2,         other shapes and families; packed rows
#           small, packed
# fp8       tests, speed, loss                      FP8 frozen base: its GPU tests; 8 x 2048 beside Unsloth's
#                                                   bf16; loss over 200 steps against bf16 (within 1%)
# decode    (one)                                   decoding at batch 1
# serve     (one)                                   fasttune serve at 1/8/32/64 clients beside transformers'
#                                                   batched generate (wheels: wheelhouse.sh --serve)
# uneven    M-bB, M-bB-grouped, M-bB-packed         uneven instruction rows: real tokens/s over the notebook's
#           (M: bf16, qlora; B: 2, 8), notebook     480 rows, packing off (plain or length-grouped) and on,
#                                                   beside Unsloth and HF + PEFT, one part a call; notebook:
#                                                   QLoRA b2 unpacked beside Unsloth, a profile of one step each
# checks    loss, cli, notebook                     loss curves; `fasttune train` and the notebook on 8B
#                                                   (notebook: both stacks at its own settings, curves)
# ab        8k, 32k, b2, thin                       this tree against .bench_assets/base_tree
#                                                   (benchmarks/unpack_tree.sh REV); thin: batch 2 at
#                                                   llama-3.1-8b-thin, where a step is the host's time
# pref      (one)                                   DPO tokens/s (2 pairs of 512 + 512 tokens) and GRPO sampling
#                                                   samples/s (G = 8, 256 new tokens) beside TRL + PEFT and Unsloth
# dist      bf16, qlora, overhead, 70b              torchrun on the machine's GPUs (bench_dist.py): Llama-3.1-8B
#                                                   8 x 2048 per GPU on 1, 2, 4 GPUs; one process against
#                                                   torchrun at world size 1; 70B-shaped QLoRA, FSDP2, 2 GPUs
#
# Each part runs under its own time limit; none starts after DEADLINE seconds (default 560, for a machine
# lent 10 minutes a command: a suite whose parts need longer runs as several calls, one part each, or with
# a larger DEADLINE). Logs and results.jsonl go to bench_logs/, copied to $OUT (default /tmp/out); the last
# lines printed are the table. Wheels in .whl/ (benchmarks/wheelhouse.sh) are installed into /tmp/site
# first; the tokenizer comes from .bench_assets/tokenizer (benchmarks/make_assets.py). Random-weight model
# directories are written once per machine under /tmp.
set -u
cd "$(dirname "$0")/.."
declare -A PARTS=([tests]="kernels rest" [headline]="bf16 qlora hf liger" [batch2]="llama31 llama2 profile" \
  [long]="32k 131k 262k 262k-unsloth 327k-unsloth l2-32k l2-131k" \
  [shapes]="qwen mistral llama32 llama2 small packed" [fp8]="tests speed loss" [decode]="" [serve]="" \
  [uneven]="bf16-b2 bf16-b8 qlora-b2 qlora-b8 bf16-b2-grouped bf16-b8-grouped qlora-b2-grouped qlora-b8-grouped \
bf16-b2-packed bf16-b8-packed qlora-b2-packed qlora-b8-packed notebook" \
  [pref]="" [checks]="loss cli notebook" [ab]="8k 32k b2 thin" \
  [dist]="bf16 qlora overhead 70b")
usage="usage: bash benchmarks/gpu_run.sh SUITE[/PART][,...]; suites: tests headline batch2 long shapes fp8 decode serve uneven pref checks ab dist"
STEPS=${1:-}
[ -n "$STEPS" ] || { echo "$usage" >&2; exit 2; }
for s in ${STEPS//,/ }; do
  suite=${s%%/*}
  if [ -z "${PARTS[$suite]+set}" ]; then echo "gpu_run.sh: unknown suite '$suite'; $usage" >&2; exit 2; fi
  if [[ $s == */* && " ${PARTS[$suite]} " != *" ${s#*/} "* ]]; then
    echo "gpu_run.sh: suite '$suite' has no part '${s#*/}' (parts: ${PARTS[$suite]:-none})" >&2; exit 2
  fi
done
has() {  # has SUITE PART: the suite or this part of it was asked for
  [[ ",$STEPS," == *",$1,"* || ",$STEPS," == *",$1/${2-},"* ]]
}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" bench_logs
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  UNSLOTH_DISABLE_STATISTICS=1 DO_NOT_TRACK=1
export PYTHONPATH=$PWD/src
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
TOKENIZER=.bench_assets/tokenizer
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
  echo "gpu_run.sh: $TOKENIZER is missing: run python benchmarks/make_assets.py and carry .bench_assets" >&2
  exit 2
fi
BASE_TREE=.bench_assets/base_tree
if has ab 8k || has ab 32k || has ab b2 || has ab thin; then
  if [ ! -d "$BASE_TREE/src/fasttune" ]; then
    echo "gpu_run.sh: $BASE_TREE/src is missing: run benchmarks/unpack_tree.sh REV and carry .bench_assets" >&2
    exit 2
  fi
  # the other tree's own bench_train.py with its src/ on PYTHONPATH; its rows are labelled @REV
  BASE="env BENCH_TREE=$(cat $BASE_TREE/REV) PYTHONPATH=${PYTHONPATH%"$PWD/src"}$PWD/$BASE_TREE/src python3 \
$BASE_TREE/benchmarks/bench_train.py --out bench_logs/results.jsonl --log-dir bench_logs/base --tokenizer $TOKENIZER"
fi

left() { echo $((DEADLINE - ($(date +%s) - START))); }
step() {  # step NAME LIMIT CMD...: run CMD under min(LIMIT, time left) if at least 20 s are left
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 20 ]; then echo "=== $name: SKIPPED (deadline)"; return; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "=== $name (limit ${limit}s, t=$(( $(date +%s) - START ))s)"
  timeout "$limit" "$@" > "bench_logs/$name.log" 2>&1
  echo "=== $name rc=$? ($(( $(date +%s) - START ))s)"
  tail -n 25 "bench_logs/$name.log"
}
# python3 -c "$MODEL_DIR" SHAPE DIR: a random-weight directory of SHAPE for the tools that load one
MODEL_DIR="import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench_train import \
write_model_dir; write_model_dir(sys.argv[1], Path(sys.argv[2]), Path('$TOKENIZER'))"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
git rev-parse --short HEAD 2>/dev/null || echo "source tree: not a git checkout"

B="python3 benchmarks/bench_train.py --out bench_logs/results.jsonl --log-dir bench_logs --tokenizer $TOKENIZER"
L2="--shape llama-2-7b --model-dir /tmp/bench-model-l2"
ONE="--modes qlora --batches 1 --warmup 1"
PYTEST="python3 -m pytest -q -m gpu -p no:cacheprovider"

has tests kernels && step pytest-kernels 300 $PYTEST tests/kernels
has tests rest && step pytest-rest 300 $PYTEST tests --ignore=tests/kernels

# headline: budget:G is `selective` within G GiB, the peak of transformers + PEFT in the same table
has headline bf16 && step headline-bf16 300 $B --stacks fasttune unsloth --modes bf16 --batches 8 \
  --variants offload budget:43.1
has headline qlora && step headline-qlora 300 $B --stacks fasttune unsloth --modes qlora --batches 8 \
  --variants offload budget:33.5
has headline hf && step headline-hf 480 $B --stacks fasttune hf --modes bf16 qlora --batches 8
has headline liger && step headline-liger 400 $B --stacks fasttune liger --modes bf16 qlora --batches 8

# fasttune as `fasttune train` runs a micro-batch of this size (captured as a CUDA graph), and eagerly
has batch2 llama31 && step batch2 480 $B --stacks fasttune unsloth hf --modes bf16 qlora --batches 2 \
  --variants offload+graph offload
has batch2 profile && step batch2-profile 300 $B --stacks fasttune unsloth --modes qlora bf16 --batches 2 \
  --steps 2 --warmup 2 --profile 1
has batch2 llama2 && step batch2-llama2 420 $B $L2 --stacks fasttune unsloth --modes bf16 qlora --batches 2

has long 32k && step long-32k 330 $B --stacks fasttune unsloth $ONE --seqs 32768 --steps 2
has long 131k && step long-131k 560 $B --stacks fasttune unsloth $ONE --seqs 131072 --steps 1
# one step without warm-up: at these lengths a step takes minutes
has long 262k && step long-262k 560 $B --stacks fasttune --modes qlora --batches 1 --seqs 262144 --warmup 0 \
  --steps 1 --timeout 540
has long 262k-unsloth && step long-262k-unsloth 560 $B --stacks unsloth --modes qlora --batches 1 --seqs 262144 \
  --warmup 0 --steps 1 --timeout 540
has long 327k-unsloth && step long-327k-unsloth 560 $B --stacks unsloth --modes qlora --batches 1 --seqs 327680 \
  --warmup 0 --steps 1 --timeout 540
has long l2-32k && step long-l2-32k 400 $B $L2 --stacks fasttune unsloth $ONE --seqs 32768 --steps 2
has long l2-131k && step long-l2-131k 560 $B $L2 --stacks fasttune unsloth $ONE --seqs 131072 --steps 1

has shapes qwen && step shapes-qwen 300 $B --shape qwen2.5-7b --model-dir /tmp/bench-model-qwen \
  --stacks fasttune unsloth --modes bf16 --batches 8
has shapes mistral && step shapes-mistral 300 $B --shape mistral-7b --model-dir /tmp/bench-model-mistral \
  --stacks fasttune unsloth --modes qlora --batches 8
has shapes llama32 && step shapes-llama32 240 $B --shape llama-3.2-3b --model-dir /tmp/bench-model-l32 \
  --stacks fasttune unsloth --modes bf16 --batches 4 --seqs 3001
has shapes llama2 && step shapes-llama2 540 $B $L2 --stacks fasttune unsloth hf --modes bf16 qlora --batches 8
# GPT-2 and OPT train through fasttune's generic path; Unsloth and Liger have no path for them
if has shapes small; then
  step shapes-gpt2 150 $B --shape gpt2-124m --model-dir /tmp/bench-model-gpt2 --seq 1024 --batches 8 --modes bf16 \
    --stacks fasttune hf --variants on off
  step shapes-opt 150 $B --shape opt-350m --model-dir /tmp/bench-model-opt --seq 2048 --batches 8 --modes bf16 \
    --stacks fasttune hf --variants on off
fi
# packN: N rows of equal length per sequence, attention kept inside each row
if has shapes packed; then
  step packed-8 300 $B --stacks fasttune --modes bf16 qlora --batches 8 --variants offload offload+pack4
  step packed-32k 200 $B --stacks fasttune $ONE --seqs 32768 --steps 2 --variants offload+pack8
fi

if has fp8 tests; then  # the FP8 products on the tensor cores against their references
  step fp8-tests-kernels 240 $PYTEST tests/kernels/test_fp8.py tests/kernels/test_lora_fp8.py
  step fp8-tests-model 120 $PYTEST tests/models/test_fp8_base.py
fi
if has fp8 speed; then
  step fp8-bf16 300 $B --stacks fasttune unsloth --modes bf16 --batches 8
  step fp8 120 $B --stacks fasttune --modes fp8 --batches 8
fi
# the loss: the SmolLM2-135M shape (random weights: the real ones stay off the GPU machine), bf16 reference,
# bf16 fast path and FP8 base, 200 steps, within 1% of the reference
has fp8 loss && step fp8-loss 400 python3 benchmarks/loss_curve.py --fp8 --runs fast fp8 --steps 200 --tol 0.01 \
  --tokenizer $TOKENIZER --out bench_logs/loss_curves_fp8.json

has decode && step decode 300 python3 benchmarks/bench_decode.py --out bench_logs/decode.jsonl
has serve && step serve 500 python3 benchmarks/bench_serve.py --out bench_logs/serve.jsonl
# dist: as many GPUs as the machine has, up to 4 (the worlds past that are left out)
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
WORLDS=$(for w in 1 2 4; do [ "$w" -le "$GPUS" ] && printf '%s ' "$w"; done)
has dist bf16 && step dist-bf16 560 python3 benchmarks/bench_dist.py --suite scaling --modes bf16 \
  --worlds $WORLDS --out bench_logs/dist.jsonl
has dist qlora && step dist-qlora 560 python3 benchmarks/bench_dist.py --suite scaling --modes qlora \
  --worlds $WORLDS --out bench_logs/dist.jsonl
has dist overhead && step dist-overhead 400 python3 benchmarks/bench_dist.py --suite overhead \
  --out bench_logs/dist.jsonl
has dist 70b && step dist-70b 560 python3 benchmarks/bench_dist.py --suite 70b --out bench_logs/dist.jsonl

# uneven: rows of about 50 to 1,500 tokens (instruction_data.py); timed over the micro-batches holding the
# notebook's 480 rows (60 steps x batch 2 x accumulation 4) after 3 of warm-up; each part runs the three
# stacks, each process loading the 8B model (a part takes 4 to 9 minutes: one part a call)
U="python3 benchmarks/bench_uneven.py --rows-timed 480 --warmup 3 --tokenizer $TOKENIZER \
--out bench_logs/uneven.jsonl --log-dir bench_logs"
PLAIN="--packings off --groupings off" GROUPED="--packings off --groupings on" PACKED="--packings on --groupings off"
has uneven bf16-b2 && step uneven-bf16-b2 560 $U --modes bf16 --batches 2 $PLAIN
has uneven bf16-b8 && step uneven-bf16-b8 560 $U --modes bf16 --batches 8 $PLAIN
has uneven qlora-b2 && step uneven-qlora-b2 560 $U --modes qlora --batches 2 $PLAIN
has uneven qlora-b8 && step uneven-qlora-b8 560 $U --modes qlora --batches 8 $PLAIN
has uneven bf16-b2-grouped && step uneven-bf16-b2-grouped 560 $U --modes bf16 --batches 2 $GROUPED
has uneven bf16-b8-grouped && step uneven-bf16-b8-grouped 560 $U --modes bf16 --batches 8 $GROUPED
has uneven qlora-b2-grouped && step uneven-qlora-b2-grouped 560 $U --modes qlora --batches 2 $GROUPED
has uneven qlora-b8-grouped && step uneven-qlora-b8-grouped 560 $U --modes qlora --batches 8 $GROUPED
has uneven bf16-b2-packed && step uneven-bf16-b2-packed 560 $U --modes bf16 --batches 2 $PACKED
has uneven bf16-b8-packed && step uneven-bf16-b8-packed 560 $U --modes bf16 --batches 8 $PACKED
has uneven qlora-b2-packed && step uneven-qlora-b2-packed 560 $U --modes qlora --batches 2 $PACKED
has uneven qlora-b8-packed && step uneven-qlora-b8-packed 560 $U --modes qlora --batches 8 $PACKED
has uneven notebook && step uneven-notebook 300 $U --modes qlora --batches 2 --packings off --groupings off \
  --stacks fasttune unsloth --profile

# pref: three processes (fasttune, TRL + PEFT, Unsloth), each loading the 8B model once for both measures
has pref && step pref 560 python3 benchmarks/bench_pref.py --stacks fasttune trl unsloth --timeout 240 \
  --tokenizer $TOKENIZER --out bench_logs/pref.jsonl --log-dir bench_logs

has checks loss && step loss-curve 200 python3 benchmarks/loss_curve.py --steps 50 --tokenizer $TOKENIZER \
  --out bench_logs/loss_curves.json
if has checks cli || has checks notebook; then
  [ -f /tmp/bench-model/config.json ] || step model-dir-8b 200 python3 -c "$MODEL_DIR" llama-3.1-8b /tmp/bench-model
fi
if has checks cli; then  # 'auto' checkpointing and the printed estimate on the 8B shape, the embedded data packed
  for q in "" --load_in_4bit; do
    step "cli-8b${q:+-qlora}" 200 python3 -m fasttune train --model_name /tmp/bench-model --max_seq_length 2048 \
      --per_device_train_batch_size 8 --max_steps 3 --optim adamw_8bit --eval_answers 0 --eval_steps 100 \
      --logging_steps 1 --show_samples 0 $q --output_dir "/tmp/run-8b$q"
  done
fi
# the notebook as written (Unsloth) and with fasttune's imports, 60 steps each: per-step loss and tokens
has checks notebook && step notebook 560 python3 benchmarks/notebook_gpu.py --model-dir /tmp/bench-model \
  --tokenizer $TOKENIZER --out bench_logs/notebook_curves.json --plot bench_logs/notebook_curves.png

# ab: the tree in .bench_assets/base_tree and this one, each measured by its own bench_train.py, in turns
# within one call; Unsloth beside this tree for the ratio
for mode in bf16 qlora; do
  has ab 8k && step "ab-$mode-base" 150 $BASE --stacks fasttune --modes $mode --batches 8
  has ab 8k && step "ab-$mode" 300 $B --stacks fasttune unsloth --modes $mode --batches 8
done
for mode in bf16 qlora; do
  has ab b2 && step "ab-b2-$mode-base" 150 $BASE --stacks fasttune --modes $mode --batches 2
  has ab b2 && step "ab-b2-$mode" 240 $B --stacks fasttune unsloth --modes $mode --batches 2
done
# the host's share: both trees twice each, alternating, at a width whose GPU work is a few milliseconds
for turn in 1 2; do
  has ab thin && step "ab-thin-base-$turn" 120 $BASE --shape llama-3.1-8b-thin --stacks fasttune \
    --modes bf16 qlora --batches 2 --steps 8
  has ab thin && step "ab-thin-$turn" 120 $B --shape llama-3.1-8b-thin --stacks fasttune --modes bf16 qlora \
    --batches 2 --steps 8
done
has ab 32k && step ab-32k-base 160 $BASE --stacks fasttune $ONE --seqs 32768 --steps 2
has ab 32k && step ab-32k 330 $B --stacks fasttune unsloth $ONE --seqs 32768 --steps 2

echo "=== total $(( $(date +%s) - START ))s"
tar czf "$OUT/bench_logs.tgz" bench_logs
for f in results.jsonl decode.jsonl serve.jsonl dist.jsonl pref.jsonl uneven.jsonl notebook_curves.json \
  notebook_curves.png loss_curves.json loss_curves_fp8.json; do
  [ -f "bench_logs/$f" ] && cp "bench_logs/$f" "$OUT/"
done
python3 - <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from bench_train import print_table
try:
    rows = [json.loads(l) for l in open("bench_logs/results.jsonl")]
except FileNotFoundError:
    rows = []
print_table(rows)
EOF
