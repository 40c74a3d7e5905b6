"""The static KV cache: prefill + decoding equals a full forward; left-padded batches equal prompts alone."""

from __future__ import annotations

import pytest
import torch

from fasttune.models.kv_cache import KVCache


def test_prefill_then_steps_match_full_forward(family, family_case, tiny_model):
    if family == "dynamic_rope":
        pytest.skip("dynamic NTK RoPE changes its frequencies with the length: cached keys differ by design")
    model = tiny_model(**family_case)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    full = model(x).logits  # (2, 12, V)

    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    chunks = [(0, 5), (5, 6), (6, 9), (9, 10), (10, 11), (11, 12)]  # a prefill, single steps, a 3-token chunk
    for start, end in chunks:
        pos = torch.arange(start, end).expand(2, -1)
        out = model(x[:, start:end], position_ids=pos, kv_cache=cache)
        assert out.kv_cache is cache and cache.length == end
        torch.testing.assert_close(out.logits, full[:, start:end], atol=1e-5, rtol=1e-5)


def test_default_positions_continue_after_the_cache(tiny_model):
    model = tiny_model()
    x = torch.randint(0, 97, (1, 8))
    full = model(x).logits
    cache = KVCache.for_model(model, 1, 8)
    model(x[:, :6], kv_cache=cache)
    step = model(x[:, 6:7], kv_cache=cache).logits
    torch.testing.assert_close(step, full[:, 6:7], atol=1e-5, rtol=1e-5)


def _left_pad(prompts: list[torch.Tensor], pad_id: int = 0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padded_batch_matches_each_prompt_alone(tiny_model, explicit_positions):
    model = tiny_model(model_type="qwen3", qk_norm=True, head_dim=24)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (7, 3, 5)]
    ids, mask = _left_pad(prompts)
    cache = KVCache.for_model(model, batch_size=3, max_len=12)

    def positions(mask_so_far: torch.Tensor, n_new: int):
        if not explicit_positions:
            return None
        return (mask_so_far.cumsum(-1) - 1).clamp(min=0)[:, -n_new:]

    out = model(ids, position_ids=positions(mask, ids.shape[1]), attention_mask=mask, kv_cache=cache,
                logits_to_keep=1)
    generated = [[] for _ in prompts]
    for _ in range(4):
        for i, p in enumerate(prompts):
            alone = torch.cat([p, torch.tensor(generated[i], dtype=torch.long)])[None]
            torch.testing.assert_close(out.logits[i, -1], model(alone).logits[0, -1], atol=1e-5, rtol=1e-5)
        nxt = out.logits[:, -1].argmax(-1)  # (3,)
        for i in range(len(prompts)):
            generated[i].append(int(nxt[i]))
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        out = model(nxt[:, None], position_ids=positions(mask, 1), attention_mask=mask, kv_cache=cache)


def test_left_padded_batch_without_cache(tiny_model):
    model = tiny_model()
    prompts = [torch.randint(1, 97, (n,)) for n in (6, 2)]
    ids, mask = _left_pad(prompts)
    last = model(ids, attention_mask=mask).logits[:, -1]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(last[i], model(p[None]).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_full_cache_and_wrong_batch_raise(tiny_model):
    model = tiny_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    model(torch.randint(0, 97, (1, 3)), kv_cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.randint(0, 97, (1, 2)), kv_cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.randint(0, 97, (2, 1)), kv_cache=cache)
    cache.reset()
    assert cache.length == 0


def test_cache_layout_and_dtype(tiny_model):
    model = tiny_model(model_type="qwen3", qk_norm=True, head_dim=24).to(torch.bfloat16)
    cache = KVCache.for_model(model, batch_size=2, max_len=10)
    assert cache.k.shape == (2, 2, 2, 10, 24)  # (layers, B, n_kv, max_len, hd)
    assert cache.k.dtype == torch.bfloat16
    model(torch.randint(0, 97, (2, 4)), kv_cache=cache)
    assert cache.k[:, :, :, :4].abs().sum() > 0 and cache.k[:, :, :, 4:].abs().sum() == 0
