"""The Unsloth Alpaca notebook (tests/notebooks/unsloth_alpaca.py) on a GPU, with only its import lines
changed to fasttune, on a random-weight model directory of a real shape (default: Llama-3.1-8B, 4-bit as
the notebook loads it). Prints the notebook's own output and the wall time of each part.

    python3 benchmarks/notebook_gpu.py --shape llama-3.1-8b --model-dir /tmp/bench-model

The model directory is written once with `bench_train.write_model_dir` (random weights, the SmolLM2
tokenizer in `--tokenizer`); the data is fasttune's embedded Lumen training split. Random weights train
and generate like real ones but say nothing meaningful: this checks that the notebook runs, not what the
model learns (the CPU test on the real SmolLM2 does that).
"""

from __future__ import annotations

import argparse
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tests" / "notebooks" / "unsloth_alpaca.py"
IMPORTS = {
    "from unsloth import FastLanguageModel": "from fasttune import FastLanguageModel",
    "from unsloth import is_bfloat16_supported": "from fasttune import is_bfloat16_supported",
    "from trl import SFTTrainer": "from fasttune import SFTTrainer",
    "from transformers import TrainingArguments": "from fasttune import TrainingArguments",
}


def ported_notebook() -> str:
    """The notebook's text with the four import lines replaced (each must be present exactly once)."""
    text = NOTEBOOK.read_text()
    for theirs, ours in IMPORTS.items():
        if text.count(theirs) != 1:
            raise SystemExit(f"{NOTEBOOK}: expected the line {theirs!r} once")
        text = text.replace(theirs, ours)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".bench_assets" / "tokenizer")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import write_model_dir

    t0 = time.perf_counter()
    write_model_dir(args.shape, args.model_dir, args.tokenizer)
    print(f"[notebook_gpu] model directory ready in {time.perf_counter() - t0:.1f} s", flush=True)

    data = ROOT / "src" / "fasttune" / "assets" / "lumen_train.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "notebook.py"
        script.write_text(ported_notebook())
        t0 = time.perf_counter()
        ns = runpy.run_path(str(script), init_globals=dict(
            MODEL_NAME=str(args.model_dir), DATA_FILE=str(data), OUTPUT_DIR=str(Path(tmp) / "out"),
            SAVE_DIR=str(Path(tmp) / "lora_model")))
        saved = sorted(q.name for q in (Path(tmp) / "lora_model").iterdir())
    import torch

    new_tokens = ns["outputs"].shape[1] - ns["inputs"]["input_ids"].shape[1]
    print(f"[notebook_gpu] notebook ran in {time.perf_counter() - t0:.1f} s; train loss "
          f"{ns['trainer_stats'].training_loss:.4f}; generated {new_tokens} tokens; saved {saved}; "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
