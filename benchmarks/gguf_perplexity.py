"""Perplexity of a run's GGUF exports in the real llama.cpp, per --type, on the run's held-out set.

    python benchmarks/gguf_perplexity.py runs/default --types f16 q8_0 q6_k q5_k_m q4_k_m q4_k_s q3_k_m q4_0
    python benchmarks/gguf_perplexity.py runs/default --types f16 q4_k_m q3_k_m --imatrix 128

--imatrix ROWS also writes every K-quant type with an importance matrix collected on ROWS rows of the run's
training data (`fasttune export gguf --imatrix ROWS`), scored beside the file without one.

Every held-out row is rendered as training renders it (the run's prompt contract: prompt, answer, EOS) and
tokenized once with the run's tokenizer; the same ids go to llama.cpp (node-llama-cpp, CPU) for each exported
file and to fasttune's own model (PyTorch, fp32: the unquantized reference). Perplexity = exp of the mean
negative log-probability of every token after the first of each row. Also prints each export's size and
time (0 with --reuse). Needs scripts/setup_llamacpp.sh. node-llama-cpp hands over each position's whole
next-token distribution as a map of the vocabulary, which dominates the time: keep --max_rows small on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def held_out_ids(run: Path, max_rows: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each held-out row (prompt, answer, EOS) and the length of its prompt."""
    from fasttune.data.sources import read_rows
    from fasttune.data.templates import encode_prompt, render_chat, render_prompt
    from fasttune.export.check import _eval_source
    from fasttune.export.contract import load_contract, load_tokenizer
    from fasttune.export.source import resolve_source

    src = resolve_source(run)
    contract, tokenizer = load_contract(src), load_tokenizer(src)
    data = src.run_yaml.get("data") or {}
    source = _eval_source(data) or "builtin:lumen"
    split = "eval" if source.startswith("builtin:") else None
    out, prompts = [], []
    for _, row in read_rows(source, split):
        prompt = render_prompt(row["instruction"], row.get("input", ""), contract, tokenizer)
        if contract.template == "chat":
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            text = render_chat(turns, contract, tokenizer, add_generation_prompt=False)
        else:
            text = prompt + row["output"] + contract.eos_token
        ids = encode_prompt(text, contract, tokenizer)
        n_prompt = len(encode_prompt(prompt, contract, tokenizer))
        if ids[:n_prompt] != encode_prompt(prompt, contract, tokenizer):
            raise SystemExit(f"row {len(out)}: the prompt's tokens are not a prefix of the row's")
        out.append(ids)
        prompts.append(n_prompt)
        if len(out) == max_rows:
            break
    return out, prompts


def reference_logprobs(run: Path, rows: list[list[int]]) -> list[list[float]]:
    from fasttune.infer.load import load_for_inference

    im = load_for_inference(run=run, device="cpu", dtype="fp32")
    out = []
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            lp = torch.log_softmax(im.model(x).logits[0, :-1].double(), -1)
            out.append(lp.gather(-1, x[0, 1:, None]).squeeze(-1).tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument(
        "--types", nargs="+", default=["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m"]
    )
    ap.add_argument("--out", default="bench_gguf", help="directory for the exported files")
    ap.add_argument("--max_rows", type=int, default=30)
    ap.add_argument("--reuse", action="store_true", help="read files already in --out instead of exporting")
    ap.add_argument("--imatrix", type=int, default=None, metavar="ROWS",
                    help="also export each K-quant type with an importance matrix of ROWS training rows")
    args = ap.parse_args()

    from importlib.metadata import version

    import transformers

    from fasttune.export.gguf import GGUF_TYPES, export_gguf, gguf_supported
    from fasttune.export.imatrix import collect_imatrix, describe
    from fasttune.export.llamacpp import find_llamacpp, perplexity
    from fasttune.export.source import resolve_source

    llama_cpp = find_llamacpp()
    if llama_cpp is None:
        raise SystemExit("llama.cpp is not installed: run scripts/setup_llamacpp.sh")
    run, out = Path(args.run), Path(args.out)
    rows, prompts = held_out_ids(run, args.max_rows)
    imatrix = None
    if args.imatrix:
        src = resolve_source(run)
        imatrix = collect_imatrix(src, gguf_supported(src), args.imatrix)
        print(describe(imatrix), flush=True)
    files = {}
    for kind in args.types:
        variants = [(kind, None)]
        if imatrix is not None and GGUF_TYPES[kind].mix is not None:
            variants.append((f"{kind} imatrix({args.imatrix})", imatrix))
        for label, m in variants:
            name = f"{run.name}.{kind}{'.imatrix' if m is not None else ''}.gguf"
            started, path = time.perf_counter(), out / name
            if not (args.reuse and path.is_file()):
                export_gguf(run, path, type=kind, imatrix=m)
            files[label] = (path, time.perf_counter() - started)
    jobs = [(path, [{"op": "logprobs", "tokens": ids} for ids in rows]) for path, _ in files.values()]
    answers = llama_cpp.run(jobs, context=max(512, max(len(r) for r in rows)), timeout=24 * 3600)
    ref_lp = reference_logprobs(run, rows)

    def answers_only(lps: list[list[float]]) -> list[list[float]]:
        # position i predicts token i + 1: the answer's tokens (and EOS) from position n_prompt - 1 on
        return [lp[n - 1 :] for lp, n in zip(lps, prompts)]

    print(
        json.dumps(
            {
                "llama_cpp": answers["llama_cpp"],
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "gguf": version("gguf"),
                "rows": len(rows),
                "tokens": sum(len(r) - 1 for r in rows),
            }
        )
    )
    print("| file | size MiB | export s | ppl, answer tokens | vs f16 | ppl, all tokens | vs f16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    lps = {kind: [a["logprobs"] for a in job] for kind, job in zip(files, answers["jobs"])}
    ans = {kind: perplexity(answers_only(lp)) for kind, lp in lps.items()}
    full = {kind: perplexity(lp) for kind, lp in lps.items()}

    def rel(ppl: dict, kind: str) -> str:
        return f"{ppl[kind] / ppl['f16'] - 1:+.2%}" if "f16" in ppl else ""

    for kind, (path, seconds) in files.items():
        size = path.stat().st_size / 2**20
        print(
            f"| {kind} | {size:,.1f} | {seconds:.1f} | {ans[kind]:.4f} | {rel(ans, kind)} "
            f"| {full[kind]:.4f} | {rel(full, kind)} |"
        )
    print(
        f"| fasttune fp32 (PyTorch, no export) | | | {perplexity(answers_only(ref_lp)):.4f} | "
        f"| {perplexity(ref_lp):.4f} | |"
    )


if __name__ == "__main__":
    main()
