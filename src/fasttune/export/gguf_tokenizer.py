"""The tokenizer as GGUF metadata: tokens, types, merges, pre-tokenizer name, special ids, chat template.

Two vocabularies are covered, the two llama.cpp reads for the Llama family:
- 'gpt2': byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): tokens in the byte alphabet, merges, and
  the pre-tokenizer's name (`tokenizer.ggml.pre`) so llama.cpp splits text the same way;
- 'llama': sentencepiece-style BPE with byte fallback (Llama 2, Mistral): tokens spelled with '▁',
  `<0xNN>` byte tokens, scores that rank merges, and the leading-space flag.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import gguf

from fasttune.data.templates import PromptContract
from fasttune.export.checkpoint import ExportError

# Pre-tokenizer names llama.cpp knows, best first, for a split regex transformers' GGUF reader maps.
_PREFERRED_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "deepseek-r1-qwen", "smaug-bpe")


@dataclass
class GGUFVocab:
    model: str  # 'gpt2' or 'llama' (tokenizer.ggml.model)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str | None = None
    scores: list[float] | None = None
    add_space_prefix: bool = False
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.model == "llama":
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _backend_state(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one "
            "(save the tokenizer with tokenizer.json)"
        )
    return json.loads(backend.to_str())


def _walk(node: Any) -> list[dict]:
    """The pre-tokenizer (or normalizer) and its children of a Sequence, flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [x for child in node.get("pretokenizers", node.get("normalizers", [])) for x in _walk(child)]
    return [node]


def pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's name for how this byte-level tokenizer splits text before BPE."""
    steps = _walk(state.get("pre_tokenizer"))
    kinds = [s["type"] for s in steps]
    splits = [s for s in steps if s["type"] == "Split"]
    if splits:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:  # an older transformers: fall through to the warning
            GGUF_PRE_TOKENIZER_SPLITS = {}
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        for name in _PREFERRED_PRE:
            if name in names:
                return name
        if names:
            return names[0]
        warnings.warn(
            f"GGUF export: unrecognised pre-tokenizer split {regex!r}; writing 'default', which "
            "llama.cpp may split differently from the original tokenizer",
            stacklevel=3,
        )
        return "default"
    byte_level = [s for s in steps if s["type"] == "ByteLevel"]
    if byte_level and byte_level[0].get("use_regex", True):
        digits = [s for s in steps if s["type"] == "Digits" and s.get("individual_digits")]
        # SmolLM/StarCoder: single digits, then GPT-2's regex.
        return "smollm" if digits else "gpt-2"
    warnings.warn(f"GGUF export: unrecognised pre-tokenizer {kinds}; writing 'default'", stacklevel=3)
    return "default"


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        # Newer tokenizer.json writes pairs; GGUF stores "a b" with a space inside a part spelled U+0120+.
        return [
            " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
            for pair in merges
        ]
    return list(merges)


def vocab_from_tokenizer(
    tokenizer: Any, vocab_size: int, contract: PromptContract | None = None, chat_template: str | None = None
) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer`, padded to the model's `vocab_size` (embedding rows)."""
    state = _backend_state(tokenizer)
    model = state["model"]
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export covers BPE tokenizers (byte-level or sentencepiece-style); this one is "
            f"{model.get('type')}"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    steps = _walk(state.get("pre_tokenizer"))
    if not sentencepiece and not any(s["type"] == "ByteLevel" for s in steps):
        raise ExportError(
            "GGUF export: a BPE tokenizer without ByteLevel pre-tokenizer or byte fallback is "
            "neither GPT-2 style nor sentencepiece style; llama.cpp cannot reproduce it"
        )

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    merges = _merges(model)
    rank = {m.replace(" ", ""): i for i, m in enumerate(merges)} if sentencepiece else {}
    unk_id = tokenizer.unk_token_id

    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        score = 0.0
        if token is None:
            token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = gguf.TokenType.BYTE
        elif sentencepiece and i == unk_id:
            kind = gguf.TokenType.UNKNOWN
        else:
            kind = gguf.TokenType.NORMAL
            # llama.cpp's sentencepiece tokenizer merges the best-scoring pair first: rank -> -rank.
            score = -float(rank[token]) if token in rank else 0.0
        tokens.append(token)
        types.append(int(kind))
        scores.append(score)

    special = {}
    bos = contract.bos_id if contract is not None else tokenizer.bos_token_id
    eos = contract.eos_id if contract is not None else tokenizer.eos_token_id
    pad = contract.pad_id if contract is not None else tokenizer.pad_token_id
    for kind, token_id in (("bos", bos), ("eos", eos), ("unk", unk_id), ("pad", pad)):
        if token_id is not None:
            special[kind] = int(token_id)
    if contract is not None and contract.end_of_turn:
        eot = vocab.get(contract.end_of_turn)
        if eot is not None and eot != special.get("eos"):
            special["eot"] = int(eot)

    if contract is not None and contract.template != "chat":
        add_bos = contract.add_bos
    else:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        add_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    normalizers = _walk(state.get("normalizer"))
    add_space_prefix = sentencepiece and (
        any(n["type"] == "Prepend" for n in normalizers)
        or any(s["type"] == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)
    )
    return GGUFVocab(
        model="llama" if sentencepiece else "gpt2",
        tokens=tokens,
        token_types=types,
        merges=merges,
        pre=None if sentencepiece else pre_tokenizer_name(state),
        scores=scores if sentencepiece else None,
        add_space_prefix=add_space_prefix,
        special_ids=special,
        add_bos=add_bos,
        add_eos=False,
        chat_template=chat_template,
    )
