"""Generation with our KV cache equals transformers' generate on the same weights, token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_twin, left_pad, make_model

from fasttune.infer.generate import GenerationStats, generate

FAMILIES = {
    "llama_gqa": dict(model_type="llama"),
    "llama3_rope_tied": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2": dict(model_type="qwen2", attention_bias=True, attention_out_bias=False),
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=24),
    "mistral_window": dict(model_type="mistral", sliding_window=6),
}


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers(family):
    model = make_model(**FAMILIES[family])
    hf = hf_twin(model)
    x = torch.tensor([prompt(7, 1)])
    ours = generate(model, x, max_new_tokens=24, eos_token_ids=[])
    ref = hf.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(ours, ref)


def test_batched_left_padded_equals_one_by_one():
    model = make_model(model_type="qwen3", qk_norm=True, head_dim=24)
    prompts = [prompt(9, 2), prompt(3, 3), prompt(6, 4)]
    ids, mask = left_pad(prompts)
    batch = generate(model, ids, mask, max_new_tokens=12, eos_token_ids=[])
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), max_new_tokens=12, eos_token_ids=[])
        assert batch[i, -12:].tolist() == alone[0, -12:].tolist(), f"row {i}"


def test_left_padded_batch_equals_transformers():
    model = make_model()
    hf = hf_twin(model)
    ids, mask = left_pad([prompt(8, 5), prompt(4, 6)])
    ours = generate(model, ids, mask, max_new_tokens=10, eos_token_ids=[])
    ref = hf.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(ours, ref)


def test_sampling_equals_transformers_for_the_same_seed():
    model = make_model()
    hf = hf_twin(model)
    x = torch.tensor([prompt(5, 7)])
    kw = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.1)
    ours = generate(model, x, max_new_tokens=16, eos_token_ids=[], seed=123, **kw)
    torch.manual_seed(123)
    ref = hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=16, eos_token_id=None, pad_token_id=0, **kw
    )
    assert torch.equal(ours, ref)
    assert torch.equal(ours, generate(model, x, max_new_tokens=16, eos_token_ids=[], seed=123, **kw))
    assert not torch.equal(ours, generate(model, x, max_new_tokens=16, eos_token_ids=[], seed=124, **kw))


def test_eos_ends_a_row_and_later_tokens_are_padding():
    model = make_model()
    prompts = [prompt(5, 8), prompt(7, 9)]
    ids, mask = left_pad(prompts)
    free = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=[])
    eos = int(free[0, -8 + 2])  # row 0's third new token becomes "EOS"
    # the first time row 1 produces that id (if ever) it stops too
    out = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=[eos], pad_token_id=-1)
    row0 = out[0, ids.shape[1] :].tolist()
    first = row0.index(eos)
    assert row0[: first + 1] == free[0, ids.shape[1] : ids.shape[1] + first + 1].tolist()
    assert all(t == -1 for t in row0[first + 1 :])
    if eos not in free[1, ids.shape[1] :].tolist():
        assert out.shape[1] == ids.shape[1] + 8 and out[1, -8:].tolist() == free[1, -8:].tolist()


def test_stops_as_soon_as_every_row_is_done_and_counts():
    model = make_model()
    x = torch.tensor([prompt(5, 10)])
    free = generate(model, x, max_new_tokens=8, eos_token_ids=[])
    stats = GenerationStats()
    out = generate(model, x, max_new_tokens=8, eos_token_ids=[int(free[0, 5 + 3])], stats=stats)
    assert out.shape == (1, 5 + 4) and torch.equal(out, free[:, :9])
    assert stats.new_tokens == 4 and stats.prompt_tokens == 5 and stats.tokens_per_s > 0


def test_stop_strings_end_generation(smollm2_tokenizer):
    model = make_model()
    x = torch.tensor([prompt(5, 11)])
    free = generate(model, x, max_new_tokens=10, eos_token_ids=[])
    new = free[0, 5:].tolist()
    stop = smollm2_tokenizer.decode(new[3:5])  # text of the 4th and 5th new tokens
    out = generate(
        model, x, max_new_tokens=10, eos_token_ids=[], stop_strings=[stop], tokenizer=smollm2_tokenizer
    )
    assert stop in smollm2_tokenizer.decode(out[0, 5:].tolist())
    assert out.shape[1] <= 5 + 5 and torch.equal(out, free[:, : out.shape[1]])


class Recorder:
    """The streamer protocol transformers' TextStreamer implements."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def test_streamer_gets_the_prompt_then_each_token_then_end():
    model = make_model()
    x = torch.tensor([prompt(4, 12)])
    rec = Recorder()
    out = generate(model, x, max_new_tokens=5, eos_token_ids=[], streamer=rec)
    assert torch.equal(rec.calls[0], x) and rec.calls[-1] == "end"
    assert torch.cat(rec.calls[1:-1]).tolist() == out[0, 4:].tolist()


def test_right_padding_is_refused():
    model = make_model()
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_ids=[])


def test_no_eos_and_no_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="eos_token_ids"):
        generate(make_model(), torch.tensor([[1, 2]]), max_new_tokens=2)


def test_generic_path_runs_transformers_generate():
    import transformers

    from fasttune.models.generic import GenericCausalLM

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    model = GenericCausalLM(hf)
    ids, mask = left_pad([prompt(6, 13), prompt(3, 14)])
    ours = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=[])
    ref = hf.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(ours, ref)


@pytest.mark.slow
def test_compiled_step_equals_eager():
    model = make_model(num_hidden_layers=1)
    x = torch.tensor([prompt(6, 15)])
    eager = generate(model, x, max_new_tokens=12, eos_token_ids=[])
    compiled = generate(model, x, max_new_tokens=12, eos_token_ids=[], compile=True)
    assert torch.equal(eager, compiled)
    # a second call with another prompt length reuses the compiled step and its buffers
    y = torch.tensor([prompt(9, 16)])
    assert torch.equal(
        generate(model, y, max_new_tokens=5, eos_token_ids=[], compile=True),
        generate(model, y, max_new_tokens=5, eos_token_ids=[]),
    )


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2):
    import transformers

    model, tok = smollm2.model, smollm2.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2.source, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    x = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ours = generate(model, x, max_new_tokens=20, eos_token_ids=[])
    ref = hf.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    assert torch.equal(ours, ref), (tok.decode(ours[0, x.shape[1] :]), tok.decode(ref[0, x.shape[1] :]))


def test_decode_modes_are_checked():
    from fasttune.infer.static_decode import decode_mode

    assert [decode_mode(c) for c in (False, None, True, "cuda_graph")] == [
        "eager",
        "eager",
        "compile",
        "cuda_graph",
    ]
    with pytest.raises(ValueError, match="compile='graph'"):
        decode_mode("graph")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            generate(
                make_model(), torch.tensor([[1, 2]]), max_new_tokens=2, eos_token_ids=[], compile="cuda_graph"
            )
