"""Generation with our KV cache equals transformers' generate on the same weights, token for token."""

from __future__ import annotations

import pytest
import torch
from infer_models import hf_twin, left_pad, make_model

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


def test_min_p_sampling_equals_transformers_for_the_same_seed():
    """The notebooks' inference cell samples with temperature=1.5, min_p=0.1."""
    model = make_model()
    hf = hf_twin(model)
    x = torch.tensor([prompt(5, 7)])
    kw = dict(do_sample=True, temperature=1.5, top_k=0, min_p=0.1)
    ours = generate(model, x, max_new_tokens=16, eos_token_ids=[], seed=5, **kw)
    torch.manual_seed(5)
    ref = hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=16, eos_token_id=None, pad_token_id=0, **kw
    )
    assert torch.equal(ours, ref)
    unfiltered = generate(model, x, max_new_tokens=16, eos_token_ids=[], seed=5, do_sample=True,
                          temperature=1.5, top_k=0)
    assert not torch.equal(ours, unfiltered)


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


# ------------------------------------------------- the pipelined loop against the loop it replaced


@torch.no_grad()
def loop_before_pipelining(model, input_ids, attention_mask=None, *, max_new_tokens, sampling=None,
                           eos_token_ids=(), pad_token_id=None, stop_strings=None, tokenizer=None, seed=None):
    """`iter_tokens` as it was before the host copies and the pipeline (eager step, one host sync per
    token, stop strings read from the device ids), kept as the reference the new loop must equal: (B, n)."""
    from fasttune.infer.generate import _StopChecker, check_left_padded
    from fasttune.infer.sampling import SamplingParams, pick_next, process_logits
    from fasttune.infer.static_decode import StaticKV, decode_step

    sampling = sampling or SamplingParams()
    vocab = model.get_input_embeddings().weight.shape[0]
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    check_left_padded(mask)
    pad = int(pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0))
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stop_check = _StopChecker(stop_strings, tokenizer) if stop_strings else None
    static = StaticKV(model, B, T + max_new_tokens)
    seq = torch.full((B, T + max_new_tokens), pad, dtype=torch.long)
    seq[:, :T] = input_ids
    seen = torch.zeros_like(seq, dtype=torch.bool)
    seen[:, :T] = mask
    finished = torch.zeros(B, dtype=torch.bool)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids, position_ids=positions, attention_mask=mask.long(), kv_cache=static.start(mask),
                logits_to_keep=1)
    logits = out.logits[:, -1].float()
    next_pos, slot, steps = positions[:, -1:] + 1, torch.tensor([T]), []
    for i in range(max_new_tokens):
        cur = T + i
        logits = process_logits(logits, sampling, seq[:, :cur], seen[:, :cur])
        token = pick_next(logits, sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        seq[:, cur] = token
        seen[:, cur] = ~finished
        finished |= torch.isin(token, eos)
        if stop_check is not None:
            finished |= stop_check(seq[:, T:cur + 1], finished)
        steps.append(token)
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        logits = decode_step(model, static, token.clamp(0, vocab - 1)[:, None], next_pos, slot)
        next_pos, slot = next_pos + 1, slot + 1
    return torch.stack(steps, dim=1)


def new_loop(model, ids, mask=None, **kw) -> torch.Tensor:
    from fasttune.infer.generate import iter_tokens

    steps = list(iter_tokens(model, ids, mask, **kw))
    assert all(t.device.type == "cpu" and t.shape == (ids.shape[0],) and t.dtype == torch.long for t in steps)
    assert len({id(t) for t in steps}) == len(steps)  # a tensor of its own per step (no reused buffer)
    return torch.stack(steps, dim=1)


def early_eos_case():
    """Two left-padded rows and an EOS id that row 0 produces at its third new token, row 1 later or never."""
    model = make_model()
    ids, mask = left_pad([prompt(5, 8), prompt(7, 9)])
    free = loop_before_pipelining(model, ids, mask, max_new_tokens=10)
    eos = int(free[0, 2])
    assert eos not in free[0, :2].tolist()
    return model, ids, mask, eos, free


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize(
    "case",
    ["greedy", "sample", "sample_penalty", "greedy_penalty", "eos_pad_minus1", "eos_default_pad", "two_eos"],
)
def test_loop_equals_the_loop_before_pipelining(case, pipeline):
    from fasttune.infer.sampling import SamplingParams

    model, ids, mask, eos, free = early_eos_case()
    kw = dict(max_new_tokens=10)
    if case == "sample":
        kw.update(sampling=SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95), seed=7)
    elif case == "sample_penalty":
        kw.update(sampling=SamplingParams(do_sample=True, repetition_penalty=1.3), seed=3)
    elif case == "greedy_penalty":
        kw.update(sampling=SamplingParams(repetition_penalty=1.5))
    elif case == "eos_pad_minus1":
        kw.update(eos_token_ids=[eos], pad_token_id=-1)
    elif case == "eos_default_pad":
        kw.update(eos_token_ids=[eos])
    elif case == "two_eos":
        kw.update(eos_token_ids=[int(free[1, 4]), eos], pad_token_id=96)
    ref = loop_before_pipelining(model, ids, mask, **kw)
    got = new_loop(model, ids, mask, pipeline=pipeline, **kw)
    assert torch.equal(got, ref)
    if case.startswith("eos"):  # row 0 ends early and pads, row 1 goes on: the case is what it claims
        assert ref[0, 2] == eos and (ref[0, 3:] == kw.get("pad_token_id", eos)).all() and ref.shape[1] > 3
    if case == "sample":
        assert not torch.equal(got, new_loop(model, ids, mask, pipeline=pipeline, **{**kw, "seed": 8}))


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
def test_stop_strings_equal_the_loop_before_pipelining(pipeline, smollm2_tokenizer):
    model = make_model()
    ids, mask = left_pad([prompt(5, 11), prompt(6, 17)])
    free = loop_before_pipelining(model, ids, mask, max_new_tokens=10)
    tok = smollm2_tokenizer
    for row, (a, b) in ((0, (3, 5)), (1, (1, 2))):
        stop = tok.decode(free[row, a:b].tolist())
        kw = dict(max_new_tokens=10, stop_strings=[stop], tokenizer=tok, eos_token_ids=[], pad_token_id=-1)
        ref = loop_before_pipelining(model, ids, mask, **kw)
        assert ref.shape[1] < 10 or ref[row, -1] == -1  # the stop string ended this row
        assert torch.equal(new_loop(model, ids, mask, pipeline=pipeline, **kw), ref)


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("n", [1, 2])
def test_one_and_two_new_tokens(n, pipeline):
    model, ids, mask, eos, _ = early_eos_case()
    for kw in (dict(), dict(eos_token_ids=[eos])):
        ref = loop_before_pipelining(model, ids, mask, max_new_tokens=n, **kw)
        assert ref.shape == (2, n)
        assert torch.equal(new_loop(model, ids, mask, max_new_tokens=n, pipeline=pipeline, **kw), ref)


class SlotSpy:
    """A decoder that records the cache slot and the cache length of every step it runs."""

    def __init__(self, decoder):
        self.decoder, self.slots, self.max_len = decoder, [], None

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def __call__(self, model, static, input_ids, position_ids, slot):
        self.slots.append(int(slot))
        self.max_len = static.max_len
        assert int(position_ids.max()) <= int(slot) < static.max_len
        return self.decoder(model, static, input_ids, position_ids, slot)


def spy_on_decoder(monkeypatch) -> list[SlotSpy]:
    import fasttune.infer.generate as gen

    spies, real = [], gen.decoder_for

    def decoder_for(model, compile):
        spies.append(SlotSpy(real(model, compile)))
        return spies[-1]

    monkeypatch.setattr(gen, "decoder_for", decoder_for)
    return spies


def test_the_cache_is_never_overrun_and_at_most_one_step_is_wasted(monkeypatch):
    model, ids, mask, eos, free = early_eos_case()
    T, n = ids.shape[1], 6
    spies = spy_on_decoder(monkeypatch)
    # Runs to max_new_tokens: the cache (exact when eager) is full, and the last token queues no step.
    for pipeline in (False, True):
        out = new_loop(model, ids, mask, max_new_tokens=n, pipeline=pipeline)
        assert torch.equal(out, free[:, :n])
        assert spies[-1].slots == list(range(T, T + n - 1)) and spies[-1].max_len == T + n
    # Both rows end at the third token: the pipelined loop has already queued the fourth token's step.
    both = [eos, int(free[1, 2])]
    for pipeline, steps in ((False, 2), (True, 3)):
        out = new_loop(model, ids, mask, max_new_tokens=n, eos_token_ids=both, pipeline=pipeline)
        assert torch.equal(out, free[:, :3])
        assert spies[-1].slots == list(range(T, T + steps))
    # ... unless that token was the last one allowed.
    out = new_loop(model, ids, mask, max_new_tokens=3, eos_token_ids=both, pipeline=True)
    assert torch.equal(out, free[:, :3]) and spies[-1].slots == [T, T + 1]


def test_generate_pipelined_equals_sync_and_streams_the_same(smollm2_tokenizer):
    model, ids, mask, eos, _ = early_eos_case()
    runs = []
    for pipeline in (False, True):
        rec, stats = Recorder(), GenerationStats()
        out = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=[eos], pad_token_id=-1,
                       streamer=rec, pipeline=pipeline, stats=stats)
        assert all(c.device.type == "cpu" for c in rec.calls[:-1]) and rec.calls[-1] == "end"
        assert stats.new_tokens == out.shape[1] - ids.shape[1] and stats.decode_s > 0 and stats.prefill_s > 0
        runs.append((out, rec.calls[1:-1]))
    (a, calls_a), (b, calls_b) = runs
    assert torch.equal(a, b) and len(calls_a) == len(calls_b) == a.shape[1] - ids.shape[1]
    assert all(torch.equal(x, y) for x, y in zip(calls_a, calls_b))


@pytest.mark.gpu
@pytest.mark.parametrize("compile", ["cuda_graph", "cuda_graph-unfused", False])
def test_cuda_pipelined_loop_equals_the_sync_loop(compile, monkeypatch, smollm2_tokenizer):
    """On the GPU, where the loop really overlaps: the same tokens as the loop that waits for every token,
    for EOS in one row of two, stop strings and a cache bucket filled to its last slot."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fasttune.infer.generate import iter_tokens

    model, ids, mask, eos, free = early_eos_case()
    model = model.cuda()
    spies = spy_on_decoder(monkeypatch)
    T = ids.shape[1]
    stop = smollm2_tokenizer.decode(free[1, 1:2].tolist())
    cases = [dict(max_new_tokens=10, eos_token_ids=[eos], pad_token_id=-1),
             dict(max_new_tokens=10, eos_token_ids=[], stop_strings=[stop], tokenizer=smollm2_tokenizer),
             dict(max_new_tokens=256 - T, eos_token_ids=[])]  # T + n = 256: the graph modes' bucket, full
    for kw in cases:
        runs = []
        for pipeline in (False, True):
            steps = list(iter_tokens(model, ids, mask, compile=compile, pipeline=pipeline, **kw))
            assert all(t.device.type == "cpu" for t in steps)
            runs.append(torch.stack(steps, dim=1))
            assert max(spies[-1].slots) < spies[-1].max_len
        assert torch.equal(runs[0], runs[1]), kw
    assert torch.equal(runs[1][:, :10], free)  # the same greedy tokens as the CPU loop before pipelining
