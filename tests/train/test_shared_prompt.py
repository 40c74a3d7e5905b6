"""Packed preference pairs compute the prompt they share once (`data/pair_batches.py`, branched rows of
`models/attention.py`): the layout, and the same log-probabilities, DPO/ORPO losses and LoRA gradients as
the pairs laid out whole, under every checkpointing mode and both CPU attention paths."""

from __future__ import annotations

import pytest
import torch

from fasttune.data.pair_batches import collate_pairs
from fasttune.data.pairs import PairExample
from fasttune.data.tokenize import Example
from fasttune.lora.apply import apply_lora
from fasttune.lora.reference import Reference
from fasttune.models.attention import set_attention_backend
from fasttune.models.base import IGNORE_INDEX
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.train.logps import sequence_logps, token_logps
from fasttune.train.preference import DPOObjective, ORPOObjective

VOCAB = 61
M = IGNORE_INDEX


def _pair(prompt: list[int], chosen: list[int], rejected: list[int], rejected_prompt=None) -> PairExample:
    rp = prompt if rejected_prompt is None else rejected_prompt
    return PairExample(Example(prompt + chosen, [M] * len(prompt) + chosen),
                       Example(rp + rejected, [M] * len(rp) + rejected))


def test_layout_shares_the_prompt_less_its_last_token():
    batch = collate_pairs([_pair([5, 6, 7], [8, 9], [10, 11, 12])], pad_id=0, max_len=16, packed=True)
    n = 2 + 3 + 4
    assert batch["input_ids"][0, :n].tolist() == [5, 6, 7, 8, 9, 7, 10, 11, 12]
    assert batch["position_ids"][0, :n].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert batch["branch"][0, :n].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert batch["targets"][0, :n].tolist() == [M, M, 8, 9, M, 10, 11, 12, M]
    assert batch["sequence"][0, :n].tolist() == [-1, -1, 0, 0, -1, 1, 1, 1, -1]
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (16 - n)


def test_pairs_without_a_common_prefix_stay_whole():
    batch = collate_pairs([_pair([5, 6], [8], [9], rejected_prompt=[4, 6])], pad_id=0, max_len=8, packed=True)
    assert "branch" not in batch  # nothing shared: the packed layout of two rows, positions restarting
    assert batch["position_ids"][0, :6].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["input_ids"][0, :6].tolist() == [5, 6, 8, 4, 6, 9]


def test_sharing_stops_where_the_prompts_differ():
    # common prefix [5, 6] of prompts [5, 6, 7] and [5, 6, 3]: both keep their own third token
    batch = collate_pairs([_pair([5, 6, 7], [8], [9], rejected_prompt=[5, 6, 3])], pad_id=0, max_len=16,
                          packed=True)
    assert batch["input_ids"][0, :6].tolist() == [5, 6, 7, 8, 3, 9]
    assert batch["branch"][0, :6].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["position_ids"][0, :6].tolist() == [0, 1, 2, 3, 2, 3]


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg, use_kernels=True)
    model.init_weights(std=0.2)
    apply_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model.train()


def _pairs() -> list[PairExample]:
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [_pair(ids(9), ids(5), ids(8)), _pair(ids(4), ids(7), ids(2)), _pair([1], ids(3), ids(4)),
            _pair(ids(6), ids(3), ids(3), rejected_prompt=ids(5))]


@pytest.fixture(autouse=True)
def _backend():
    yield
    set_attention_backend("auto")


def _logps_and_grads(pairs, device="cpu", dtype=torch.float32, checkpointing="off", grad=True):
    """(sequence log-probabilities, LoRA gradients of a weighted sum of them) for the pairs shared (packed)
    and whole (one sequence a row)."""
    n = len(pairs)
    shared = collate_pairs(pairs, pad_id=0, max_len=32, packed=True)
    whole = collate_pairs(pairs, pad_id=0, max_len=32, packed=False)
    assert "branch" in shared and shared["attention_mask"].sum() < whole["attention_mask"].sum()
    results = []
    for batch in (shared, whole):
        model = _model().to(device, dtype)
        if checkpointing != "off":
            model.set_gradient_checkpointing(checkpointing, keep_attention="reference")
        params = [p for p in model.parameters() if p.requires_grad]
        keys = ("input_ids", "targets", "position_ids", "attention_mask", "branch")
        inputs = {k: batch[k].to(device) for k in keys if k in batch}
        with torch.set_grad_enabled(grad):
            logps = sequence_logps(token_logps(model, inputs), batch["sequence"].to(device), 2 * n)
        if grad:
            (logps * torch.linspace(0.5, 2.0, 2 * n, device=device)).sum().backward()
        results.append((logps.detach().float().cpu(), [p.grad.float().cpu() for p in params] if grad else []))
    return results


@pytest.mark.parametrize("checkpointing", ["off", "on", "offload"])
def test_shared_prompt_gives_the_logps_and_grads_of_whole_pairs(checkpointing):
    (a, grads_a), (b, grads_b) = _logps_and_grads(_pairs(), checkpointing=checkpointing)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):  # fp32 sums in another order: within 1e-4 of the largest entry
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4 * float(gb.abs().max()))


def test_flex_block_mask_gives_the_logps_of_whole_pairs():
    set_attention_backend("flex")  # eager flex_attention on the CPU, forward only (the reference pass)
    (a, _), (b, _) = _logps_and_grads(_pairs(), grad=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", ["off", "offload"])
def test_shared_prompt_on_cuda_through_compiled_flex(checkpointing):
    """On CUDA branched rows run through compiled flex_attention ('auto'), whole rows through SDPA: fp32."""
    (a, grads_a), (b, grads_b) = _logps_and_grads(_pairs(), "cuda", checkpointing=checkpointing)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3 * float(gb.abs().max()))


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_losses_and_grads_match_whole_pairs(method):
    pairs = _pairs()
    out = []
    for packed in (True, False):
        model = _model()
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        objective = DPOObjective(Reference(params), beta=0.1) if method == "dpo" else ORPOObjective(beta=0.1)
        batch = collate_pairs(pairs, pad_id=0, max_len=32, packed=packed, whole_chosen=method == "orpo")
        loss, stats = objective(model, batch)
        loss.backward()
        out.append((loss.detach(), {k: float(v) for k, v in stats.items()},
                    [p.grad.clone() for p in params.values()]))
    (la, sa, ga), (lb, sb, gb) = out
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for key in sa:
        assert sa[key] == pytest.approx(sb[key], rel=1e-4, abs=1e-6), key
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


def test_branched_rows_need_our_model():
    batch = collate_pairs(_pairs(), pad_id=0, max_len=32, packed=True)

    class Generic(torch.nn.Module):  # a transformers-style model: logits from its forward
        def forward(self, *a, **k):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="branch"):
        token_logps(Generic(), batch)
