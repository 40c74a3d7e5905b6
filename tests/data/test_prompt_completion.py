"""TRL's prompt-completion rows on the fasttune train path: the prompt used as written, the completion and
EOS trained, tokenized as TRL's SFTTrainer tokenizes them (through the notebook path, which is checked
against TRL row by row); conversational ones and chat templates are refused by name."""

from __future__ import annotations

import pytest

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows
from fasttune.data.tokenize import build_dataset
from fasttune.notebook.dataset import TextOptions, _prompt_completion_examples

ROWS = [{"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Q: What is 2 + 2?\nA:", "completion": " 4"},
        {"prompt": "", "completion": "A completion with an empty prompt."}]


def test_rows_are_detected_and_tokenized_as_trl_does(write_jsonl, smol_tok):
    cfg = DataConfig(dataset=str(write_jsonl(ROWS)))
    assert load_rows(cfg.dataset, cfg).format == "prompt_completion"
    ours = build_dataset(cfg, smol_tok, 256, "train").examples
    theirs = _prompt_completion_examples(ROWS, smol_tok, TextOptions(), smol_tok.eos_token, "rows")
    assert [e.input_ids for e in ours] == [e.input_ids for e in theirs]
    assert [e.labels for e in ours] == [e.labels for e in theirs]
    assert all(e.labels[-1] == smol_tok.eos_token_id for e in ours)


def test_conversational_rows_and_chat_templates_are_refused(write_jsonl, smol_tok):
    chat = write_jsonl([{"prompt": [{"role": "user", "content": "hi"}],
                         "completion": [{"role": "assistant", "content": "hello"}]}])
    with pytest.raises(DataError, match="conversational prompt/completion rows are not supported"):
        build_dataset(DataConfig(dataset=str(chat)), smol_tok, 256, "train")
    with pytest.raises(DataError, match="template 'chat' \\(or a chat_template\\) does not apply"):
        build_dataset(DataConfig(dataset=str(write_jsonl(ROWS)), template="chat"), smol_tok, 256, "train")
