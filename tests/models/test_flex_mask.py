"""`models.flex_mask.block_mask` builds the BlockMask that torch's `create_block_mask` builds, field by field,
for the patterns `models.attention` hands it (causal, packed rows, branched rows), and flex attention
gives the same output with either."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from fasttune.models import flex_mask
from fasttune.models.flex_mask import block_mask

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _rows(batch: int, length: int, seed: int):
    """Two packed rows of random lengths in each batch row (doc ids) and branches 0/1/2 in runs of 256 tokens,
    so that long enough rows have blocks wholly allowed as well as blocks cut by the pattern."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(batch, length, dtype=torch.long)
    for r in range(batch):
        doc[r, int(torch.randint(1, length, (1,), generator=g)):] = 1
    runs = torch.randint(0, 3, (batch, length // 256 + 1), generator=g)
    branch = runs.repeat_interleave(256, dim=1)[:, :length]
    return doc, branch


def _patterns(doc, branch):
    return {
        "causal": lambda b, h, q, k: k <= q,
        "packed": lambda b, h, q, k: (k <= q) & (doc[b, q] == doc[b, k]),
        "branched": lambda b, h, q, k: ((k <= q) & (doc[b, q] == doc[b, k])
                                        & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))),
    }


def _assert_same(expected, got):
    assert got.seq_lengths == expected.seq_lengths and got.BLOCK_SIZE == expected.BLOCK_SIZE
    for name in FIELDS:
        a, b = getattr(expected, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


@pytest.mark.parametrize("length", [5, 128, 200, 391, 1000])
@pytest.mark.parametrize("kind", ["causal", "packed", "branched"])
def test_block_mask_equals_create_block_mask(length, kind):
    batch = None if kind == "causal" else 2
    doc, branch = _rows(batch or 1, length, seed=length)
    pattern = _patterns(doc, branch)[kind]
    expected = create_block_mask(pattern, batch, None, length, length, device="cpu")
    _assert_same(expected, block_mask(pattern, batch, length, torch.device("cpu")))


def test_block_mask_in_chunks_of_query_blocks(monkeypatch):
    doc, branch = _rows(2, 700, seed=1)
    pattern = _patterns(doc, branch)["branched"]
    expected = create_block_mask(pattern, 2, None, 700, 700, device="cpu")
    assert expected.full_kv_num_blocks.sum() > 0 and expected.kv_num_blocks.sum() > 0  # both kinds of block
    monkeypatch.setattr(flex_mask, "CHUNK_ELEMENTS", 1)  # one block of query rows a chunk
    _assert_same(expected, block_mask(pattern, 2, 700, torch.device("cpu")))


def test_flex_attention_output_with_either_mask():
    doc, branch = _rows(2, 300, seed=2)
    pattern = _patterns(doc, branch)["branched"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 16, generator=g) for _ in range(3))
    expected = flex_attention(q, k, v, block_mask=create_block_mask(pattern, 2, None, 300, 300, device="cpu"))
    got = flex_attention(q, k, v, block_mask=block_mask(pattern, 2, 300, torch.device("cpu")))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # and the mask is not a no-op: dense attention over the whole row differs
    assert not torch.allclose(got, flex_attention(q, k, v))
