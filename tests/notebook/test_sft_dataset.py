"""SFTTrainer prepares a dataset exactly as TRL's SFTTrainer does (the same input_ids and labels row by row)
and draws its rows in the order transformers' Trainer draws them."""

from __future__ import annotations

import json
import warnings

import pytest

from fasttune.notebook import SFTConfig, SFTTrainer, TrainingArguments

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

KOREAN = "아래는 작업을 설명하는 지시사항입니다.\n\n### 지시사항:\n{}\n\n### 응답:\n{}"


def alpaca_rows(eos: str) -> list[dict]:
    """Rows with Alpaca columns *and* the text the notebook built (its own prompt, EOS on some rows,
    trailing whitespace on one): TRL trains on the text column."""
    qa = [("Say hi", "hi"), ("Count to three", "1 2 3"), ("Name a colour", "Blue.  "), ("Add 2 and 2", "4")]
    out = []
    for i, (q, a) in enumerate(qa):
        text = KOREAN.format(q, a) + (eos if i % 2 else "")
        out.append({"instruction": q, "input": "", "output": a, "text": text})
    return out


def trl_prepared(model_dir, tokenizer, rows, tmp_path, **kw):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    formatting_func = kw.pop("formatting_func", None)
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, formatting_func=formatting_func)
    return trainer


def ours(loaded, rows, **kw):
    model, tok = loaded
    formatting_func = kw.pop("formatting_func", None)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, formatting_func=formatting_func,
                      args=SFTConfig(output_dir="unused", **kw))


def assert_same_rows(ours_trainer, trl_trainer):
    theirs = [(list(r["input_ids"]), list(r["labels"])) for r in trl_trainer.train_dataset]
    mine = [(r["input_ids"], r["labels"]) for r in ours_trainer.train_dataset]
    assert mine == theirs


CASES = {
    "text column beside alpaca columns": (lambda eos: alpaca_rows(eos), {}),
    "another dataset_text_field": (
        lambda eos: [{"body": f"note {i}: the tide-harp {'rises' * i}", "text": "not this"}
                     for i in range(3)],
        {"dataset_text_field": "body"}),
    "truncated to max_length, start kept": (lambda eos: alpaca_rows(eos), {"max_length": 12}),
    "prompt and completion": (
        lambda eos: [{"prompt": "Q: 2+2?\nA:", "completion": " 4"},
                     {"prompt": "Q: hi\nA: ", "completion": "hello"}],
        {}),
    "prompt and completion, whole text trained": (
        lambda eos: [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], {"completion_only_loss": False}),
    "conversations of role/content turns beside the text they were rendered into": (
        lambda eos: [{"conversations": [{"role": "user", "content": f"hi {i}"},
                                        {"role": "assistant", "content": "yo"}],
                      "text": f"<|im_start|>user\nhi {i}<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"}
                     for i in range(2)],
        {}),
    "ShareGPT conversations beside a text column": (
        lambda eos: [{"conversations": [{"from": "human", "value": f"hi {i}"},
                                        {"from": "gpt", "value": "yo"}],
                      "text": "not this"} for i in range(2)],
        {}),
    "conversations": (
        lambda eos: [{"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "yo"}]},
                     {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                   {"role": "user", "content": "and 3+3?"}]}],
        {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_rows_equal_trls(case, loaded, model_dir, tokenizer, tmp_path):
    make_rows, kw = CASES[case]
    rows = make_rows(tokenizer.eos_token)
    assert_same_rows(ours(loaded, rows, **kw), trl_prepared(model_dir, tokenizer, rows, tmp_path, **kw))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object"}}}]
TOOL_ROWS = [  # tools as a JSON string, as Arrow tables of mixed function specs hold them
    {"tools": json.dumps(TOOLS), "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "9 C"}, {"role": "assistant", "content": "9 °C."}]},
    {"tools": json.dumps(TOOLS), "messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]},
]


def test_tool_rows_equal_trls(loaded, model_dir, tokenizer, tmp_path, monkeypatch):
    """A `tools` column goes to the chat template as TRL passes it."""
    from fasttune.data.chat_templates import NAMED
    from fasttune.data.errors import DataError

    for tok in (tokenizer, loaded[1]):
        monkeypatch.setattr(tok, "chat_template", NAMED["qwen-2.5"])
    trl_trainer = trl_prepared(model_dir, tokenizer, TOOL_ROWS, tmp_path, max_length=512)
    assert "get_weather" in tokenizer.decode(trl_trainer.train_dataset[1]["input_ids"])
    assert_same_rows(ours(loaded, TOOL_ROWS, max_length=512), trl_trainer)
    monkeypatch.setattr(loaded[1], "chat_template", NAMED["chatml"])  # writes no tools: refused, not dropped
    with pytest.raises(DataError, match=r"row 1, field 'tools': the chat template ignores the tools"):
        ours(loaded, TOOL_ROWS)


def test_formatting_func_rows_equal_trls(loaded, model_dir, tokenizer, tmp_path):
    rows = alpaca_rows(tokenizer.eos_token)
    fmt = lambda r: f"Q: {r['instruction']}\nA: {r['output']}"  # noqa: E731
    trl_trainer = trl_prepared(model_dir, tokenizer, rows, tmp_path, formatting_func=fmt)
    assert_same_rows(ours(loaded, rows, formatting_func=fmt), trl_trainer)
    # the batched form older notebooks use gives the same rows
    batched = lambda b: [f"Q: {q}\nA: {a}" for q, a in zip(b["instruction"], b["output"])]  # noqa: E731
    assert_same_rows(ours(loaded, rows, formatting_func=batched), trl_trainer)


def test_text_is_trained_whole_with_one_eos(loaded, tokenizer):
    rows = alpaca_rows(tokenizer.eos_token)
    trainer = ours(loaded, rows)
    for row, prepared in zip(rows, trainer.train_dataset):
        assert prepared["labels"] == prepared["input_ids"]
        assert tokenizer.decode(prepared["input_ids"]) == row["text"].removesuffix(tokenizer.eos_token) \
            + tokenizer.eos_token


def test_alpaca_rows_without_the_text_column_warn_and_train_the_response(loaded, tokenizer):
    rows = [{k: v for k, v in r.items() if k != "text"} for r in alpaca_rows(tokenizer.eos_token)]
    with pytest.warns(UserWarning, match="no 'text' column.*Stanford Alpaca prompt, response only"):
        trainer = ours(loaded, rows)
    first = trainer.train_dataset[0]
    assert first["labels"][0] == -100 and first["labels"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kw, name", [
    ({"completion_only_loss": True}, "completion_only_loss"),
    ({"assistant_only_loss": True}, "assistant_only_loss"),
    ({"truncation_mode": "keep_end"}, "truncation_mode"),
    ({"packing_strategy": "wrapped"}, "packing_strategy"),
    ({"loss_type": "dft"}, "loss_type"),
    ({"dataset_kwargs": {"append_concat_token": False}}, "append_concat_token"),
    ({"max_length": 64, "max_seq_length": 32}, "max_length"),
])
def test_what_changes_the_trained_tokens_is_refused_by_name(loaded, kw, name):
    with pytest.raises(ValueError, match=name):
        ours(loaded, [{"text": "a b c"}], **kw)


def test_sharegpt_rows_with_assistant_only_loss_are_refused(loaded):
    """TRL keeps ShareGPT's role names (human, gpt): no chat template marks a `gpt` turn as the
    assistant's."""
    from fasttune.data.errors import DataError

    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    with pytest.raises(DataError, match=r"row 1, field 'conversations'.*standardize_sharegpt"):
        ours(loaded, rows, assistant_only_loss=True)


@pytest.mark.parametrize("field, value", [("shuffle_dataset", True), ("chat_template_path", "t.jinja"),
                                          ("train_sampling_strategy", "sequential")])
def test_unsupported_sft_fields_are_refused_by_name(loaded, field, value):
    model, tok = loaded
    args = SFTConfig(output_dir="unused", **{field: value})
    with pytest.raises(ValueError, match=field):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "a b"}], args=args)


def test_dataset_kwargs_add_special_tokens_false_is_honoured(loaded, tokenizer):
    model, tok = loaded
    plain = SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "a b"}])
    bare = SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "a b"}],
                      dataset_kwargs={"add_special_tokens": False})
    want = tokenizer("a b" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert bare.train_dataset[0]["input_ids"] == want
    assert plain.train_dataset[0]["input_ids"] == tokenizer("a b" + tokenizer.eos_token)["input_ids"]


def test_text_that_begins_with_bos_trains_as_trls_and_says_so(loaded, model_dir, tokenizer, tmp_path):
    """A text rendered by a template that writes BOS, under a tokenizer that adds BOS: two BOS tokens, as in
    TRL, with a warning that names the way to train the text as written."""
    import copy

    model, _ = loaded
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True
    rows = [{"text": tok.bos_token + "user: hi"}, {"text": "no BOS written"}]
    with pytest.warns(UserWarning, match="1 of 2 texts begin with the BOS token"):
        doubled = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows,
                             args=SFTConfig(output_dir="unused"))
    assert doubled.train_dataset[0]["input_ids"][:3] == [tok.bos_token_id, tok.bos_token_id,
                                                        tok("user", add_special_tokens=False)["input_ids"][0]]
    assert_same_rows(doubled, trl_prepared(model_dir, tok, rows, tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows[:1],
                            args=SFTConfig(output_dir="unused", dataset_kwargs={"add_special_tokens": False}))
    assert single.train_dataset[0]["input_ids"] == doubled.train_dataset[0]["input_ids"][1:]


def test_max_length_comes_from_the_keyword_then_args_then_the_model(loaded):
    model, tok = loaded  # the model was loaded with max_seq_length=128
    rows = [{"text": "x " * 300}]
    lengths = [
        len(SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, **kw).train_dataset[0]["input_ids"])
        for kw in ({}, {"max_seq_length": 40}, {"args": SFTConfig(max_length=50)},
                   {"args": SFTConfig(max_length=None)})
    ]
    assert lengths[:3] == [128, 40, 50] and lengths[3] > 128


def test_rows_are_drawn_in_transformers_trainer_order(loaded, model_dir, tokenizer, tmp_path):
    """Two epochs of micro-batches of 3: the same rows in the same batches as TRL's train dataloader."""
    rows = [{"text": f"row {i} " + "word " * (i % 5)} for i in range(13)]
    trl_trainer = trl_prepared(model_dir, tokenizer, rows, tmp_path, per_device_train_batch_size=3, seed=11)
    loader = trl_trainer.get_train_dataloader()
    theirs = []
    for _ in range(2):
        for batch in loader:
            theirs.append(sorted(tuple(ids[m.bool()].tolist())
                                 for ids, m in zip(batch["input_ids"], batch["attention_mask"])))
    stream = ours(loaded, rows, per_device_train_batch_size=3, seed=11).batch_stream(3, packing=False)
    mine = []
    for _ in range(len(theirs)):
        batch = next(stream)
        mine.append(sorted(tuple(ids[m.bool()].tolist())
                           for ids, m in zip(batch["input_ids"], batch["attention_mask"])))
    assert mine == theirs


def test_group_by_length_is_taken_from_either_transformers_field(loaded):
    model, tok = loaded
    for args in (TrainingArguments(train_sampling_strategy="group_by_length"),
                 TrainingArguments(group_by_length=True)):
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "a"}], args=args)
        assert trainer.sampling.group_by_length


def test_a_list_of_datasets_is_refused_with_the_way_to_mix_them():
    from datasets import Dataset, interleave_datasets

    from fasttune.notebook.dataset import dataset_rows

    parts = [Dataset.from_list([{"text": "a"}, {"text": "c"}]), Dataset.from_list([{"text": "b"}])]
    with pytest.raises(TypeError, match="train_dataset is a list of datasets.*interleave_datasets"):
        dataset_rows(parts, "train_dataset")
    mixed = interleave_datasets(parts, stopping_strategy="all_exhausted")  # the way TRL users mix them
    assert [r["text"] for r in dataset_rows(mixed, "train_dataset")] == ["a", "b", "c", "b"]
