"""DPO training speed and GRPO sampling speed: fasttune beside TRL + PEFT and Unsloth.

Each stack runs in its own process on a random-weight model of the named shape (speed does not depend on
the values), LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, bf16 (or QLoRA NF4 with `--mode qlora`), and
measures two things on the same data:

dpo   DPO (sigmoid, beta 0.1, reference = the base with the adapter off) on `--pairs` pairs a step, each
      chosen and rejected sequence `--prompt-len` prompt + `--completion-len` completion tokens (the
      completion ends with EOS), bitsandbytes AdamW 8-bit, gradient checkpointing (Unsloth's own; HF's
      non-reentrant for TRL; fasttune's `offload`). tokens/s = the tokens of every chosen and rejected
      sequence of a step over the median step time after `--warmup` steps; a step is the reference
      forward, the policy forward and backward, and the optimiser step. fasttune runs its `DPOObjective`
      on the micro-batch `fasttune train --method dpo` builds (chosen and rejected packed into one row,
      the prompt they share computed once: `computed_tokens` in its row); TRL and Unsloth run
      `trl.DPOTrainer` (Unsloth patched by its import) on the same texts.
gen   GRPO's sampling: `--groups` prompts of `--gen-prompt-len` tokens, each repeated G = `--generations`
      times, `--new-tokens` new tokens per completion (no early stop), temperature 1, top_p 1, top_k 0:
      TRL's generation settings when it samples with `generate` (GRPOTrainer without vLLM). fasttune calls
      `fasttune.infer.generate.generate`, the sampler of its GRPO runs; TRL + PEFT calls the PEFT model's
      `generate` under no_grad as GRPOTrainer does; Unsloth calls `generate` after
      `FastLanguageModel.for_inference`. samples/s = completions over the median of `--gen-runs` timed
      runs after one short warm-up run.

The texts are random words that the tokenizer keeps as one token each, so every stack trains on exactly
the same token ids and the counts are exact (checked).

    python benchmarks/bench_pref.py --stacks fasttune trl unsloth --suites dpo gen --out bench_logs/pref.jsonl

One JSON line per measurement goes to `--out`; the last lines printed are the tables with ratios against
Unsloth and TRL + PEFT.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import TARGETS, run_worker, shape_vocab, worker_error, write_model_dir  # noqa: E402

# ---- the data: texts of one-token words -------------------------------------------------------------


def word_pool(tokenizer, n: int = 4000) -> list[str]:
    """Words that encode to exactly one token when they follow a space (and so keep their count in any
    sequence of such words)."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if not token.startswith("\u0120") or not token[1:].isalpha() or not token[1:].isascii():
            continue
        word = token[1:]
        if len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1:
            words.append(word)
        if len(words) == n:
            break
    return words


def texts(words: list[str], count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(" " + rng.choice(words) for _ in range(length)) for _ in range(count)]


def pref_rows(tokenizer, pairs: int, steps: int, prompt_len: int, completion_len: int) -> list[dict]:
    """`pairs * steps` rows of prompt / chosen / rejected text: the completions have completion_len - 1
    words, TRL appends EOS (as fasttune's pair builder does)."""
    words = word_pool(tokenizer)
    n = pairs * steps
    prompts = texts(words, n, prompt_len, 1)
    chosen = texts(words, n, completion_len - 1, 2)
    rejected = texts(words, n, completion_len - 1, 3)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected)]
    for row in rows:  # the counts the tables rest on
        for k in ("chosen", "rejected"):
            got = len(tokenizer(row["prompt"] + row[k], add_special_tokens=False).input_ids) + 1
            if got != prompt_len + completion_len:
                want = prompt_len + completion_len
                raise SystemExit(f"bench_pref: a {k} sequence has {got} tokens, not {want}")
    return rows


def step_tokens(args) -> int:
    return 2 * args.pairs * (args.prompt_len + args.completion_len)


# ---- fasttune ----------------------------------------------------------------------------------------


def pair_example(tokenizer, prompt: str, completion: str):
    """One sequence of a pair as fasttune trains it: the prompt's ids, then the completion's and EOS, only the
    completion (EOS included) scored; the ids TRL builds from the same texts."""
    from fasttune.data.tokenize import Example
    from fasttune.models.base import IGNORE_INDEX

    p = tokenizer(prompt, add_special_tokens=False).input_ids
    c = tokenizer(prompt + completion, add_special_tokens=False).input_ids[len(p):] + [tokenizer.eos_token_id]
    return Example(p + c, [IGNORE_INDEX] * len(p) + c)



def fasttune_dpo(args, tokenizer, rows) -> dict:
    import torch
    from bench_train import configure_fasttune, time_steps

    from fasttune.data.pair_batches import collate_pairs
    from fasttune.data.pairs import PairExample
    from fasttune.lora.reference import Reference
    from fasttune.train.preference import DPOObjective

    model, params = fasttune_model(args)
    # packed: chosen and rejected of a pair in one row, their shared prompt once, as `fasttune train
    # --method dpo` lays them out
    plan = argparse.Namespace(mode=args.mode, batch=args.pairs, seq=args.prompt_len + args.completion_len)
    configure_fasttune(model, "offload", plan)
    pairs = [PairExample(pair_example(tokenizer, r["prompt"], r["chosen"]),
                         pair_example(tokenizer, r["prompt"], r["rejected"])) for r in rows]
    length = args.prompt_len + args.completion_len
    batches = []
    for i in range(0, len(pairs), args.pairs):
        batch = collate_pairs(pairs[i:i + args.pairs], pad_id=0, max_len=length, packed=True)
        batches.append({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    scored = sum(int((b["sequence"] >= 0).sum()) for b in batches) / len(batches)
    computed = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    objective = DPOObjective(Reference(named), beta=0.1)

    def step(batch):
        pairs = int(batch["units"])  # before the forward, as the training loop has it: read between the
        loss, _ = objective(model, batch)  # forward and the backward, it would make the host wait for the GPU
        (loss / pairs).backward()
        return loss.detach()

    row = time_steps(params, step, batches, args.warmup, getattr(args, "profile", None), flat=True)
    row.update(layout=f"{args.pairs} packed rows of {tuple(batches[0]['input_ids'].shape)[1]} tokens",
               scored_tokens=scored, computed_tokens=computed)
    return row


def fasttune_model(args):
    """(model, trainable parameters): bench_train's fasttune model of the shape and mode, LoRA on all 7."""
    from bench_train import build_fasttune

    model, params, _ = build_fasttune(argparse.Namespace(shape=args.shape, mode=args.mode, device="cuda",
                                                         kernels=True))
    return model, params


def fasttune_generate(model, ids, mask, new_tokens: int, seed: int):
    from fasttune.infer.generate import generate

    model.eval()
    return generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                    top_k=0, eos_token_ids=[], pad_token_id=0, seed=seed)


# ---- TRL + PEFT, Unsloth -----------------------------------------------------------------------------


def peer_model(args):
    """(model, tokenizer): Unsloth's FastLanguageModel, or transformers + PEFT as TRL's docs set it up."""
    import torch

    if args.stack == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(str(args.model_dir), max_seq_length=2 * (
            args.prompt_len + args.completion_len), dtype=torch.bfloat16, load_in_4bit=args.mode == "qlora")
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=3407)
        return model, tok
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kw = {}
    if args.mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.bfloat16,
                                                 device_map={"": 0 if torch.cuda.is_available() else "cpu"},
                                                 attn_implementation="sdpa", **kw)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, AutoTokenizer.from_pretrained(str(args.model_dir))


def peer_dpo(args, model, tok, rows) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if args.stack == "unsloth":
        from unsloth import FastLanguageModel, PatchDPOTrainer

        PatchDPOTrainer()
        FastLanguageModel.for_training(model)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.losses, self.tokens = [], 0.0, [], None

        def on_train_begin(self, *a, **k):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])
                self.tokens = logs.get("num_tokens")  # TRL's count of the tokens trained so far

    cuda = torch.cuda.is_available()  # False: a smoke run of the harness on the CPU
    config = DPOConfig(output_dir="/tmp/bench-pref-trl", per_device_train_batch_size=args.pairs,
                       gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=1e-4,
                       optim="adamw_bnb_8bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
                       gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1,
                       save_strategy="no", report_to="none", beta=0.1,
                       max_length=args.prompt_len + args.completion_len, lr_scheduler_type="constant",
                       warmup_steps=0, dataloader_num_workers=0, seed=0)
    timer = StepTimes()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[timer])
    trainer.train()
    times = timer.times[args.warmup:]
    row = {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "losses": timer.losses,
           "steps_timed": len(times), "trainer": type(trainer).__name__,
           "trl_tokens_per_step": None if timer.tokens is None else timer.tokens / (args.warmup + args.steps)}
    del trainer
    return row


def peer_generate(model, ids, mask, new_tokens: int, seed: int):
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                              temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=2,
                              disable_compile=True)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


# ---- one stack, one process --------------------------------------------------------------------------


def gen_rows(args, generate_fn) -> list[dict]:
    import torch

    rows = []
    for groups in args.groups:
        rng = random.Random(groups)
        prompts = [[rng.randrange(3, 49152) for _ in range(args.gen_prompt_len)] for _ in range(groups)]
        ids = torch.tensor([p for p in prompts for _ in range(args.generations)], device="cuda")
        mask = torch.ones_like(ids)
        n = ids.shape[0]
        row = {"suite": "gen", "groups": groups, "generations": args.generations, "samples": n,
               "new_tokens": args.new_tokens, "prompt_len": args.gen_prompt_len}
        try:
            generate_fn(ids, mask, 8, 0)  # warm-up: CUDA graphs, kernels, allocator
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for run in range(args.gen_runs):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = generate_fn(ids, mask, args.new_tokens, 1 + run)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                made = out.shape[1] - ids.shape[1]
                if made != args.new_tokens:
                    raise RuntimeError(f"generated {made} tokens per row, not {args.new_tokens}")
            dt = statistics.median(times)
            row.update(gen_s=dt, times=times, samples_per_s=n / dt, new_tokens_per_s=n * args.new_tokens / dt,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


def worker(args) -> None:
    if args.stack == "unsloth":
        import unsloth  # noqa: F401  (first import of the process: it patches transformers and TRL)
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    base = {"stack": args.stack, "shape": args.shape, "mode": args.mode, "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__}
    emit = lambda row: print("RESULT " + json.dumps({**base, **row}), flush=True)  # noqa: E731
    if args.stack != "fasttune":
        model, tok = peer_model(args)
    if "dpo" in args.suites:
        steps = args.warmup + args.steps
        rows = pref_rows(tokenizer, args.pairs, steps, args.prompt_len, args.completion_len)
        row = {"suite": "dpo", "pairs": args.pairs, "prompt_len": args.prompt_len,
               "completion_len": args.completion_len, "step_tokens": step_tokens(args)}
        try:
            row.update(fasttune_dpo(args, tokenizer, rows) if args.stack == "fasttune"
                       else peer_dpo(args, model, tok, rows))
            row["tokens_per_s"] = step_tokens(args) / row["step_s"]
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:  # the other suite still runs
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        emit(row)
        gc.collect()
        torch.cuda.empty_cache()
    if "gen" in args.suites:
        if args.stack == "fasttune":
            model, _ = fasttune_model(args)
            fn = lambda ids, mask, n, seed: fasttune_generate(model, ids, mask, n, seed)  # noqa: E731
        else:
            if args.stack == "unsloth":
                from unsloth import FastLanguageModel

                FastLanguageModel.for_inference(model)
            fn = lambda ids, mask, n, seed: peer_generate(model, ids, mask, n, seed)  # noqa: E731
        for row in gen_rows(args, fn):
            emit(row)


# ---- the orchestrator ------------------------------------------------------------------------------


def run_one(stack: str, args) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--mode", args.mode, "--shape", args.shape,
           "--model-dir", str(args.model_dir), "--tokenizer", str(args.tokenizer), "--suites", *args.suites,
           "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len),
           "--completion-len", str(args.completion_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup),
           "--groups", *map(str, args.groups), "--generations", str(args.generations),
           "--new-tokens", str(args.new_tokens), "--gen-prompt-len", str(args.gen_prompt_len),
           "--gen-runs", str(args.gen_runs)]
    t0 = time.time()
    rows, out, err, rc = run_worker(cmd, Path(args.log_dir) / f"pref-{stack}-{args.mode}.log", args.timeout)
    for r in rows:
        r["wall_s"] = time.time() - t0
    if rows and rc == 0:
        return rows
    error = worker_error(out, err, rc, args.timeout)
    return rows + [{"stack": stack, "mode": args.mode, "suite": "process", "error": error}]


def _ratio(rows: list[dict], r: dict, stack: str, key: str, same: tuple[str, ...]) -> float:
    """r[key] over the `stack` row that agrees with r on the keys `same` (nan where there is none)."""
    ref = [s for s in rows
           if s.get("stack") == stack and key in s and all(s.get(k) == r.get(k) for k in same)]
    return r[key] / ref[0][key] if ref else float("nan")


def print_tables(rows: list[dict]) -> None:
    dpo = [r for r in rows if r.get("suite") == "dpo"]
    if dpo:
        first = dpo[0]
        print(f"\nDPO, {first.get('pairs')} pairs a step, sequences of {first.get('prompt_len')} + "
              f"{first.get('completion_len')} tokens ({first.get('step_tokens')} tokens a step)")
        print(f"  {'stack':10} {'mode':6} {'tok/s':>8} {'step s':>7} {'peak GiB':>9} {'vs unsloth':>10} "
              f"{'vs trl':>7}")
        for r in dpo:
            if "error" in r:
                print(f"  {r['stack']:10} {r['mode']:6} ERROR {r['error'][:110]}")
                continue
            vs = [_ratio(rows, r, s, "tokens_per_s", ("suite", "mode")) for s in ("unsloth", "trl")]
            print(f"  {r['stack']:10} {r['mode']:6} {r['tokens_per_s']:8.0f} {r['step_s']:7.3f} "
                  f"{r['peak_gib']:9.2f} {vs[0]:10.2f} {vs[1]:7.2f}")
    gen = [r for r in rows if r.get("suite") == "gen"]
    if gen:
        print(f"\nGRPO sampling, G = {gen[0]['generations']}, {gen[0]['new_tokens']} new tokens, prompts of "
              f"{gen[0]['prompt_len']} tokens")
        print(f"  {'stack':10} {'mode':6} {'samples':>7} {'samples/s':>9} {'new tok/s':>9} {'peak GiB':>9} "
              f"{'vs unsloth':>10} {'vs trl':>7}")
        for r in gen:
            if "error" in r:
                print(f"  {r['stack']:10} {r['mode']:6} {r['samples']:7} ERROR {r['error'][:100]}")
                continue
            same = ("suite", "mode", "groups")
            vs = [_ratio(rows, r, s, "samples_per_s", same) for s in ("unsloth", "trl")]
            print(f"  {r['stack']:10} {r['mode']:6} {r['samples']:7} {r['samples_per_s']:9.2f} "
                  f"{r['new_tokens_per_s']:9.0f} {r['peak_gib']:9.2f} {vs[0]:10.2f} {vs[1]:7.2f}")
    for r in rows:
        if r.get("suite") == "process":
            print(f"  {r['stack']}: process ERROR {r['error'][:150]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="fasttune", help=argparse.SUPPRESS)
    p.add_argument("--stacks", nargs="+", default=["fasttune", "trl", "unsloth"],
                   choices=["fasttune", "trl", "unsloth"])
    p.add_argument("--suites", nargs="+", default=["dpo", "gen"], choices=["dpo", "gen"])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--mode", default="bf16", choices=["bf16", "qlora"])
    p.add_argument("--pairs", type=int, default=2, help="DPO pairs per step")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--completion-len", type=int, default=512, help="completion tokens, EOS included")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--groups", nargs="+", type=int, default=[1, 4], help="GRPO prompts per sampling call")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-prompt-len", type=int, default=128)
    p.add_argument("--gen-runs", type=int, default=2)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("bench_logs/pref.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--profile", default=None, help="worker: a profiler table of one fasttune DPO step")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if shape_vocab(args.shape) < 49152:
        raise SystemExit("bench_pref: the shape's vocabulary must hold the tokenizer's 49,152 ids")
    if any(s != "fasttune" for s in args.stacks):
        write_model_dir(args.shape, args.model_dir, args.tokenizer)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for stack in args.stacks:
        for row in run_one(stack, args):
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    print_tables(rows)


if __name__ == "__main__":
    main()
