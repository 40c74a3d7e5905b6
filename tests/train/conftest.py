"""A toy model that keeps the model contract (LMOutput with loss_sum / n_tokens), and ragged data.

The loop tests use it so that they exercise the loop alone, fast; the equivalence tests on the real
Llama-family model with LoRA live in test_loop_llama.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttune.data.packing import BatchStream
from fasttune.data.tokenize import Example
from fasttune.models.base import IGNORE_INDEX, LMOutput


class ToyLM(nn.Module):
    """Embedding -> (dropout -> linear -> tanh) residual -> head; every token predicts on its own."""

    def __init__(self, vocab: int = 37, dim: int = 16, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.embed.weight.requires_grad_(False)  # frozen, as the base model is under LoRA

    def forward(self, input_ids, position_ids=None, targets=None, attention_mask=None, kv_cache=None):
        h = self.embed(input_ids)                                   # (B, T, D)
        h = h + torch.tanh(self.proj(self.drop(h)))
        logits = self.head(h)                                       # (B, T, V)
        if targets is None:
            return LMOutput(logits=logits)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return LMOutput(loss_sum=loss_sum, n_tokens=(targets != IGNORE_INDEX).sum())


def ragged_examples(n: int, vocab: int = 37, seed: int = 1) -> list[Example]:
    """Rows of very different lengths with masked prompt prefixes (so trained-token counts differ)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 3 + (i * 7) % 19
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        prompt = 1 + i % 3
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def stream(examples: list[Example], batch_size: int, seed: int = 0, packing: bool = False) -> BatchStream:
    return BatchStream(examples, batch_size, max_seq_length=32, pad_id=0, packing=packing, seed=seed)


@pytest.fixture
def toy():
    return ToyLM


@pytest.fixture
def examples():
    return ragged_examples


@pytest.fixture
def make_stream():
    return stream
