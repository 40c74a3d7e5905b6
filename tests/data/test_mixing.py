"""A list of datasets: each entry's format and columns apply to it alone, the realised mix follows the
weights, the mix is the same for the same config and seed, the held-out split works per entry, and bad
entries are errors that name the entry, file, row and field."""

from __future__ import annotations

from collections import Counter

import pytest

from fasttune.api import eval_config
from fasttune.config import (
    CHOICES,
    ConfigError,
    DataConfig,
    DatasetSpec,
    RunConfig,
    apply_overrides,
    load_yaml,
)
from fasttune.data import mixing
from fasttune.data.errors import DataError
from fasttune.data.tokenize import build_dataset

TEXT = "text" if "text" in CHOICES["format"] else "completion"  # the plain-text format's name


def _alpaca(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}?", "output": f"{tag} answer {i}."} for i in range(n)]


def _texts(data, tok) -> list[str]:
    return [tok.decode(e.input_ids) for e in data.examples]


def _cfg(entries, **kw) -> DataConfig:
    return apply_overrides(RunConfig(), {"data": {"dataset": entries, **kw}}, "test").data


def test_counts_are_the_weighted_shares_of_all_examples():
    assert mixing.mix_counts([100, 10], None) == [100, 10]  # no weights: each example once
    assert mixing.mix_counts([100, 10], [1, 1]) == [55, 55]
    assert mixing.mix_counts([40, 40], [3, 1]) == [60, 20]
    assert mixing.mix_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    counts = mixing.mix_counts([7, 5, 3], [0.5, 0.3, 0.2])  # 7.5, 4.5, 3.0: the tie goes to the first
    assert counts == [8, 4, 3] and sum(counts) == 15


def test_indices_repeat_whole_passes_then_draw_without_replacement():
    first, second = mixing.mix_indices([100, 10], [1, 1], seed=3)
    assert len(first) == 55 and len(set(first)) == 55  # a subset, no example twice
    per_example = Counter(second)
    assert sorted(per_example.values()) == [5] * 5 + [6] * 5  # 5 whole passes, then 5 drawn once more
    assert mixing.mix_indices([100, 10], [1, 1], seed=3) == [first, second]  # the same seed, the same mix
    assert mixing.mix_indices([100, 10], [1, 1], seed=4)[0] != first


def test_the_realised_mix_matches_the_weights(write_jsonl, smol_tok):
    a, b = write_jsonl(_alpaca("alpha", 30), "a.jsonl"), write_jsonl(_alpaca("beta", 10), "b.jsonl")
    cfg = _cfg([{"path": str(a), "weight": 0.25}, {"path": str(b), "weight": 0.75}])
    data = mixing.build_train(cfg, smol_tok, 256, seed=3407)
    texts = _texts(data, smol_tok)
    sources = Counter("alpha" if "alpha" in t else "beta" for t in texts)
    assert sources == {"alpha": 10, "beta": 30}  # 40 examples per epoch, a quarter from a.jsonl
    beta = Counter(t for t in texts if "beta" in t)
    assert len(beta) == 10 and set(beta.values()) == {3}  # every beta row three times
    assert len(set(t for t in texts if "alpha" in t)) == 10  # ten distinct alpha rows
    again = mixing.build_train(cfg, smol_tok, 256, seed=3407)
    assert _texts(again, smol_tok) == texts  # the same config and seed: the same mix
    assert data.summary.counts == [10, 30] and "weight 0.75" in str(data.summary)


def test_a_list_without_weights_is_the_concatenation(write_jsonl, smol_tok):
    a, b = write_jsonl(_alpaca("alpha", 4), "a.jsonl"), write_jsonl(_alpaca("beta", 3), "b.jsonl")
    mixed = mixing.build_train(_cfg([str(a), str(b)]), smol_tok, 256, seed=1)
    one = [build_dataset(DataConfig(dataset=str(p)), smol_tok, 256) for p in (a, b)]
    assert [e.input_ids for e in mixed.examples] == [e.input_ids for d in one for e in d.examples]


def test_one_string_is_built_as_it_always_was(write_jsonl, smol_tok):
    path = str(write_jsonl(_alpaca("alpha", 5)))
    cfg = _cfg([path])  # one plain value on the command line stays a plain string
    assert cfg.dataset == path
    mixed = mixing.build_train(cfg, smol_tok, 256, seed=1)
    plain = build_dataset(DataConfig(dataset=path), smol_tok, 256)
    assert [e.input_ids for e in mixed.examples] == [e.input_ids for e in plain.examples]
    assert str(mixed.summary) == str(plain.summary)


def test_format_and_columns_apply_to_their_entry_only(write_jsonl, smol_tok):
    # Both files carry the same columns; only the first entry reads question/answer as its alpaca columns,
    # and only the second is read as plain text.
    rows = [{"question": f"Q{i} mapped?", "answer": f"A{i} mapped.", "instruction": f"I{i} plain?",
             "output": f"O{i} plain.", "text": f"T{i} as text."} for i in range(3)]
    a, b = write_jsonl(rows, "a.jsonl"), write_jsonl(rows, "b.jsonl")
    cfg = _cfg([{"path": str(a), "columns": {"instruction": "question", "output": "answer"}},
                {"path": str(b), "format": TEXT}, str(a)])
    data = mixing.build_train(cfg, smol_tok, 256, seed=1)
    texts = _texts(data, smol_tok)
    assert all("mapped" in t and "plain" not in t for t in texts[:3])
    assert all(t.startswith("T") and "as text." in t and "###" not in t for t in texts[3:6])
    assert all("plain" in t and "mapped" not in t for t in texts[6:])  # the same file, no map
    assert data.contract.template == "alpaca"  # text rows fit the alpaca entries' contract


def test_trl_columns_are_renamed_per_entry(write_jsonl, smol_tok):
    a = write_jsonl([{"query": f"Say {i}:", "reply": f" {i} said."} for i in range(3)], "a.jsonl")
    data = mixing.build_train(_cfg([{"path": str(a), "columns": {"prompt": "query", "completion": "reply"}}]),
                              smol_tok, 256, seed=1)
    assert data.format == "prompt_completion" and "Say 0: 0 said." in _texts(data, smol_tok)[0]


def test_preference_pairs_mix_with_their_own_columns(write_jsonl, smol_tok):
    a = write_jsonl([{"prompt": f"alpha {i}?", "chosen": "yes.", "rejected": "no."} for i in range(6)],
                    "a.jsonl")
    b = write_jsonl([{"question": f"beta {i}?", "good": "yes.", "bad": "no."} for i in range(2)], "b.jsonl")
    cfg = _cfg([{"path": str(a), "weight": 1},
                {"path": str(b), "weight": 1, "columns": {"prompt": "question", "chosen": "good",
                                                          "rejected": "bad"}}])
    data = mixing.build_method_train(cfg, "dpo", smol_tok, 256, None, seed=5)
    texts = [smol_tok.decode(e.chosen.input_ids) for e in data.examples]
    assert len(texts) == 8 and sum("beta" in t for t in texts) == 4  # 2 pairs, each twice
    assert data.summary.counts == [4, 4] and data.summary.examples == 8
    with pytest.raises(DataError, match=r"^dataset\[2\] .*b.jsonl, row 1, field 'worse': missing"):
        columns = {"prompt": "question", "chosen": "good", "rejected": "worse"}
        cfg = _cfg([str(a), {"path": str(b), "columns": columns}])
        mixing.build_method_train(cfg, "dpo", smol_tok, 256, None, seed=5)


def test_held_out_text_rows_are_rendered_as_written_beside_chat_rows(write_jsonl, smol_tok):
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
            for i in range(10)]
    a = write_jsonl(chat, "a.jsonl")
    b = write_jsonl([{"text": f"plain words {i}"} for i in range(10)], "b.jsonl")
    cfg = _cfg([str(a), str(b)], val_set_size=0.2)
    train = mixing.build_train(cfg, smol_tok, 256, seed=1)
    assert train.contract.template == "chat" and len(train.examples) == 16
    held = mixing.build_eval(eval_config(cfg), smol_tok, 256, train.contract)
    texts = _texts(held, smol_tok)
    assert len(texts) == 4 and sum("<|im_start|>" in t for t in texts) == 2
    assert sum(t.startswith("plain words") for t in texts) == 2  # no chat frame around text rows


def test_entries_that_need_different_templates_are_an_error(write_jsonl, smol_tok):
    a = write_jsonl(_alpaca("alpha", 3), "a.jsonl")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    b = write_jsonl([{"messages": chat}], "b.jsonl")
    with pytest.raises(ConfigError, match=r"dataset\[1\] .*a.jsonl \(alpaca rows.*dataset\[2\] .*b.jsonl "
                                          r"\(messages rows.*set template chat"):
        mixing.build_train(_cfg([str(a), str(b)]), smol_tok, 256, seed=1)
    chat = mixing.build_train(_cfg([str(a), str(b)], template="chat"), smol_tok, 256, seed=1)
    assert chat.contract.template == "chat" and len(chat.examples) == 4


def test_bad_rows_and_columns_name_the_entry_file_row_and_field(write_jsonl, smol_tok):
    a = write_jsonl(_alpaca("alpha", 3), "a.jsonl")
    rows = [{"question": "q?", "answer": "a."}, {"question": "q?", "answer": "a."}, {"question": "q?"}]
    b = write_jsonl(rows, "b.jsonl")
    cfg = _cfg([str(a), {"path": str(b), "columns": {"instruction": "question", "output": "answer"}}])
    with pytest.raises(DataError, match=r"^dataset\[2\] .*b.jsonl, row 3, field 'answer': missing"):
        mixing.build_train(cfg, smol_tok, 256, seed=1)
    c = write_jsonl([{"prompt": "p", "reply": "r"}, {"prompt": "p"}], "c.jsonl")
    cfg = _cfg([str(a), {"path": str(c), "columns": {"completion": "reply"}}])
    with pytest.raises(DataError, match=r"^dataset\[2\] .*c.jsonl, row 2, field 'reply': missing"):
        mixing.build_train(cfg, smol_tok, 256, seed=1)
    d = write_jsonl([{"instruction": "q?", "output": "a."}], "d.jsonl")
    cfg = _cfg([str(a), {"path": str(d), "columns": {"input": "context"}}])
    with pytest.raises(DataError, match=r"^dataset\[2\] .*d.jsonl, field 'context': column 'context' "
                                        r"\(columns.input\) is not in any row"):
        mixing.build_train(cfg, smol_tok, 256, seed=1)


@pytest.mark.parametrize("entries, match", [
    ([{"path": "a.jsonl", "wieght": 1}], r"dataset\[1\]: unknown key 'wieght'"),
    ([{"path": "a.jsonl", "weight": -1}], r"dataset\[1\] \(a.jsonl\).weight: must be a positive number"),
    ([{"path": "a.jsonl", "weight": 0}], r"dataset\[1\] \(a.jsonl\).weight: must be a positive number"),
    ([{"path": "a.jsonl", "weight": 1}, "b.jsonl"], r"dataset\[2\] \(b.jsonl\): no weight"),
    ([{"path": "a.jsonl", "columns": {"answer": "x"}}], r"dataset\[1\] \(a.jsonl\).columns: unknown column"),
    ([{"path": "a.jsonl", "format": "alpacca"}], r"dataset\[1\] \(a.jsonl\).format: 'alpacca' is not one"),
    ([{"weight": 1}], r"dataset\[1\]: 'path' must name"),
    ([{"path": "a.jsonl", "format": "completion"}], r"dataset\[1\] \(a.jsonl\).format: 'completion': plain"),
    ([{"path": "a.jsonl", "weight": True}], r"dataset\[1\] \(a.jsonl\).weight: expected a number"),
    ([{"path": "a.jsonl", "streaming": True}], r"dataset\[1\] \(a.jsonl\).streaming: .*set max_rows"),
])
def test_bad_entries_are_config_errors(entries, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(entries)


def test_streaming_with_a_held_out_share_is_an_error():
    with pytest.raises(ConfigError, match=r"streaming: val_set_size .* give eval_dataset a file"):
        _cfg([{"path": "a.jsonl", "streaming": True, "max_rows": 5}], val_set_size=0.1)


def test_a_held_out_share_of_a_list_comes_from_every_entry(write_jsonl, smol_tok):
    a, b = write_jsonl(_alpaca("alpha", 40), "a.jsonl"), write_jsonl(_alpaca("beta", 20), "b.jsonl")
    cfg = _cfg([{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}], val_set_size=0.1)
    train = mixing.build_train(cfg, smol_tok, 256, seed=1)
    held = mixing.build_eval(eval_config(cfg), smol_tok, 256, train.contract)
    held_texts, train_texts = set(_texts(held, smol_tok)), set(_texts(train, smol_tok))
    assert sum("alpha" in t for t in held_texts) == 4 and sum("beta" in t for t in held_texts) == 2
    assert not held_texts & train_texts
    assert len(train.examples) == 54 and train.summary.counts == [27, 27]  # the mix of the 36 + 18 left
    rows = mixing.eval_rows(eval_config(cfg))  # the questions scored at eval: the same held-out rows
    assert len(rows) == 6 and all(any(r["instruction"] in t for t in held_texts) for r in rows)


def test_the_recorded_config_lists_every_entry_and_reads_back(tmp_path):
    cfg = RunConfig()
    apply_overrides(cfg, {"dataset": [{"path": "a.jsonl", "weight": 0.7, "columns": {"output": "answer"}},
                                      {"path": "json", "data_files": ["b.jsonl"], "weight": 0.3}]}, "test")
    cfg.save(tmp_path / "run.yaml")
    text = (tmp_path / "run.yaml").read_text()
    assert "weight: 0.7" in text and "streaming" not in text  # keys left at their default are not written
    again = load_yaml(tmp_path / "run.yaml")
    assert again.data.dataset == cfg.data.dataset
    assert again.data.dataset[1] == DatasetSpec(path="json", weight=0.3, data_files=["b.jsonl"])


def test_the_command_line_takes_several_datasets():
    from fasttune.cli import build_parser
    from fasttune.config import config_from_args

    parse = lambda *values: config_from_args(build_parser().parse_args(["train", "--dataset", *values]))
    both = [DatasetSpec(path="a.jsonl"), DatasetSpec(path="b.jsonl")]
    assert parse("a.jsonl", "b.jsonl").data.dataset == both
    got = parse("{path: a.jsonl, weight: 1}", "{path: b.jsonl, weight: 2, format: alpaca}").data.dataset
    assert got == [DatasetSpec(path="a.jsonl", weight=1.0), DatasetSpec(path="b.jsonl", weight=2.0,
                                                                        format="alpaca")]
    with pytest.raises(ConfigError, match=r"command line: dataset\[1\] \(a.jsonl\): no weight"):
        parse("a.jsonl", "{path: b.jsonl, weight: 2}")


@pytest.mark.slow
def test_a_run_trains_on_a_weighted_list_and_records_it(tmp_path, write_jsonl, capsys):
    import shutil
    import sys
    from pathlib import Path

    import yaml

    from fasttune import api
    from fasttune.train.metrics import read_metrics

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_run import write_tiny_llama

    a, b = write_jsonl(_alpaca("alpha", 20), "a.jsonl"), write_jsonl(_alpaca("beta", 10), "b.jsonl")
    lines: list[str] = []
    values = dict(model_name=str(write_tiny_llama(tmp_path / "tiny")), max_steps=4, save_steps=2, r=4,
                  logging_steps=1, eval_steps=0, show_samples=1, eval_answers=1, report=False,
                  output_dir=str(tmp_path / "run"),
                  val_set_size=0.1, dataset=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}])
    api.train(apply_overrides(RunConfig(), values, "test"), log=lines.append)
    log = "\n".join(lines)
    metrics = tmp_path / "run" / "metrics.jsonl"
    losses = [r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"]

    # A crash after step 2: the resumed run rebuilds the same mix and continues the same sequence.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    api.train(apply_overrides(RunConfig(), {**values, "resume": True}, "test"), log=lambda line: None)
    again = [r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"]
    assert len(again) == 4 and max(abs(x - y) for x, y in zip(losses, again)) < 1e-5
    assert "in the mix: 20 of each epoch's 27 examples (weight 3, 74.1%, from its 18)" in log
    assert "eval data: 2 datasets" in log
    recorded = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["data"]["dataset"]
    assert recorded == [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"`{a}` (weight 3.0)" in card and f"`{b}` (weight 1.0)" in card
    from fasttune.cli import main

    assert main(["eval", "--run", str(tmp_path / "run"), "--no_answers"]) == 0  # the same held-out rows
    assert f"evaluating on 3 rows of split:0.1 of {a} (weight 3), {b} (weight 1)" in capsys.readouterr().err


def test_entries_built_in_python_are_checked_as_yaml_entries_are():
    from fasttune.config import validate

    cfg = RunConfig()
    cfg.data.dataset = [DatasetSpec(path="a.jsonl", weight=1.0), "b.jsonl"]
    with pytest.raises(ConfigError, match=r"dataset\[2\] \(b.jsonl\): no weight"):
        validate(cfg)
    cfg.data.dataset = [DatasetSpec(path="a.jsonl", weight=1.0), {"path": "b.jsonl", "weight": 2}]
    validate(cfg)
    assert cfg.data.dataset == [DatasetSpec(path="a.jsonl", weight=1.0),
                                DatasetSpec(path="b.jsonl", weight=2.0)]
    cfg.data.dataset = ["a.jsonl"]
    validate(cfg)
    assert cfg.data.dataset == "a.jsonl"
