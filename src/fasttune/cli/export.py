"""`fasttune merge` and `fasttune export gguf|ollama`: parse the options, call the export API, check."""

from __future__ import annotations

import argparse
import time

from fasttune.cli.parser import add_command, add_group

# The names of export.gguf.GGUF_TYPES, repeated so that building the parser imports no torch (tested).
GGUF_TYPE_NAMES = (
    "f16",
    "bf16",
    "f32",
    "q8_0",
    "q5_1",
    "q5_0",
    "q4_1",
    "q4_0",
    "q6_k",
    "q5_k_m",
    "q4_k_m",
    "q4_k_s",
    "q3_k_m",
)

_INPUT_HELP = (
    "a run directory (runs/NAME), its adapter/ directory, or any PEFT LoRA adapter directory "
    "(its adapter_config.json names the base model)"
)
_BASE_HELP = (
    "base model to merge into instead of the one the run names: a preset, hub id, local "
    "directory or .gguf file (default: the run's model)"
)
_CHECK_HELP = (
    "skip the check that decodes one held-out prompt from the export and from base + adapter "
    "and compares them (default: the check runs)"
)


def _report(what: str, path: object, started: float) -> None:
    print(f"fasttune: wrote {what} {path} in {time.perf_counter() - started:.1f}s", flush=True)


def _check(args: argparse.Namespace, artifact: object) -> None:
    if args.no_check:
        return
    from fasttune.export.check import check_export

    print("fasttune: checking the export (skip with --no_check) ...", flush=True)
    print(check_export(args.input, artifact, base=args.base).summary(), flush=True)


def _refuse_existing(args: argparse.Namespace) -> None:
    """An --out that already holds something is replaced only with --overwrite (checked before any work)."""
    from pathlib import Path

    from fasttune.export.source import ExportError

    out = Path(args.out)
    if args.overwrite or not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    what = "a directory that is not empty" if out.is_dir() else "an existing file"
    raise ExportError(f"--out {out} is {what}; pass --overwrite to replace it, or choose another --out")


def cmd_merge(args: argparse.Namespace) -> int:
    from fasttune.export.merge import merge
    from fasttune.model_card import write_card

    _refuse_existing(args)
    started = time.perf_counter()
    out = merge(
        args.input,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        base=args.base,
        device=args.device,
    )
    _report("merged checkpoint", out, started)
    print(f"fasttune: wrote the model card {write_card(out, 'merged', args.input)}", flush=True)
    from fasttune.export.serving import SERVE_COMMANDS, serving_problems

    problems = serving_problems(out)
    for problem in problems:
        print(f"fasttune: warning: not ready for vLLM/TGI: {problem}", flush=True)
    if not problems:
        print(
            "fasttune: ready for vLLM and TGI (config, weights, tokenizer with chat template, stop ids); "
            "serve it with:",
            flush=True,
        )
        for command in SERVE_COMMANDS:
            print("  " + command.format(dir=out, name=out.name), flush=True)
    _check(args, out)
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fasttune.export.gguf import export_gguf
    from fasttune.hub import gguf_card_path
    from fasttune.model_card import write_card

    _refuse_existing(args)
    started = time.perf_counter()
    out = export_gguf(
        args.input, args.out, type=args.type, base=args.base, device=args.device, imatrix=args.imatrix
    )
    what = f"GGUF ({args.type}{f', imatrix of {args.imatrix} training rows' if args.imatrix else ''})"
    _report(what, out, started)
    card = write_card(gguf_card_path(out), "gguf", args.input, gguf_name=Path(out).name)
    print(f"fasttune: wrote the model card {card} (README.md when pushed: fasttune push)", flush=True)
    _check(args, out)
    return 0


def cmd_export_ollama(args: argparse.Namespace) -> int:
    from fasttune.export.ollama import export_ollama

    _refuse_existing(args)
    started = time.perf_counter()
    modelfile = export_ollama(args.input, args.out, type=args.type, base=args.base, device=args.device)
    _report("Ollama Modelfile and GGUF", modelfile.parent, started)
    print(f"fasttune: to use it: ollama create NAME -f {modelfile} && ollama run NAME", flush=True)
    _check(args, modelfile.parent / "model.gguf")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="RUN_OR_ADAPTER", help=_INPUT_HELP)
    p.add_argument("--base", metavar="MODEL", default=None, help=_BASE_HELP)
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where the LoRA products B@A (and, for a K-quant --type, the quantizer) run: cpu or cuda "
        "(default: cpu)",
    )
    p.add_argument("--no_check", action="store_true", help=_CHECK_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out already holds; without it an existing --out is an error "
                        "(default: off)")


def register(subs: argparse._SubParsersAction) -> None:
    """Add `merge` and `export {gguf,ollama}` to the main parser's subcommands."""
    merge = add_command(
        subs,
        "merge",
        "merge a LoRA adapter into its base model (16-bit HF checkpoint)",
        "Merge the run's LoRA adapter into its base model and save a Hugging Face checkpoint "
        "(sharded safetensors, config.json, tokenizer with the run's chat template, prompt "
        "contract) that transformers and vLLM load directly. Tensors stream one at a time into the "
        "shard files: peak memory is about one layer. A 4-bit base is dequantised to 16-bit first.\n"
        "Example: fasttune merge runs/default --out merged/",
        cmd_merge,
    )
    _common(merge)
    merge.add_argument("--out", required=True, metavar="DIR", help="output directory (required)")
    merge.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp16", "fp32"),
        help="precision of the merged weights (default: bf16)",
    )
    merge.add_argument(
        "--max_shard_size",
        default="2GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 2GB, 500MB (default: 2GB)",
    )

    export_subs = add_group(subs, "export", "export for llama.cpp / Ollama (gguf, ollama)",
                            "Export a run for other runtimes.", metavar="FORMAT")
    types = ", ".join(GGUF_TYPE_NAMES)
    gguf = add_command(
        export_subs,
        "gguf",
        "write one GGUF file (llama.cpp, LM Studio, Ollama)",
        "Merge the adapter and write a GGUF file from Python (no llama.cpp build): architecture, "
        "hyperparameters, tokenizer, chat template and stop ids in the metadata. Covers llama "
        "(Llama 2/3/3.1/3.2, SmolLM), mistral, qwen2, qwen3, gpt2 and gemma; an architecture llama.cpp "
        "lacks (OPT) is refused before any work. K-quant mixes (q4_k_m, ...) are written by fasttune's "
        "own quantizer with llama.cpp's type per tensor.\n"
        "Example: fasttune export gguf runs/default --out model.Q4_K_M.gguf --type q4_k_m",
        cmd_export_gguf,
    )
    _common(gguf)
    gguf.add_argument("--out", required=True, metavar="FILE", help="output .gguf file (required)")
    gguf.add_argument(
        "--type",
        default="f16",
        choices=tuple(GGUF_TYPE_NAMES),
        help=f"tensor type: {types}; norms stay f32; q4_0..q5_1 keep embeddings and output in "
        "q8_0; the K-quant mixes give the output Q6_K and attn_v/ffn_down more bits in some layers, "
        "as llama.cpp does (default: f16)",
    )
    gguf.add_argument(
        "--imatrix",
        type=int,
        default=None,
        metavar="ROWS",
        help="for a K-quant --type: collect an importance matrix (each quantized layer's mean squared input "
        "per channel, as llama.cpp's llama-imatrix does) over ROWS rows sampled from the run's training "
        "data, and quantize with it as llama-quantize --imatrix does; recorded in the metadata "
        "(quantize.imatrix.*) (default: off)",
    )
    ollama = add_command(
        export_subs,
        "ollama",
        "write a GGUF and an Ollama Modelfile",
        "Write DIR/model.gguf and DIR/Modelfile with the TEMPLATE and stop parameters of the run's "
        "prompt template, so the model stops where it was trained to stop.\n"
        "Example: fasttune export ollama runs/default --out ollama/ && "
        "ollama create mine -f ollama/Modelfile",
        cmd_export_ollama,
    )
    _common(ollama)
    ollama.add_argument("--out", required=True, metavar="DIR", help="output directory (required)")
    ollama.add_argument(
        "--type", default="q8_0", choices=GGUF_TYPE_NAMES, help=f"GGUF tensor type: {types} (default: q8_0)"
    )
