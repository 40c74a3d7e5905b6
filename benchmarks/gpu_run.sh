#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, then run the steps named in $1
# (comma-separated: tests, mtest, prof, ab8, abq8, ab8v, abq8v, ab32, b8r, q8r, q32r, gu32, es32, es8, auto32, resv8, gtest, lag32, lag8, lagq8, b8, q8, q32, prof32, kmain, rank, nf4, swtest, swfeat, qkvtest, qkv8, qkvq, qkvq32, gu8, pktest, pack8, packq, swltest, swmicro, ktest, katest, kattn, kattn32, shapes, qwen, mistral, l32odd, micro, loss, fast, gu,
# gulong, peers, hfbf16,
# fp8, cli8b, peers2, liger-qlora, l2-8, small, long32, long128,
# long131, hostres, long262, u327, pin32, maxlen, cli8bq, decode), each under its own timeout, logs to $OUT. One model directory per shape under /tmp, written
# once per machine by the first step that needs it (Llama-3.1-8B /tmp/bench-model, Llama-2-7B /tmp/bench-model-l2).
#   carry: .whl .bench_assets        usage: bash benchmarks/gpu_run.sh tests,micro,fast
set -u
STEPS=${1:-tests,micro,fast}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" bench_logs
START=$(date +%s)
DEADLINE=${DEADLINE:-560}  # seconds from START after which no step starts
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
left() { echo $((DEADLINE - ($(date +%s) - START))); }
step() {  # step NAME TIMEOUT CMD...: run CMD if its time fits before the deadline
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 20 ]; then echo "=== $name: SKIPPED (deadline)"; return; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "=== $name (limit ${limit}s, t=$(( $(date +%s) - START ))s)"
  timeout "$limit" "$@" > "bench_logs/$name.log" 2>&1
  echo "=== $name rc=$? ($(( $(date +%s) - START ))s)"
  tail -n 25 "bench_logs/$name.log"
}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"

B="python3 benchmarks/bench_train.py --out bench_logs/results.jsonl --log-dir bench_logs"
if has tests; then
  step pytest-kernels 150 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider
fi
if has tests || has mtest; then
  step pytest-models 120 python3 -m pytest -q -m gpu tests/models tests/lora -p no:cacheprovider
fi
if has prof; then  # one profiled fasttune step each (GPU-busy share in the table's head line), after a warm-up
  step prof-32k 200 $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 --steps 2 --profile 1 \
    --variants offload
  step prof-bf16-8 150 $B --stacks fasttune --modes bf16 --batches 8 --profile 1 --variants offload
fi
# A/B against another source tree, unpacked by the caller into .bench_assets/base_tree (carried), e.g.
#   git archive <commit> src | tar -x -C .bench_assets/base_tree; its rows are labelled @$BASE_NAME.
BASE="env BENCH_TREE=${BASE_NAME:-base} PYTHONPATH=/tmp/site:$PWD/.bench_assets/base_tree/src"
if has ab8; then
  step ab8-base 150 $BASE $B --stacks fasttune --modes bf16 --batches 8 --variants offload
  step ab8-new 260 $B --stacks fasttune unsloth --modes bf16 --batches 8 --variants offload --profile 1
fi
if has ab32; then
  step ab32-base 160 $BASE $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 --steps 2 \
    --variants offload
  step ab32-new 320 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 --warmup 1 --steps 2 \
    --variants offload
fi
if has abq8; then  # QLoRA 8 x 2048 against the other tree, and Unsloth
  step abq8-base 150 $BASE $B --stacks fasttune --modes qlora --batches 8 --variants offload
  step abq8-new 260 $B --stacks fasttune unsloth --modes qlora --batches 8 --variants offload --profile 1
fi
# ab8v / abq8v: as ab8 / abq8 without the profile, the new tree's process also timing it with one of
# `kernels.lora`'s switches off per variant (bench_train.py: norank, nowanth, nokeepgu)
if has ab8v; then
  step ab8v-base 150 $BASE $B --stacks fasttune --modes bf16 --batches 8 --variants offload
  step ab8v-new 260 $B --stacks fasttune unsloth --modes bf16 --batches 8 --variants offload offload+norank \
    offload+nowanth
fi
if has abq8v; then
  step abq8v-base 150 $BASE $B --stacks fasttune --modes qlora --batches 8 --variants offload
  step abq8v-new 280 $B --stacks fasttune unsloth --modes qlora --batches 8 --variants offload offload+norank \
    offload+nowanth offload+nokeepgu
fi
# b8r / q8r / q32r: gate/up of the last 2 / 1 / 0 layers held on the device (device_gate_up), beside Unsloth
has b8r && step bf16-8-res 270 $B --stacks fasttune unsloth --modes bf16 --batches 8 --variants offload \
  offload+dgu2 offload+dgu0
has q8r && step qlora-8-res 270 $B --stacks fasttune unsloth --modes qlora --batches 8 --variants offload \
  offload+dgu2 offload+dgu0
has q32r && step qlora-32k-res 320 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload offload+dgu2 offload+dgu0
# gu32: at 1 x 32,768 the host link has room beside the forward's copies (call 3's profile: ~21 ms of
# copies a layer against ~40 ms of compute), so a share of the layers may send gate/up to the host; the
# host rule (40% of host memory, `activations.host_fits`) caps the share, and est GiB shows whether any did
has gu32 && step qlora-32k-gu 330 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload offload+gu0.12 offload+gu0.19 offload+gu0.25
# es32 / es8: the caching allocator with expandable segments (as Unsloth sets for itself) against without
ES="env PYTORCH_ALLOC_CONF=expandable_segments:True"
has es32 && step qlora-32k-es 200 $ES $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --variants offload offload+gu0.19
has es32 && step qlora-32k-noes 330 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload offload+gu0.19
has es8 && step qlora-8-es 150 $ES $B --stacks fasttune --modes qlora --batches 8 --variants offload
has es8 && step qlora-8-noes 150 $B --stacks fasttune --modes qlora --batches 8 --variants offload
# auto32: host_gate_up 'auto' (6 of 32 layers at 1 x 32,768) against the tree in .bench_assets/base_tree (0),
# gu0 isolating it, beside Unsloth; resv8: QLoRA 8 x 2048 reserved memory (one side stream) against that tree
has auto32 && step auto32-base 160 $BASE $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload
has auto32 && step auto32-new 330 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload offload+gu0
has resv8 && step resv8-base 100 $BASE $B --stacks fasttune --modes qlora --batches 8 --variants offload
has resv8 && step resv8-new 100 $B --stacks fasttune --modes qlora --batches 8 --variants offload
# gtest: the GPU tests of the offloading path; the reserved-memory test also against the base tree's source
has gtest && step pytest-offload 150 python3 -m pytest -q -m gpu tests/models/test_llama.py \
  tests/models/test_memory.py tests/models/test_kept_attention.py -p no:cacheprovider
has gtest && step pytest-reserved-base 60 env PYTHONPATH=/tmp/site:$PWD/.bench_assets/base_tree/src python3 -m \
  pytest -q -m gpu tests/models/test_llama.py -k reserve_no_more -p no:cacheprovider
# lag32 / lag8: offloaded tensors held for their copies in stream order (COPY_LAG layers) against the tree in
# .bench_assets/base_tree (record_stream), with lag1 and under a cap of Unsloth's peak (capG), beside Unsloth
has lag32 && step lag32-base 160 $BASE $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload
has lag32 && step lag32-new 330 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload offload+lag1 offload+cap14.5
has lag8 && step lag8q-base 100 $BASE $B --stacks fasttune --modes qlora --batches 8 --variants offload
has lag8 && step lag8q-new 240 $B --stacks fasttune unsloth --modes qlora --batches 8 --variants offload \
  offload+cap10.6
has lag8 && step lag8b-base 100 $BASE $B --stacks fasttune --modes bf16 --batches 8 --variants offload
has lag8 && step lag8b-new 240 $B --stacks fasttune unsloth --modes bf16 --batches 8 --variants offload \
  offload+cap20.2
# lagq8: QLoRA 8 x 2048, where holding copies in stream order measured 0.4% slower: longer lag, copies back
# into side-stream memory, both
has lagq8 && step lagq8 200 $B --stacks fasttune --modes qlora --batches 8 --variants offload offload+lag3 \
  offload+sidefetch offload+lag3+sidefetch offload
has b8 && step bf16-8 240 $B --stacks fasttune unsloth --modes bf16 --batches 8 --variants offload
has q8 && step qlora-8 240 $B --stacks fasttune unsloth --modes qlora --batches 8 --variants offload
has q32 && step qlora-32k 320 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --variants offload
has prof32 && step prof-32k 200 $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --profile 1 --variants offload
# kmain: the GPU tests of the kernels `kernels/lora.py` runs and of the model on them
has kmain && step pytest-kmain 200 python3 -m pytest -q -m gpu tests/kernels/test_rank_product.py \
  tests/kernels/test_lora.py tests/kernels/test_swiglu_lora.py tests/kernels/test_nf4.py \
  tests/kernels/test_model_kernels_on_off.py tests/models/test_llama.py -p no:cacheprovider
has swltest && step pytest-swiglu-lora 150 python3 -m pytest -q -m gpu tests/kernels/test_swiglu_lora.py \
  tests/kernels/test_swiglu.py tests/kernels/test_lora.py tests/models/test_llama.py -p no:cacheprovider
has ktest && step pytest-lora 60 python3 -m pytest -q -m gpu tests/kernels/test_lora.py -p no:cacheprovider
has micro && step micro 90 python3 benchmarks/micro_gpu.py
has swmicro && step micro-swiglu 90 python3 benchmarks/micro_gpu.py --only swiglu
# rank: the one-pass rank-r product kernel against cuBLAS, and its GPU tests
if has rank; then
  step micro-rank 60 python3 benchmarks/micro_gpu.py --only rank
  step pytest-rank 90 python3 -m pytest -q -m gpu tests/kernels/test_rank_product.py tests/kernels/test_lora.py \
    -p no:cacheprovider
fi
# nf4: the NF4 dequantisation against bitsandbytes' (speed, and equal output), then its GPU tests
if has nf4; then
  step micro-nf4 90 python3 benchmarks/micro_gpu.py --only nf4 --sweep
  step pytest-nf4 60 python3 -m pytest -q -m gpu tests/kernels/test_nf4.py -p no:cacheprovider
fi
# swtest: the SwiGLU-LoRA kernels and lora_mlp on the GPU; swfeat: the backward kernel with h written over dh
# and dh's rank-r term, each against the work it replaces (sweep_swiglu_tiles.py --features)
has swtest && step pytest-swiglu 90 python3 -m pytest -q -m gpu tests/kernels/test_swiglu_lora.py \
  tests/kernels/test_lora.py -p no:cacheprovider
has swfeat && step swiglu-features 130 python3 benchmarks/sweep_swiglu_tiles.py --features --budget-s 100
has loss && step loss-curve 150 python3 benchmarks/loss_curve.py --steps 50 --out bench_logs/loss_curves.json
if has fast; then
  step fast-bf16-8 200 $B --stacks fasttune --modes bf16 --batches 8 --profile 1 \
    --variants offload offload+plain on offload+ref budget:19.6 budget:43
  step fast-qlora-8 160 $B --stacks fasttune --modes qlora --batches 8 --profile 1 \
    --variants offload offload+plain on offload+ref budget:10.0
  step fast-2 100 $B --stacks fasttune --modes bf16 qlora --batches 2 --variants offload on
fi
if has gu; then  # gate/up kept on the host for a share of the layers (host_gate_up), against plain offload
  step gu-bf16-8 200 $B --stacks fasttune --modes bf16 --batches 8 --profile bench_logs/profile_gu.txt \
    --variants offload offload+gu0.25 offload+gu0.5 offload+gu0.75 offload+gu1
  step gu-qlora-8 150 $B --stacks fasttune --modes qlora --batches 8 --variants offload offload+gu0.5 offload+gu1
fi
if has gulong; then
  step gu-long-32k 300 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 --warmup 1 --steps 2 \
    --shape llama-2-7b --model-dir /tmp/bench-model-l2 --variants offload offload+gu1
fi
if has peers; then  # budgets: the peak GiB of transformers + PEFT in the lead's earlier run (same card)
  step peers-bf16 240 $B --stacks fasttune unsloth hf --modes bf16 --batches 8 --variants offload budget:43.1
  step peers-qlora 220 $B --stacks fasttune unsloth hf --modes qlora --batches 8 --variants offload budget:33.5
  step peers-liger 90 $B --stacks liger --modes bf16 --batches 8
fi
# Expected times on an H100 (from earlier calls' per-process wall times: fasttune ~45 s, HF ~40 s, Unsloth ~90 s
# at 8B; writing a 7-8B random-weight directory is not yet timed, guessed at ~60 s): the limits leave ~15% room.
if has fp8; then  # the FP8 base (load_in_fp8): GPU tests, speed beside bf16 and Unsloth, loss curve over 50 steps
  step pytest-fp8 120 python3 -m pytest -q -m gpu tests/kernels/test_fp8.py tests/models/test_fp8.py \
    tests/kernels/test_lora.py -p no:cacheprovider
  step fp8-8 240 $B --stacks fasttune unsloth --modes bf16 --batches 8 --variants offload
  step fp8-8f 90 $B --stacks fasttune --modes fp8 --batches 8 --variants offload
  step loss-fp8 150 python3 benchmarks/loss_curve.py --fp8 --steps 50 --out bench_logs/loss_curves_fp8.json
fi
# Kept attention (the rerun skips the attention forward; variant +noattn reruns it): GPU tests, then A/B beside
# Unsloth at 32,768 tokens (QLoRA) and at 8 x 2048 (bf16), Llama-3.1-8B shape.
has katest && step pytest-kept 150 python3 -m pytest -q -m gpu tests/models/test_kept_attention.py \
  tests/models/test_llama.py -p no:cacheprovider
has kattn32 && step kattn-32k 330 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --variants offload offload+noattn
has kattn && step kattn-bf16-8 240 $B --stacks fasttune unsloth --modes bf16 --batches 8 \
  --variants offload offload+noattn
# Kept q, k, v (the rerun skips the q/k/v products and RoPE too; variant +noqkv keeps O only): GPU tests, then
# both variants in one process beside Unsloth; qkv8: bf16 8 x 2048 (+ a profile), qkvq: QLoRA
# 8 x 2048, qkvq32: QLoRA 1 x 32,768.
# Packed rows (positions restart; `fasttune train`'s default): pktest runs the GPU tests of kept attention
# over packed rows (the variable-length flash kernel) and of the RMSNorm backward with its addend; pack8:
# bf16 8 x 2048 with 4 rows per sequence, kept (flash varlen) against rerun (flex) attention.
has pktest && step pytest-packed 150 python3 -m pytest -q -m gpu tests/models/test_kept_attention_packed.py \
  tests/models/test_kept_attention.py tests/kernels/test_rms_norm.py tests/models/test_llama.py -p no:cacheprovider
has pack8 && step packed-bf16-8 200 $B --stacks fasttune --modes bf16 --batches 8 \
  --variants offload+pack4 offload+pack4+noattn offload+pack4+noqkv
# packq: packed against unpacked rows with QLoRA, at 8 x 2048 (4 rows per sequence) and 1 x 32,768 (8 rows)
has packq && step packed-qlora-8 200 $B --stacks fasttune --modes qlora --batches 8 \
  --variants offload offload+pack4
has packq && step packed-qlora-32k 200 $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --variants offload+pack8
has qkvtest && step pytest-qkv 150 python3 -m pytest -q -m gpu tests/models/test_kept_attention.py \
  tests/kernels/test_rope.py tests/models/test_llama.py tests/models/test_memory.py -p no:cacheprovider
has qkv8 && step qkv-bf16-8 260 $B --stacks fasttune unsloth --modes bf16 --batches 8 --profile 1 \
  --variants offload offload+noqkv
has gu8 && step gu-bf16-8 260 $B --stacks fasttune unsloth --modes bf16 --batches 8 \
  --variants offload offload+gu0.25 offload+gu0.5
has qkvq && step qkv-qlora-8 240 $B --stacks fasttune unsloth --modes qlora --batches 8 \
  --variants offload offload+noqkv
has qkvq32 && step qkv-qlora-32k 300 $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 \
  --warmup 1 --steps 2 --variants offload offload+noqkv
# Other families and an odd length, beside Unsloth (one model directory each, written by its step); shapes = all
(has shapes || has qwen) && step qwen-bf16 270 $B --shape qwen2.5-7b --model-dir /tmp/bench-model-qwen \
  --stacks fasttune unsloth --modes bf16 --batches 8
(has shapes || has mistral) && step mistral-qlora 240 $B --shape mistral-7b --model-dir /tmp/bench-model-mistral \
  --stacks fasttune unsloth --modes qlora --batches 8
(has shapes || has l32odd) && step l32-odd 200 $B --shape llama-3.2-3b --model-dir /tmp/bench-model-l32 \
  --stacks fasttune unsloth --modes bf16 --batches 4 --seqs 3001
has hfbf16 && step hf-bf16 200 $B --stacks fasttune hf --modes bf16 --batches 8 --variants offload
has peers2 && step peers2 480 $B --stacks fasttune unsloth hf --modes bf16 qlora --batches 2 --variants offload
has liger-qlora && step liger-qlora 180 $B --stacks liger --modes qlora --batches 8
has l2-8 && step l2-8 480 $B --shape llama-2-7b --model-dir /tmp/bench-model-l2 --stacks fasttune unsloth hf \
  --modes bf16 qlora --batches 8 --variants offload
if has small; then  # issue item 7's small rows; Unsloth and Liger rows come back as 'skipped'
  step small-gpt2 150 $B --shape gpt2-124m --model-dir /tmp/bench-model-gpt2 --seq 1024 --batches 8 --modes bf16 \
    --stacks fasttune hf unsloth liger --variants on off
  step small-opt 150 $B --shape opt-350m --model-dir /tmp/bench-model-opt --seq 2048 --batches 8 --modes bf16 \
    --stacks fasttune hf unsloth liger --variants on off
fi
if has long32; then  # a second model directory (Llama-2-7B shape) for Unsloth
  step long-32k $(left) $B --stacks fasttune unsloth --modes qlora --batches 1 --seqs 32768 --warmup 1 --steps 2 \
    --shape llama-2-7b --model-dir /tmp/bench-model-l2 --variants offload
fi
if has long128; then
  step long-128k $(left) $B --stacks ${LONG_STACKS:-fasttune unsloth} --modes qlora --batches 1 --seqs 131072 \
    --warmup 1 --steps 1 --shape llama-2-7b --model-dir /tmp/bench-model-l2 --variants offload
fi
if has long131; then  # the issue's own shape (Llama-3.1-8B) at 131,072 tokens, one warm-up and one timed step each
  step long-131k-8b $(left) $B --stacks ${LONG_STACKS:-fasttune unsloth} --modes qlora --batches 1 --seqs 131072 \
    --warmup 1 --steps 1 --variants offload
fi
# hostres: the GPU tests of the offloader keeping the inputs past the host's room on the device; long262: one
# step of 262,144 tokens (QLoRA, batch 1, no warm-up), where 7 of 32 layers' 2 GiB inputs now stay on the GPU
has hostres && step pytest-host-room 150 python3 -m pytest -q -m gpu tests/models/test_llama.py \
  tests/models/test_memory.py tests/models/test_kept_attention.py -p no:cacheprovider
has long262 && step long-262k-8b $(left) $B --stacks fasttune --modes qlora --batches 1 --seqs 262144 \
  --warmup 0 --steps 1 --variants offload
# u327: Unsloth alone at 327,680 tokens (QLoRA, batch 1, no warm-up): whether it trains past 262,144
has u327 && step unsloth-327k-8b $(left) $B --stacks unsloth --modes qlora --batches 1 --seqs 327680 \
  --warmup 0 --steps 1 --timeout $(( $(left) - 10 ))
# pin32: QLoRA 1 x 32,768 with copies pinned in power-of-two pieces (6 layers' 0.875 GiB g and u in three
# pieces each) against the tree in .bench_assets/base_tree (each tensor in one pinned allocation)
has pin32 && step pin32-new 100 $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --variants offload
has pin32 && step pin32-base 100 $BASE $B --stacks fasttune --modes qlora --batches 1 --seqs 32768 --warmup 1 \
  --steps 2 --variants offload
if has maxlen; then  # 131,072 fitted both stacks before (RESULTS.md), so the search starts above it
  # MAXLEN_SHAPE=llama-3.1-8b MAXLEN_DIR=/tmp/bench-model for the issue's shape; MAXLEN_LIMIT caps the doubling
  step maxlen $(left) python3 benchmarks/bench_maxlen.py --stacks ${MAXLEN_STACKS:-fasttune unsloth} --mode qlora \
    --shape ${MAXLEN_SHAPE:-llama-2-7b} --model-dir ${MAXLEN_DIR:-/tmp/bench-model-l2} --start ${MAXLEN_START:-262144} \
    --known-fit ${MAXLEN_KNOWN_FIT:-131072} --resolution 4096 --limit ${MAXLEN_LIMIT:-1048576} \
    --max-seconds $(( $(left) - 20 )) --out bench_logs/results.jsonl --log-dir bench_logs
fi
if has cli8b || has cli8bq; then  # the CLI steps read the 8B shape's directory, which only peers' steps write
  [ -f /tmp/bench-model/config.json ] || python3 -c "import sys; from pathlib import Path; \
sys.path.insert(0, 'benchmarks'); from bench_train import write_model_dir; \
write_model_dir('llama-3.1-8b', Path('/tmp/bench-model'), Path('.bench_assets/tokenizer'))"
fi
if has cli8b; then  # the product path on the 8B shape: 'auto' checkpointing and the printed estimate
  step cli-8b 150 python3 -m fasttune train --model_name /tmp/bench-model --max_seq_length 2048 \
    --per_device_train_batch_size 8 --max_steps 3 --optim adamw_8bit --eval_answers 0 --eval_steps 100 \
    --logging_steps 1 --show_samples 0 --output_dir /tmp/run-8b
fi
if has cli8bq; then  # the same with the base in NF4 (QLoRA), packed rows (the embedded data's uneven rows)
  step cli-8b-qlora 150 python3 -m fasttune train --model_name /tmp/bench-model --max_seq_length 2048 \
    --per_device_train_batch_size 8 --max_steps 3 --optim adamw_8bit --eval_answers 0 --eval_steps 100 \
    --logging_steps 1 --show_samples 0 --load_in_4bit --output_dir /tmp/run-8b-qlora
fi
has decode && step decode 200 python3 benchmarks/bench_decode.py
echo "=== total $(( $(date +%s) - START ))s"
tar czf "$OUT/bench_logs.tgz" bench_logs
cp bench_logs/results.jsonl "$OUT/" 2>/dev/null
cp bench_logs/loss_curves.json "$OUT/" 2>/dev/null
for f in bench_logs/profile-*.txt; do [ -f "$f" ] && cp "$f" "$OUT/"; done
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
