"""token_logps on our Llama: the head runs at the scored positions only, a chunk at a time, and gives the
log-probabilities and gradients of the whole-logits computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fasttune.train.logps as logps_module
from fasttune.lora.apply import apply_lora
from fasttune.models.base import IGNORE_INDEX
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.train.logps import scored_index, token_logps

VOCAB, HIDDEN = 97, 32


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.init_weights(std=0.2)
    apply_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[0, :5] = IGNORE_INDEX  # a prompt
    targets[1, :3] = IGNORE_INDEX
    targets[:, -1] = IGNORE_INDEX
    targets[1, 9:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return {"input_ids": ids, "targets": targets, "attention_mask": mask,
            "position_ids": torch.arange(12).expand(2, 12)}


def _whole_logits(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"]).logits.float()
    kept = batch["targets"] != IGNORE_INDEX
    lp = torch.zeros(kept.shape)
    return lp.masked_scatter(kept, -F.cross_entropy(logits[kept], batch["targets"][kept], reduction="none"))


def test_the_head_sees_only_scored_positions(monkeypatch):
    model, batch = _model(), _batch()
    n_scored = int((batch["targets"] != IGNORE_INDEX).sum())
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    monkeypatch.setattr(logps_module, "CHUNK_ELEMS", 4 * VOCAB)  # chunks of 4 positions
    monkeypatch.setattr(logps_module, "CHUNK_ROWS_MIN", 1)
    token_logps(model, batch)
    assert sum(rows for rows, _ in seen) == n_scored  # never the (B, T) logits of every position
    assert all(rows <= 4 and width == HIDDEN for rows, width in seen)
    assert len(seen) == -(-n_scored // 4)


def test_a_chunk_takes_at_least_the_minimum_rows(monkeypatch):
    # a small memory allowance per chunk does not cut the head into products bound by reading its weight
    model, batch = _model(), _batch()
    n_scored = int((batch["targets"] != IGNORE_INDEX).sum())
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    monkeypatch.setattr(logps_module, "CHUNK_ELEMS", 2 * VOCAB)
    monkeypatch.setattr(logps_module, "CHUNK_ROWS_MIN", 5)
    token_logps(model, batch)
    assert n_scored > 5 and seen[:-1] == [5] * (len(seen) - 1) and sum(seen) == n_scored


def test_chunked_head_matches_the_whole_logits(monkeypatch):
    monkeypatch.setattr(logps_module, "CHUNK_ELEMS", 3 * VOCAB)
    monkeypatch.setattr(logps_module, "CHUNK_ROWS_MIN", 1)
    model, batch = _model(), _batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    ours = token_logps(model, batch)
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)
    whole = _whole_logits(model, batch)
    whole.sum().backward()
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)
    assert (ours[batch["targets"] == IGNORE_INDEX] == 0).all()
    for a, p in zip(ours_grads, trained):  # fp32 sums in another order (the padded batch runs padding-free)
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()))


def test_scored_index_lists_the_scored_positions_in_order():
    targets = torch.tensor([[IGNORE_INDEX, 5, 6], [7, IGNORE_INDEX, 8]])
    assert scored_index(targets).tolist() == [1, 2, 3, 5]


def test_a_scored_index_in_the_batch_is_what_the_head_reads(monkeypatch):
    # the objectives find the positions once, before the forward (`preference._rows`); token_logps must take
    # them from the batch, not find them again by the mask (a host sync between forward and backward)
    model, batch = _model(), _batch()
    whole = token_logps(model, batch)
    given = token_logps(model, {**batch, "scored_index": scored_index(batch["targets"])})
    assert torch.equal(given, whole)
    subset = scored_index(batch["targets"])[::2]
    part = token_logps(model, {**batch, "scored_index": subset})
    flat_part, flat_whole = part.reshape(-1), whole.reshape(-1)
    assert torch.equal(flat_part[subset], flat_whole[subset])
    rest = torch.ones_like(flat_part, dtype=torch.bool)
    rest[subset] = False
    assert (flat_part[rest] == 0).all() and (flat_whole[rest] != 0).any()
