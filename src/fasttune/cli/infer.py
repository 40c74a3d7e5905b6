"""`fasttune generate`, `fasttune chat` and `fasttune eval`: parse, load, call the inference API.

Each command takes a run directory (`--run runs/x`), or a base model (`--model`) with an optional
`--adapter DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from fasttune.cli.parser import add_command
from fasttune.config import ConfigError

MODEL_HELP = "Base model: 'smollm2-135m', a hub id, a local directory or a .gguf file (default: the run's, " \
             "else smollm2-135m)"


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--run", metavar="DIR", default=None,
                   help="Run directory (runs/x) or adapter directory: its base model, LoRA adapter and "
                        "prompt template (default: none)")
    g.add_argument("--model", metavar="NAME", default=None, help=MODEL_HELP)
    g.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA adapter directory (PEFT format) on top of --model (default: none)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="Weights precision (default: auto: bf16 on GPUs that have it, fp32 on CPU)")
    g.add_argument("--as_gguf", default=None, choices=("f16", "bf16"),
                   help="Compute as llama.cpp's CPU backend runs this model's f16/bf16 GGUF export: adapter "
                        "merged, weights and each matrix product's input rounded to the type, fp32 sums and "
                        "everything else fp32; the reference for `fasttune export gguf --type f16/bf16` "
                        "(default: off)")
    g.add_argument("--cpu_fallback_16bit", action="store_true",
                   help="Load a 4-bit run in 16/32-bit on a machine without CUDA (default: off)")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="Let transformers run Python code from the model's folder; a run directory never "
                        "turns this on by itself (default: off)")


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"Most tokens to generate (default: {max_new_tokens})")
    g.add_argument("--do_sample", action="store_true",
                   help="Sample instead of greedy decoding (default: off)")
    g.add_argument("--temperature", type=float, default=1.0, metavar="X",
                   help="Sampling temperature (default: 1.0)")
    g.add_argument("--top_p", type=float, default=1.0, metavar="X",
                   help="Nucleus sampling mass (default: 1.0)")
    g.add_argument("--top_k", type=int, default=0, metavar="N",
                   help="Keep the N likeliest tokens; 0 keeps all (default: 0)")
    g.add_argument("--repetition_penalty", type=float, default=1.0, metavar="X",
                   help="Penalise tokens already in the text; 1.0 is off (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="Seed for sampling (default: none)")
    g.add_argument("--compile", nargs="?", const="compile", default="auto",
                   choices=("auto", "eager", "compile", "cuda_graph"),
                   help="Decoding step: 'auto' (a CUDA graph for a 16-bit model on a GPU, else eager), "
                        "'eager', 'compile' (torch.compile with CUDA graphs; the first call compiles) or "
                        "'cuda_graph' (the eager step recorded once and replayed) (default: auto; bare "
                        "--compile means compile)")


def register(subs: argparse._SubParsersAction) -> None:
    """Add generate, chat and eval to the `fasttune` parser's subcommands."""
    gen = add_command(subs, "generate", "generate text from a prompt (streamed)",
                  "Generate an answer and print it as it is produced, then tokens/s on stderr.\n"
                  "A PROMPT is asked as an instruction in the run's prompt template, or as a user message\n"
                  "in the model's chat template; --raw sends it as is (plain continuation).\n"
                  "--instruction/--input fill the fields of the run's (else the Alpaca) template.\n"
                  "Examples:\n"
                  "  fasttune generate --run runs/default 'How do I tune the lowest string?'\n"
                  "  fasttune generate --model smollm2-135m --raw 'Once upon a time'", cmd_generate)
    gen.add_argument("prompt", nargs="?", default=None, help="The prompt; '-' reads it from stdin")
    gen.add_argument("--instruction", default=None,
                     help="Alpaca instruction, rendered with the run's template (default: none)")
    gen.add_argument("--input", default="", help="Alpaca input (context) for --instruction (default: empty)")
    gen.add_argument("--raw", action="store_true",
                     help="Send PROMPT as is, without the template (default: off)")
    gen.add_argument("--no_stream", action="store_true",
                     help="Print the answer only when it is complete (default: stream)")
    _add_model_flags(gen)
    _add_sampling_flags(gen)

    chat = add_command(subs, "chat", "chat with a model in the terminal (multi-turn)",
                   "A conversation, one message per line, rendered with the model's chat template (or the\n"
                   "run's prompt template). /reset forgets the conversation, /exit (or end of input) quits.\n"
                   "Reads standard input, so `printf 'hi\\n/exit\\n' | fasttune chat` works too.", cmd_chat)
    chat.add_argument("--system", default=None, help="System message at the start (default: none)")
    _add_model_flags(chat)
    _add_sampling_flags(chat)

    ev = add_command(subs, "eval", "evaluate on held-out data: loss, perplexity, answer match",
                 "Loss and perplexity on the trained tokens of a held-out split, and for question/answer\n"
                 "rows the share of greedy answers equal to the reference (exact and normalised).", cmd_eval)
    ev.add_argument("--dataset", default=None,
                    help="Held-out data (file, saved dataset, builtin:lumen for its held-out split) "
                         "(default: the run's eval data, else builtin:lumen)")
    ev.add_argument("--max_rows", type=int, default=None, metavar="N",
                    help="Use the first N rows (default: all)")
    ev.add_argument("--batch_size", type=int, default=8, metavar="N", help="Rows per batch (default: 8)")
    ev.add_argument("--no_answers", action="store_true",
                    help="Loss and perplexity only, no generation (default: off)")
    ev.add_argument("--json", metavar="FILE", default=None,
                    help="Also write the result as JSON (default: none)")
    ev.add_argument("--max_new_tokens", type=int, default=128, metavar="N",
                    help="Longest answer generated (default: 128)")
    _add_model_flags(ev)


# ---- the commands ------------------------------------------------------------------------------------

def _load(args: argparse.Namespace):
    from fasttune.infer.load import load_for_inference

    try:
        im = load_for_inference(args.model, adapter=args.adapter, run=args.run, device=args.device,
                                dtype=args.dtype, cpu_fallback_16bit=args.cpu_fallback_16bit,
                                trust_remote_code=args.trust_remote_code, as_gguf=args.as_gguf)
    except (OSError, ValueError, RuntimeError) as e:
        what = args.run or args.adapter or args.model or "smollm2-135m"
        raise ConfigError(f"cannot load {what}: {e}") from e
    print(f"loaded {im.description}", file=sys.stderr)
    for note in im.notes:
        print(f"  note: {note}", file=sys.stderr)
    return im


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                seed=args.seed, compile=args.compile)


def _prompt_ids(args: argparse.Namespace, im) -> list[int]:
    from fasttune.data.templates import encode_prompt, make_contract, render_prompt

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.instruction is not None:
        if prompt is not None:
            raise ConfigError("give a PROMPT or --instruction, not both")
        contract = im.contract or make_contract("alpaca", "alpaca", im.tokenizer)
        return encode_prompt(render_prompt(args.instruction, args.input, contract, im.tokenizer), contract,
                             im.tokenizer)
    if not prompt:
        raise ConfigError("nothing to generate from: give a PROMPT (or '-' for stdin) or --instruction")
    if args.raw:
        return list(im.tokenizer(prompt)["input_ids"])
    if im.contract is not None:
        return encode_prompt(render_prompt(prompt, "", im.contract, im.tokenizer), im.contract, im.tokenizer)
    if getattr(im.tokenizer, "chat_template", None):  # an instruct model: the prompt is a user message
        text = im.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return list(im.tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(im.tokenizer(prompt)["input_ids"])


def _stats_line(stats) -> str:
    return (f"[{stats.new_tokens} tokens in {stats.prefill_s + stats.decode_s:.2f} s, "
            f"{stats.tokens_per_s:.1f} tokens/s; prompt {stats.prompt_tokens} tokens in "
            f"{stats.prefill_s:.2f} s]")


def cmd_generate(args: argparse.Namespace) -> int:
    from fasttune.infer.chat import write_pieces
    from fasttune.infer.stream import stream

    im = _load(args)
    ids = _prompt_ids(args, im)
    stops = list(im.contract.stop_strings) if im.contract is not None and not args.raw else None
    reply = stream(im.model, im.tokenizer, ids, eos_token_ids=im.eos_token_ids, stop_strings=stops,
                   **_generation(args))
    if args.no_stream:
        print(reply.read_all().strip())
    else:
        write_pieces(reply, sys.stdout)
    print(_stats_line(reply.stats), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from fasttune.infer.chat import ChatSession, repl

    im = _load(args)
    try:
        session = ChatSession(im.model, im.tokenizer, contract=im.contract, system=args.system,
                              eos_token_ids=im.eos_token_ids, **_generation(args))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    repl(session)
    return 0


def _eval_rows(args: argparse.Namespace, im) -> tuple[list[dict], str]:
    from fasttune.config import DataConfig, load_yaml
    from fasttune.data import mixing
    from fasttune.data.builtin import is_builtin
    from fasttune.data.formats import load_rows
    from fasttune.data.holdout import parse_split
    from fasttune.data.tokenize import eval_source
    from fasttune.run_dir import locate

    data = DataConfig()
    if args.run is not None:
        found = locate(args.run)
        if found.run is not None:
            data = load_yaml(found.run.run_yaml, stored_run=True).data
    # the run's held-out data as training chose it: eval_dataset, a built-in's eval split, a held-out share
    source = args.dataset or eval_source(data)
    if source is None:
        raise ConfigError("no held-out data: this run has no eval_dataset; pass --dataset")
    data.max_rows = args.max_rows
    if args.dataset is None and not isinstance(data.dataset, str) and parse_split(source) is not None:
        rows = mixing.eval_rows(dataclasses.replace(data, eval_dataset=source))
        return rows, f"{source} of {mixing.describe(data.dataset)}"
    valid = load_rows(source, data, split="eval" if is_builtin(source) else None)
    return [row for _, row in valid.rows], f"{source} ({valid.format} rows)"


def cmd_eval(args: argparse.Namespace) -> int:
    from fasttune.data.templates import make_contract
    from fasttune.infer.evaluate import evaluate, format_result, row_format

    im = _load(args)
    rows, what = _eval_rows(args, im)
    if not rows:
        raise ConfigError(f"no rows to evaluate in {what}")
    contract = im.contract or make_contract("auto", row_format(rows[0]), im.tokenizer)
    print(f"evaluating on {len(rows)} rows of {what}", file=sys.stderr)
    result = evaluate(im.model, im.tokenizer, rows, contract, batch_size=args.batch_size,
                      answers=not args.no_answers, max_new_tokens=args.max_new_tokens,
                      eos_token_ids=im.eos_token_ids)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    return 0
