"""Side-by-side LoRA/QLoRA training speed and peak memory: fasttune against its peers.

Each stack runs in its own process on the same fixed random batches and the same model shape with
random weights (speed does not depend on their values): LoRA r=16 alpha=16 on q,k,v,o,gate,up,down,
bitsandbytes AdamW 8-bit, bf16 compute, gradient checkpointing on, median of `--steps` steps after
`--warmup` steps, peak = torch.cuda.max_memory_allocated.

    python benchmarks/bench_train.py --stacks fasttune hf liger unsloth --shape llama-3.1-8b \
        --modes bf16 qlora --batches 2 8 --seq 2048 --out results.jsonl

The peers load from a directory (`--model-dir`, written once with save_pretrained from random
weights and the tokenizer in `--tokenizer`). fasttune builds the same Llama shape directly.
GPT-2 (124M) and OPT-350M (`GENERIC_SHAPES`) run through fasttune's generic path (its own loader,
`load_model`, from the same directory + PEFT LoRA + its chunked cross-entropy) against transformers +
PEFT, with HF's non-reentrant checkpointing in both unless the variant says 'off'; Unsloth and Liger
are not run on them (a skipped row says so):

    python benchmarks/bench_train.py --shape gpt2-124m --model-dir /tmp/bench-model-gpt2 --seq 1024 \
        --stacks fasttune hf --modes bf16 --batches 8 --variants on

One line of JSON per measurement goes to `--out`; the last lines printed are the table, grouped by
shape and batch x seq, with ratios against Unsloth and transformers + PEFT of the same group and mode.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_report import PeakRecorder  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False),
    # other families of the fast path (our Llama model takes them), at their released shapes
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, use_sliding_window=False, max_position_embeddings=32768,
                       tie_word_embeddings=False),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, tie_word_embeddings=True),
    # Llama-3.1-8B's depth and layer structure (32 layers, GQA, all seven projections) at a width whose GPU
    # work is a few milliseconds a step: a step's time is then what the host takes to queue it, compared
    # across stacks in seconds rather than with an 8B model
    "llama-3.1-8b-thin": dict(vocab_size=49152, hidden_size=512, intermediate_size=1792, num_hidden_layers=32,
                              num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                              rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192},
                              max_position_embeddings=131072, tie_word_embeddings=False),
    # small shapes to smoke-test the harness itself
    "tiny": dict(vocab_size=49152, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                 rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False),
}

# Other architectures users name most, at their real shapes (transformers config fields); the tiny ones
# smoke-test the harness. Dropout as in the released configs (0.1), except in the tiny shapes (exact losses).
GENERIC_SHAPES = {
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                               activation_function="gelu_new", tie_word_embeddings=True,
                               bos_token_id=50256, eos_token_id=50256)),
    "opt-350m": ("opt", dict(vocab_size=50272, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24,
                             num_attention_heads=16, word_embed_proj_dim=512, max_position_embeddings=2048,
                             do_layer_norm_before=False, activation_function="relu", enable_bias=True,
                             tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    "tiny-gpt2": ("gpt2", dict(vocab_size=1000, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                               bos_token_id=0, eos_token_id=0)),
    "tiny-opt": ("opt", dict(vocab_size=1000, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=256,
                             do_layer_norm_before=False, dropout=0.0, tie_word_embeddings=True)),
}
GENERIC_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D layers: PEFT takes them with fan_in_fan_out
                   "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
LLAMA_ONLY = {"unsloth": "Unsloth's FastLanguageModel path is for Llama-like families; not run on",
              "liger": "Liger Kernel has no patch for"}
LIGER_PATCHES = ("llama",)  # the model types bench_train applies Liger's patch to


def is_generic(shape: str) -> bool:
    return shape in GENERIC_SHAPES


def shape_vocab(shape: str) -> int:
    return GENERIC_SHAPES[shape][1]["vocab_size"] if is_generic(shape) else SHAPES[shape]["vocab_size"]


def shape_targets(shape: str) -> list[str]:
    return GENERIC_TARGETS[GENERIC_SHAPES[shape][0]] if is_generic(shape) else TARGETS


ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "UNSLOTH_DISABLE_STATISTICS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


def fixed_batches(batch: int, seq: int, n: int, vocab_limit: int = 49152, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_limit, (batch, seq), generator=g) for _ in range(n)]


def shape_config(shape: str):
    """The transformers config of `shape`: its model type's own config class (Llama unless it says)."""
    from transformers import AutoConfig

    if is_generic(shape):
        model_type, fields = GENERIC_SHAPES[shape]
        return AutoConfig.for_model(model_type, **fields)
    return AutoConfig.for_model(**{"model_type": "llama", **SHAPES[shape]}, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)


def shape_model_type(shape: str) -> str:
    return GENERIC_SHAPES[shape][0] if is_generic(shape) else SHAPES[shape].get("model_type", "llama")


def _dir_matches(shape: str, model_dir: Path) -> bool:
    saved = json.loads((model_dir / "config.json").read_text())
    want = shape_config(shape).to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer")
    return all(saved.get(k) == want.get(k) for k in keys)


def write_model_dir(shape: str, model_dir: Path, tokenizer_dir: Path) -> None:
    """Random-weight bf16 checkpoint of `shape` for the stacks that only load from a directory (once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_dir / "config.json").exists():
        # A directory left by another shape would silently benchmark the wrong model.
        if not _dir_matches(shape, model_dir):
            raise SystemExit(f"{model_dir} holds another model than {shape}: remove it or pass --model-dir")
        return
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(shape)).to(torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"wrote {shape} to {model_dir} in {time.time() - t0:.0f} s", flush=True)


# ---- one stack, one process -------------------------------------------------------------------

PACKING = {"rows": 1}  # rows per sequence of fasttune's steps (variant flag packN), set by configure_fasttune
CE_CHUNK: dict[str, int] = {}  # the fused loss's chunk budget before any variant flag ceN changed it
GRAPH: dict = {"on": False, "step": None}  # variant flag graph: the step replayed as a CUDA graph (StepGraph)


def fasttune_step(model):
    """(trainable params, step): one forward + backward of fasttune's interface (shifted targets, summed
    token losses divided by the trained-token count), returning the detached loss. With PACKING['rows'] = N
    each sequence holds N rows of equal length (positions restart, no target across a row's end), as
    `fasttune train` packs them."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def run(x):
        targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
        position_ids = None
        if PACKING["rows"] > 1:
            B, T = x.shape
            position_ids = (torch.arange(T, device=x.device) % -(-T // PACKING["rows"])).expand(B, T)
            targets.masked_fill_(position_ids.roll(-1, dims=1) == 0, -100)  # no sync: capturable
        out = model(input_ids=x, targets=targets, position_ids=position_ids)
        loss = out.loss_sum / out.n_tokens
        loss.backward()
        return loss.detach()

    def step(x):
        if not GRAPH["on"]:
            return run(x)
        if GRAPH["step"] is None:  # one eager warm-up step, then captured (the run's second warm-up step)
            from fasttune.models.capture import BatchLayout, batch_layout
            from fasttune.train.step_graph import StepGraph, row_table

            rows = PACKING["rows"] * x.shape[0]
            layout = BatchLayout(packed=rows > x.shape[0], max_rows=row_table(rows))

            def captured(b):
                with batch_layout(layout):
                    return run(b["input_ids"])

            GRAPH["step"] = StepGraph(captured, params, warmup=1, min_eager=1)
        return GRAPH["step"]({"input_ids": x})

    return params, step


def build_fasttune(args):
    """Our Llama-family model of `args.shape`, random weights, built in bf16 on the GPU; NF4 for qlora, FP8
    for fp8; LoRA on all 7."""
    import torch

    from fasttune.lora.apply import apply_lora
    from fasttune.models.hf import llama_config_from_hf
    from fasttune.models.llama import LlamaForCausalLM
    from fasttune.models.quantize import quantize_linears

    cfg = llama_config_from_hf(shape_config(args.shape))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of 8B weights
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg, use_kernels=args.kernels)
    finally:
        torch.set_default_dtype(default)
    if args.mode == "qlora":
        quantize_linears(model, "4bit", "cuda", torch.bfloat16)
    elif args.mode == "fp8":  # fasttune only: the frozen base in FP8 (load_in_fp8)
        from fasttune.models.fp8 import fp8_linears

        fp8_linears(model, "cuda")
    apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS)
    model.train()
    return model, *fasttune_step(model)


def _dtype(args):
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32  # CPU runs: exact fp32 parity


def build_fasttune_generic(args):
    """GPT-2 / OPT through fasttune's own loader (`load_model`: GenericCausalLM) and `apply_lora_generic`."""
    import torch

    from fasttune.config import ModelConfig
    from fasttune.models.generic import apply_lora_generic
    from fasttune.models.loading import load_model

    dtype = "bf16" if _dtype(args) == torch.bfloat16 else "fp32"
    loaded = load_model(ModelConfig(model_name=str(args.model_dir), dtype=dtype,
                                    load_in_4bit=args.mode == "qlora"), device=args.device)
    model = apply_lora_generic(loaded.model, r=16, lora_alpha=16, target_modules=shape_targets(args.shape))
    model.train()
    return model, *fasttune_step(model)


def configure_generic(model, variant: str) -> dict:
    """'on' / 'offload' (transformers' non-reentrant checkpointing, inputs on the host) / 'off'."""
    model.set_gradient_checkpointing(variant)
    return {"variant": variant, "checkpointing": variant}


def configure_fasttune(model, variant: str, args) -> dict:
    """Apply one variant, e.g. 'offload', 'on+ref' (kernels off), 'selective:4', 'budget:19.6+flex'.

    First token: off | on | offload | selective:K | budget:GiB (selective, K from the memory estimate).
    Then any of: ref (PyTorch references instead of the kernels), flex / sdpa (attention backend),
    noattn (offloading modes rerun attention instead of keeping its output: keep_attention='off'),
    noqkv (kept attention without its q, k, v: the rerun runs the q/k/v products and RoPE),
    pertensor (the optimiser over each adapter tensor, not fasttune's one flat buffer: read in `worker`),
    guS (offloading modes: share S of the recomputed layers keeps gate/up on the host, e.g. gu0.5; without
    it 'auto', `memory.plan.host_gate_up_share`),
    packN (N packed rows of equal length per sequence: `fasttune_step`),
    dguK (offloading modes: the last K recomputed layers hold gate/up on the device, device_gate_up=K;
    default 1, dgu0 reruns them all),
    capG (the caching allocator may hold at most G GiB, as on a card of that size: past it, it frees its
    cache and retries, counted in the row's alloc_retries),
    ceN (the fused loss takes chunks of 2^N logits on CUDA, `kernels.cross_entropy.CHUNK_ELEMS_CUDA`),
    graph (forward and backward captured as a CUDA graph after one eager step and replayed,
    `train.step_graph.StepGraph`; the optimiser step stays eager).
    """
    import torch

    from fasttune.memory import pinned
    from fasttune.memory.estimate import GiB, estimate_memory, plan_keep_layers, step_plan
    from fasttune.memory.plan import ModelShape, pinned_copy_bytes, plan_memory
    from fasttune.memory.settings import Checkpointing
    from fasttune.models.attention import set_attention_backend

    head, *flags = variant.split("+")
    mode, _, arg = head.partition(":")
    kernels = "ref" not in flags
    model.set_use_kernels(kernels)
    set_attention_backend("flex" if "flex" in flags else "sdpa" if "sdpa" in flags else "auto")
    c = model.config
    est_kw = dict(quantization={"qlora": "4bit", "fp8": "fp8"}.get(args.mode), r=16, use_kernels=kernels)
    share = next((float(f[2:]) for f in flags if f.startswith("gu")), "auto")
    keep_attention = "off" if "noattn" in flags else "auto"
    on_device = next((int(f[3:]) for f in flags if f.startswith("dgu")), 1)
    options = dict(host_gate_up=share, keep_attention=keep_attention, keep_qkv="noqkv" not in flags,
                   device_gate_up=on_device)
    keep = 0
    if mode == "budget":
        mode = "selective"
        keep = plan_keep_layers(c, Checkpointing(mode, **options), batch=args.batch, seq=args.seq,
                                budget_bytes=int(float(arg) * GiB), **est_kw)
    elif mode == "selective":
        keep = int(arg or 0)
    PACKING["rows"] = next((int(f[4:]) for f in flags if f.startswith("pack")), 1)
    if GRAPH["step"] is not None:  # a graph of the previous variant holds memory and pinned slices
        GRAPH["step"].close()
    GRAPH.update(on="graph" in flags, step=None)
    cap = next((float(f[3:]) for f in flags if f.startswith("cap")), None)
    ce = next((int(f[2:]) for f in flags if f.startswith("ce")), None)
    from fasttune.kernels import cross_entropy

    CE_CHUNK.setdefault("default", cross_entropy.CHUNK_ELEMS_CUDA)  # a later variant without ceN: the default
    cross_entropy.CHUNK_ELEMS_CUDA = CE_CHUNK["default"] if ce is None else 1 << ce
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(1.0, cap * GiB / total))
    model.set_gradient_checkpointing(mode, keep_layers=keep, **options)
    settings = model.model.checkpointing
    step = step_plan(c, settings, batch=args.batch, seq=args.seq, use_kernels=kernels)
    est = estimate_memory(c, step, **est_kw)
    # the plan the model executes at this batch (packed rows count no attention for the host link)
    plan = plan_memory(ModelShape.of(c), settings, tokens=args.batch * args.seq,
                       span=args.seq if PACKING["rows"] == 1 else 0, act_bytes=2, fused=kernels)
    host_layers = plan.count(gate_up="host")
    if plan.offloads:  # pinned before the first step, as `fasttune train` does (memory.setup.reserve_pinned)
        device = next(model.parameters()).device
        pinned.reserve(device, pinned_copy_bytes(plan, ModelShape.of(c), pinned.ALIGN))
    print(f"[{variant}] keep_layers={keep} host_gate_up_layers={host_layers} {est.describe()}; "
          f"{plan.describe()}", flush=True)
    return {"variant": variant, "checkpointing": mode, "keep_layers": keep, "kernels": kernels,
            "keep_attention": keep_attention, "est_gib": est.total / GiB, "host_gate_up_layers": host_layers}


def build_hf(args, liger: bool):
    """transformers + PEFT (+ Liger's Llama patch), loaded from `--model-dir`, checkpointing on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    kw = {}
    if args.mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=_dtype(args),
                                                 device_map={"": 0 if args.device == "cuda" else args.device},
                                                 attn_implementation="sdpa", **kw)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=shape_targets(args.shape), task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return model, params, step


def build_unsloth(args):
    from unsloth import FastLanguageModel  # noqa: I001  (must be the first import of the process)
    import torch

    model, _tok = FastLanguageModel.from_pretrained(str(args.model_dir), max_seq_length=args.seq,
                                                    dtype=torch.bfloat16, load_in_4bit=args.mode == "qlora")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    # Training mode, as Unsloth's trainer sets it: in eval mode its checkpointing is off (75 GiB at 8 x 2048).
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return model, params, step


def gpu_busy_ms(events) -> tuple[float, float]:
    """(compute, copy) milliseconds during which at least one kernel / one host copy ran on the GPU: the union
    of the profiled CUDA intervals, so overlapping kernels count once; the step's wall time minus the compute
    figure is the time the GPU waited (on the host, or on a copy it needed)."""
    spans: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for e in events:
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        spans["Memcpy" in e.name or "Memset" in e.name].append((e.time_range.start, e.time_range.end))
    out = []
    for copy in (False, True):
        total, end = 0.0, float("-inf")
        for a, b in sorted(spans[copy]):
            if b > end:
                total += b - max(a, end)
                end = b
        out.append(total / 1e3)  # microseconds -> ms
    return out[0], out[1]


def gpu_gaps(events, top: int = 15) -> str:
    """The GPU's idle gaps between compute kernels: how the waiting splits by gap length, and the `top`
    longest with the kernels on either side (where the GPU waited on the host or on a copy)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if "CUDA" in str(getattr(e, "device_type", None))
                   and "Memcpy" not in e.name and "Memset" not in e.name)
    cpu = [(e.time_range.start, e.time_range.end, e.name) for e in events
           if "CPU" in str(getattr(e, "device_type", None))]
    gaps, end, last = [], float("-inf"), ""
    for a, b, name in spans:
        if a > end and last:
            gaps.append((a - end, last, name, (a + end) / 2))
        if b > end:
            end, last = b, name
    bins = [(0, 10), (10, 100), (100, 1000), (1000, float("inf"))]
    lines = ["idle gaps (us): " + ", ".join(
        f"{lo:g}-{hi:g}: {sum(g for g, *_ in gaps if lo <= g < hi) / 1e3:.1f} ms "
        f"({sum(1 for g, *_ in gaps if lo <= g < hi)})" for lo, hi in bins)]
    for g, before, after, mid in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {g:9.1f} us after {before[:60]} before {after[:60]}")
        host = sorted((b - a, name) for a, b, name in cpu if a <= mid <= b)[:4]  # innermost first
        if host:
            lines.append("      host meanwhile: " + " < ".join(name[:50] for _, name in host))
    return "\n".join(lines) + "\n"


def start_profile():
    """A running torch profiler of CUDA and CPU activity, with input shapes (`write_profile` ends it)."""
    import torch

    kinds = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    prof = torch.profiler.profile(activities=kinds, record_shapes=True)
    prof.__enter__()
    return prof


def write_profile(prof, step_s: float, path: str) -> None:
    """End `prof` (one profiled step of `step_s` seconds) and write to `path`: the GPU's busy and idle time,
    its longest waits (`gpu_gaps`), the ops by device time, and the ops by input shape."""
    prof.__exit__(None, None, None)
    avg = prof.key_averages()
    try:
        table = avg.table(sort_by="self_device_time_total", row_limit=70)
    except (AttributeError, KeyError, ValueError):
        table = avg.table(sort_by="self_cuda_time_total", row_limit=70)
    by_shape = prof.key_averages(group_by_input_shape=True)
    try:
        shapes = by_shape.table(sort_by="device_time_total", row_limit=60)
    except (AttributeError, KeyError, ValueError):
        shapes = by_shape.table(sort_by="cuda_time_total", row_limit=60)
    events = prof.events()  # built once: both summaries read it
    busy, copies = gpu_busy_ms(events)
    head = (f"step {step_s:.3f} s; GPU computing {busy:.1f} ms ({busy / step_s / 10:.1f}% of the step), "
            f"host copies on the GPU {copies:.1f} ms\n")
    Path(path).write_text(head + gpu_gaps(events) + table + "\nby input shape:\n" + shapes)


def host_profile_path(profile: str) -> str:
    """Where `write_host_profile` puts the host's side of a profiled run: beside the profiler table."""
    return str(Path(profile).with_suffix("")) + ".host.txt"


def start_host_profile():
    """A running cProfile of the host's Python (`write_host_profile` ends it): where a host-bound step's
    time goes, function by function, which the torch profiler leaves as the self time of an autograd node."""
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def write_host_profile(prof, step_s: float, path: str) -> None:
    """End `prof` (one step of `step_s` seconds, slowed by the profiling) and write its functions by own time
    and by time including callees."""
    import io
    import pstats

    prof.disable()
    out = io.StringIO()
    out.write(f"step {step_s:.3f} s under cProfile\n")
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(60)
    stats.sort_stats("cumulative").print_stats(60)
    Path(path).write_text(out.getvalue())


def host_loop_s(n: int = 3_000_000) -> float:
    """Seconds this process takes for a Python loop of n integer additions: how fast the host runs Python,
    which sets the speed of a step bound by the host (hosts of one card model differ by up to 2x; a row's
    ratio holds for its call's host only)."""
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - t0


def time_steps(params, step, batches, warmup: int, profile: str | None = None, flat: bool = False,
               peak_report: str | None = None) -> dict:
    """Median step time after `warmup` steps and the peak memory from the first step (optimiser included).

    `flat`: the optimiser steps `params` as one flat buffer, as fasttune's trainer does (one 8-bit step
    launch instead of a few per adapter tensor; its gradient buffer lives from here on, zeroed in place).
    `peak_report`: the last step runs under the allocator's history (not timed) and what was live at its
    peak is written to this path (`peak_report.py`).
    """
    import bitsandbytes as bnb
    import torch

    if flat:
        from fasttune.train.flat_params import flat_optimizer

        opt = flat_optimizer(bnb.optim.AdamW8bit, params, lr=1e-4)
    else:
        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the reserved peak counts this run's blocks, not those cached by the build
    torch.cuda.reset_peak_memory_stats()
    host_s = host_loop_s()
    times, losses = [], []
    for i, x in enumerate(batches):
        # with `profile`: the first step after the warmup under the torch profiler, the next under cProfile
        prof = start_profile() if profile and i == warmup else None
        host = start_host_profile() if profile and i == warmup + 1 else None
        recorder = PeakRecorder() if peak_report and i == len(batches) - 1 else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with recorder or contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step(x)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if recorder is not None:
            Path(peak_report).write_text(recorder.report())
        if prof is not None:
            write_profile(prof, dt, profile)
        if host is not None:
            write_host_profile(host, dt, host_profile_path(profile))
        losses.append(float(loss))
        if i >= warmup and prof is None and host is None and recorder is None:
            times.append(dt)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    stats = torch.cuda.memory_stats()  # allocator retries: a full cache flush and a sync each
    del opt
    return {"step_s": med, "peak_gib": peak, "losses": losses, "host_loop_s": host_s,
            "alloc_retries": stats.get("num_alloc_retries"),
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))}


def worker(args) -> list[dict]:
    if args.stack == "unsloth":
        model, params, step = build_unsloth(args)
    import torch

    if args.stack == "fasttune":
        model, params, step = (build_fasttune_generic if is_generic(args.shape) else build_fasttune)(args)
    elif args.stack in ("hf", "liger"):
        model, params, step = build_hf(args, liger=args.stack == "liger")
    # Ids below both the peers' tokenizer (49,152) and the model's vocabulary (Llama-2: 32,000).
    limit = min(49152, shape_vocab(args.shape))
    # a profiled run takes two steps more (one under each profiler), so that as many steps are timed
    extra = (2 if args.profile else 0) + (1 if args.peak_report else 0)
    batches = [b.cuda() for b in fixed_batches(args.batch, args.seq, args.warmup + args.steps + extra, limit)]
    base = {"stack": args.stack, "shape": args.shape, "mode": args.mode, "batch": args.batch, "seq": args.seq,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "training_mode": model.training,
            "gpu_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
    if args.stack == "fasttune" and os.environ.get("BENCH_TREE"):  # another source tree on PYTHONPATH
        import fasttune

        base.update(tree=os.environ["BENCH_TREE"], tree_path=str(Path(fasttune.__file__).parent))
    variants = args.variants if args.stack == "fasttune" else ["peer"]
    rows = []
    for n, variant in enumerate(variants):
        row = dict(base, variant=variant, checkpointing="on")
        try:
            if args.stack == "fasttune" and is_generic(args.shape):
                row.update(configure_generic(model, variant))
            elif args.stack == "fasttune":
                row.update(configure_fasttune(model, variant, args))
            profile = args.profile if n == 0 else None
            flat = args.stack == "fasttune" and "pertensor" not in variant.split("+")
            row["flat_optimizer"] = flat
            peak_report = args.peak_report if n == 0 else None
            row.update(time_steps(params, step, batches, args.warmup, profile, flat=flat,
                                  peak_report=peak_report))
            row["tokens_per_s"] = args.batch * args.seq / row["step_s"]
            if GRAPH["step"] is not None:  # how many steps ran as a replay (the timed ones, if captured)
                row["graph_replays"] = GRAPH["step"].replays
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:  # one broken variant must not cost the others their numbers
            import traceback

            traceback.print_exc()
            # bitsandbytes and Triton report a full card as a RuntimeError of their own
            row["error"] = "OOM" if "out of memory" in str(e).lower() else f"{type(e).__name__}: {e}"[:300]
        for p in params:
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ---- the orchestrator -------------------------------------------------------------------------

def run_one(stack: str, mode: str, batch: int, seq: int, args) -> list[dict]:
    """One worker process; its RESULT lines (one per fasttune variant), or one error / skipped row."""
    key = {"stack": stack, "shape": args.shape, "mode": mode, "batch": batch, "seq": seq, "variant": "-"}
    if stack in LLAMA_ONLY and is_generic(args.shape):
        return [dict(key, skipped=f"{LLAMA_ONLY[stack]} {GENERIC_SHAPES[args.shape][0]}")]
    if stack == "liger" and shape_model_type(args.shape) not in LIGER_PATCHES:
        return [dict(key, skipped=f"{LLAMA_ONLY[stack]} {shape_model_type(args.shape)} here")]
    cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--mode", mode, "--batch", str(batch),
           "--seq", str(seq), "--shape", args.shape, "--model-dir", str(args.model_dir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--variants", *args.variants]
    if args.profile:
        cmd += ["--profile", str(Path(args.log_dir) / f"profile-{stack}-{mode}-{batch}x{seq}.txt")]
    if args.peak_report:
        cmd += ["--peak-report", str(Path(args.log_dir) / f"peak-{stack}-{mode}-{batch}x{seq}.txt")]
    t0 = time.time()
    log = Path(args.log_dir) / f"{stack}-{args.shape}-{mode}-{batch}x{seq}.log"
    rows, out, err, rc = run_worker(cmd, log, args.timeout)
    for r in rows:
        r["wall_s"] = time.time() - t0
    if rows:
        return rows
    return [dict(key, error=worker_error(out, err, rc, args.timeout), wall_s=time.time() - t0)]


def run_worker(cmd: list[str], log: Path, timeout: int) -> tuple[list[dict], str, str, int | None]:
    """Run one worker process (environment ENV added) and write its output to `log`: its RESULT rows,
    stdout, stderr and exit code (None when it ran past `timeout` seconds and was stopped)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    rc = None
    try:
        proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = "TIMEOUT\n" + (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
    log.write_text(out + "\n--- stderr ---\n" + err)
    return [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")], out, err, rc


def worker_error(out: str, err: str, rc: int | None, timeout: int) -> str:
    """What a worker that gave no (or not every) result died of, in one line."""
    if rc is None:
        return f"TIMEOUT after {timeout} s"
    if "OutOfMemory" in err or "out of memory" in err.lower():
        return "OOM"
    if rc == -9:  # the kernel's OOM killer: host memory (pinned offload buffers), not the card's
        return "OOM (host: killed by signal 9)"
    return " | ".join((err or out).strip().splitlines()[-3:]) or f"exit code {rc}"


def _label(r: dict) -> str:
    """fasttune[variant], with @tree for a row measured on another source tree (env BENCH_TREE) and +es for
    one whose allocator ran with expandable segments (env PYTORCH_ALLOC_CONF; Unsloth sets it itself)."""
    if r["stack"] != "fasttune":
        return r["stack"]
    es = "+es" if "expandable_segments:true" in r.get("alloc_conf", "").lower() else ""
    return f"fasttune[{r.get('variant', '')}{es}]" + (f"@{r['tree']}" if r.get("tree") else "")


STACK_ORDER = {"fasttune": 0, "unsloth": 1, "hf": 2, "liger": 3}


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Training rows by (shape, batch, seq), in first-seen order; within a group by mode, then stack.

    Maximum-length rows (`kind: maxlen`, from bench_maxlen.py) are left out: they have a table of their own.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind") != "maxlen":
            groups.setdefault((r.get("shape", "?"), r["batch"], r["seq"]), []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: (r["mode"], STACK_ORDER.get(r["stack"], 9)))  # stable: variants keep their order
    return groups


def ratios(r: dict, group: list[dict]) -> tuple[float, float]:
    """tokens/s of `r` over Unsloth's and transformers + PEFT's of the same group and mode (nan if absent);
    an fp8 row over their bf16 rows (the peers train no FP8 base)."""
    mode = "bf16" if r["mode"] == "fp8" else r["mode"]
    ref = {s["stack"]: s for s in group if "tokens_per_s" in s and s["mode"] == mode
           and s["stack"] in ("unsloth", "hf")}
    vs_u = r["tokens_per_s"] / ref["unsloth"]["tokens_per_s"] if "unsloth" in ref else float("nan")
    vs_h = r["tokens_per_s"] / ref["hf"]["tokens_per_s"] if "hf" in ref else float("nan")
    return vs_u, vs_h


def print_table(rows: list[dict]) -> None:
    for (shape, batch, seq), group in group_rows(rows).items():
        print(f"\n{shape}, {batch} x {seq}")
        print(f"  {'stack':32} {'mode':6} {'tok/s':>9} {'peak GiB':>9} {'est GiB':>8} {'vs unsloth':>10} "
              f"{'vs hf':>7} {'host s':>7}")
        for r in group:
            label = _label(r)
            if "error" in r or "skipped" in r:
                what = f"ERROR {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
                print(f"  {label:32} {r['mode']:6} {what[:100]}")
                continue
            vs_u, vs_h = ratios(r, group)
            est = f"{r['est_gib']:8.2f}" if "est_gib" in r else f"{'':8}"
            host = f"{r['host_loop_s']:7.3f}" if "host_loop_s" in r else ""  # Python's speed (host_loop_s)
            print(f"  {label:32} {r['mode']:6} {r['tokens_per_s']:9.0f} {r['peak_gib']:9.2f} {est} "
                  f"{vs_u:10.2f} {vs_h:7.2f} {host}")
    maxlen = [r for r in rows if r.get("kind") == "maxlen"]
    if maxlen:
        print(f"\nlongest sequence that trains one step, batch 1\n  {'stack':10} {'shape':12} {'mode':6} "
              f"{'fits':>8} {'fails':>8} {'peak GiB':>9}  stopped")
        for r in maxlen:
            peak = r.get("peak_gib_at_fit") or float("nan")
            print(f"  {r['stack']:10} {r['shape']:12} {r['mode']:6} {r['max_fit']:>8} "
                  f"{r['first_fail'] or '-':>8} {peak:9.2f}  {(r['stopped'] or 'resolved')[:80]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="fasttune")
    p.add_argument("--stacks", nargs="+", default=["fasttune", "hf", "liger", "unsloth"])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES) + sorted(GENERIC_SHAPES))
    p.add_argument("--mode", default="bf16")
    p.add_argument("--modes", nargs="+", default=["bf16", "qlora"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--seqs", nargs="+", type=int, default=None, help="several lengths (default: --seq)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["offload"],
                   help="fasttune configurations run in one process (see configure_fasttune)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # 'cpu': a dry run of the builder
    p.add_argument("--profile", default=None, help="worker: write a profiler table of one step here; "
                   "orchestrator: any value profiles each stack's run (fasttune's first variant)")
    p.add_argument("--peak-report", default=None,
                   help="worker: write what was live at one extra (untimed) step's peak memory here; "
                   "orchestrator: any value writes peak-STACK-MODE-BxS.txt into --log-dir for each stack's "
                   "first variant (peak_report.py)")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("bench_results.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    # fasttune builds Llama shapes itself but loads GPT-2 / OPT through its loader, from the directory
    if is_generic(args.shape) or any(s != "fasttune" for s in args.stacks):
        write_model_dir(args.shape, args.model_dir, args.tokenizer)
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            for seq in args.seqs or [args.seq]:
                for stack in args.stacks:
                    for res in run_one(stack, mode, batch, seq, args):
                        rows.append(res)
                        with args.out.open("a") as f:
                            f.write(json.dumps(res) + "\n")
                        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
