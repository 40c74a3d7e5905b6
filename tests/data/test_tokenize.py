"""Rows → input ids + labels: what is trained, what is masked, EOS exactly once, and the dataset summary."""

from __future__ import annotations

import copy

import pytest

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.templates import make_contract
from fasttune.data.tokenize import build_dataset, encode_row

IGN = -100


def trained_text(ex, tok) -> str:
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGN], skip_special_tokens=False)


def trained_runs(ex, tok) -> list[str]:
    """Decoded maximal runs of trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab != IGN:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_alpaca_prompt_masked_response_and_eos_trained(plain_tok):
    c = make_contract("auto", "alpaca", plain_tok)
    ex = encode_row({"instruction": "Say hi", "input": "", "output": "Hi there!"}, "alpaca", plain_tok, c)
    assert ex.input_ids[-1] == c.eos_id == 2 and ex.labels[-1] == 2  # EOS is a trained label
    assert ex.input_ids.count(2) == 1
    assert trained_runs(ex, plain_tok) == ["Hi there!<|im_end|>"]
    assert plain_tok.decode(ex.input_ids) == render_alpaca("Say hi", "") + "Hi there!<|im_end|>"
    assert all(lab == i or lab == IGN for i, lab in zip(ex.input_ids, ex.labels))
    assert ex.n_trained == len(plain_tok("Hi there!", add_special_tokens=False)["input_ids"]) + 1


def render_alpaca(instruction, input):
    from fasttune.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    t = ALPACA_PROMPT if input else ALPACA_PROMPT_NO_INPUT
    return t.format(instruction=instruction, input=input)


def test_eos_already_in_the_data_is_not_doubled(plain_tok):
    c = make_contract("auto", "alpaca", plain_tok)
    ex = encode_row({"instruction": "x", "input": "", "output": "done<|im_end|>"}, "alpaca", plain_tok, c)
    assert ex.input_ids.count(c.eos_id) == 1 and ex.input_ids[-1] == c.eos_id
    comp = make_contract("auto", "text", plain_tok)
    ex = encode_row({"text": "story<|im_end|>\n"}, "text", plain_tok, comp)
    assert ex.input_ids.count(c.eos_id) == 1 and ex.input_ids[-1] == c.eos_id


def test_train_on_inputs_trains_everything(plain_tok):
    c = make_contract("auto", "alpaca", plain_tok)
    row = {"instruction": "Say hi", "input": "please", "output": "Hi"}
    masked = encode_row(row, "alpaca", plain_tok, c)
    full = encode_row(row, "alpaca", plain_tok, c, train_on_inputs=True)
    assert full.input_ids == masked.input_ids and full.labels == full.input_ids
    assert masked.n_trained < full.n_trained == len(full.input_ids) - 1


def test_text_trains_all_text_and_eos(plain_tok):
    c = make_contract("auto", "text", plain_tok)
    ex = encode_row({"text": "Once upon a time"}, "text", plain_tok, c)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == c.eos_id


def test_korean_and_emoji_round_trip(plain_tok, smol_tok):
    text = "한국어 문장입니다 🎻🌊 — naïve café"
    for tok, template in ((plain_tok, "alpaca"), (smol_tok, "chat")):
        c = make_contract(template, "alpaca", tok)
        ex = encode_row({"instruction": text, "input": "입력 ✨", "output": text}, "alpaca", tok, c)
        decoded = tok.decode(ex.input_ids, skip_special_tokens=False)
        assert decoded.count(text) == 2 and "입력 ✨" in decoded
        assert trained_runs(ex, tok) == [text + "<|im_end|>"]


def test_bos_added_once_when_the_tokenizer_adds_it(bos_tok):
    c = make_contract("auto", "alpaca", bos_tok)
    ex = encode_row({"instruction": "hi", "input": "", "output": "yo"}, "alpaca", bos_tok, c)
    assert ex.input_ids[0] == 256 and ex.input_ids.count(256) == 1 and ex.labels[0] == IGN
    assert ex.input_ids[-1] == 257 and trained_runs(ex, bos_tok) == ["yo</s>"]
    comp = make_contract("auto", "text", bos_tok)
    ex = encode_row({"text": "<s>already has one"}, "text", bos_tok, comp)
    assert ex.input_ids.count(256) == 1 and ex.input_ids[0] == 256


def test_chat_multi_turn_masks_all_but_assistant_turns(smol_tok):
    c = make_contract("auto", "messages", smol_tok)
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b b"}, {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d"}, {"role": "user", "content": "trailing"}]}
    ex = encode_row(row, "messages", smol_tok, c)
    # Each assistant turn's content and its end-of-turn token are trained, once each; nothing else.
    assert trained_runs(ex, smol_tok) == ["b b<|im_end|>", "d<|im_end|>"]
    text = smol_tok.decode(ex.input_ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                    "<|im_start|>assistant\nb b<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
                    "<|im_start|>assistant\nd<|im_end|>\n")
    # Tokens are those of the whole conversation tokenized at once (what the template gives).
    assert ex.input_ids == smol_tok(text, add_special_tokens=False)["input_ids"]


def test_sharegpt_and_openai_rows_encode_alike(smol_tok, write_jsonl):
    a = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    b = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    da = build_dataset(DataConfig(dataset=str(write_jsonl([a], "a.jsonl"))), smol_tok, 256)
    db = build_dataset(DataConfig(dataset=str(write_jsonl([b], "b.jsonl"))), smol_tok, 256)
    (ea,), (eb,) = da.examples, db.examples
    assert ea.input_ids == eb.input_ids and ea.labels == eb.labels


def test_alpaca_rows_through_the_chat_template(smol_tok):
    c = make_contract("chat", "alpaca", smol_tok)
    ex = encode_row({"instruction": "Q", "input": "ctx", "output": "A"}, "alpaca", smol_tok, c)
    assert "<|im_start|>user\nQ\n\nctx<|im_end|>" in smol_tok.decode(ex.input_ids, skip_special_tokens=False)
    assert trained_runs(ex, smol_tok) == ["A<|im_end|>"]
    assert ex.input_ids.count(2) == 3  # ends of the system, user and assistant turns


def test_template_without_end_token_gets_a_trained_eos(smol_tok):
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    c = make_contract("auto", "messages", tok)
    assert c.end_of_turn is None
    row = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    ex = encode_row(row, "messages", tok, c)
    # The generation prompt ends in a space that the tokenizer merges into " a1": that token is the
    # answer's first token and is trained.
    assert trained_runs(ex, tok) == [" a1<|im_end|>", " a2<|im_end|>"]
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == (
        "user: q1\nassistant: a1<|im_end|>\nuser: q2\nassistant: a2<|im_end|>\n")
    fallback = encode_row(row, "messages", NoOffsets(tok), c)
    assert fallback.input_ids == ex.input_ids and fallback.labels == ex.labels


def test_non_incremental_template_falls_back_to_search(smol_tok):
    """A template whose earlier text depends on the whole conversation breaks the prefix property."""
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = ("{{ messages|length }} turns\n{% for m in messages %}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    c = make_contract("auto", "messages", tok)
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "y"}, {"role": "assistant", "content": "y"}]}
    ex = encode_row(row, "messages", tok, c)
    assert trained_runs(ex, tok) == ["x<|im_end|>", "y<|im_end|>"]
    # The masked user turns carry the same words; they must stay masked.
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert text.startswith("4 turns\n<|im_start|>user\nx<|im_end|>")


def test_template_error_names_the_row(smol_tok, write_jsonl):
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "assistant", "content": "b"}]}
    path = write_jsonl([good, bad])
    with pytest.raises(DataError, match=r"data\.jsonl, row 2, field 'messages': the chat template rejected "
                                        r"this conversation: .*roles must alternate"):
        build_dataset(DataConfig(dataset=str(path)), tok, 64)
    td = build_dataset(DataConfig(dataset=str(path), on_bad_row="skip"), tok, 64)
    assert td.summary.skipped == {"template error": 1} and len(td.examples) == 1


class NoOffsets:
    """A tokenizer that cannot report character offsets (as slow tokenizers cannot)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_token_count_fallback_matches_offsets(smol_tok):
    c = make_contract("auto", "messages", smol_tok)
    row = {"messages": [{"role": "user", "content": "안녕 😀"},
                        {"role": "assistant", "content": "반가워요 🎉"},
                        {"role": "user", "content": "more"},
                        {"role": "assistant", "content": "sure, more."}]}
    a = encode_row(row, "messages", smol_tok, c)
    b = encode_row(row, "messages", NoOffsets(smol_tok), c)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def _write(write_jsonl, n_long=0, n_short=2):
    long_out = " ".join(["word"] * 200)
    rows = [{"instruction": "short", "input": "", "output": "ok"}] * n_short
    rows += [{"instruction": "long", "input": "", "output": long_out}] * n_long
    return str(write_jsonl(rows))


def test_summary_counts_truncation(plain_tok, write_jsonl):
    td = build_dataset(DataConfig(dataset=_write(write_jsonl, n_long=3)), plain_tok, 64)
    s = td.summary
    assert (s.rows_read, s.rows_valid, s.examples, s.truncated, s.dropped_long) == (5, 5, 5, 3, 0)
    assert max(len(e.input_ids) for e in td.examples) == 64 == s.longest
    assert s.tokens == sum(len(e.input_ids) for e in td.examples)
    assert s.trained_tokens == sum(e.n_trained for e in td.examples) > 0
    assert td.format == "alpaca" and td.contract.template == "alpaca"
    assert [e.row for e in td.examples] == [1, 2, 3, 4, 5]
    assert "truncated 3" in str(s)


def test_on_long_row_drop(plain_tok, write_jsonl):
    cfg = DataConfig(dataset=_write(write_jsonl, n_long=3), on_long_row="drop")
    td = build_dataset(cfg, plain_tok, 64)
    assert (td.summary.examples, td.summary.dropped_long, td.summary.truncated) == (2, 3, 0)


def test_all_masked_stops_before_training(plain_tok, write_jsonl):
    # The alpaca prompt alone is ~40 tokens: at max_seq_length 16 no answer token survives.
    with pytest.raises(DataError, match="all labels are masked: nothing to train.*2 rows lost every trained "
                                        "token to max_seq_length=16"):
        build_dataset(DataConfig(dataset=_write(write_jsonl)), plain_tok, 16)
    # One row that survives is enough; the others are dropped and counted.
    rows = [{"text": "tiny"}, {"instruction": "x" * 400, "input": "", "output": "y"}]
    td = build_dataset(DataConfig(dataset=str(write_jsonl(rows[:1]))), plain_tok, 16)
    assert td.summary.trained_tokens > 0


def test_skipped_rows_are_counted_in_the_summary(plain_tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{oops\n{"instruction": "a", "output": 2}\n')
    td = build_dataset(DataConfig(dataset=str(p), on_bad_row="skip"), plain_tok, 128)
    assert td.summary.skipped == {"not JSON": 1, "wrong type": 1} and td.summary.examples == 1
    assert "skipped 2 (not JSON: 1, wrong type: 1)" in str(td.summary)


def test_max_rows_and_eval_split_with_train_contract(smol_tok, write_jsonl):
    cfg = DataConfig(dataset="builtin:lumen", eval_dataset="builtin:lumen", max_rows=5, template="chat")
    train = build_dataset(cfg, smol_tok, 256)
    held_out = build_dataset(cfg, smol_tok, 256, split="eval", contract=train.contract)
    assert len(train.examples) == 5 and len(held_out.examples) == 5
    assert held_out.contract is train.contract and held_out.summary.split == "eval"
    none = DataConfig(dataset=str(write_jsonl([{"text": "a"}])), eval_dataset="auto")
    assert build_dataset(none, smol_tok, 256, split="eval") is None
    auto = build_dataset(DataConfig(eval_dataset="auto"), smol_tok, 256, split="eval")
    assert auto.summary.source == "builtin:lumen" and auto.summary.rows_read == held_out_rows()


def held_out_rows() -> int:
    from fasttune.data.sources import read_rows

    return sum(1 for _ in read_rows("builtin:lumen", split="eval"))
