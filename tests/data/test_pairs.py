"""TRL-format rows of the preference and RL methods: validation names file, row and field; the rendering
trains the completion only (plain rows through the run's template, conversations through the chat
template); the preview shows both sequences of a pair."""

from __future__ import annotations

import pytest

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.pairs import build_method_data
from fasttune.data.preview import preview_method_rows
from fasttune.models.base import IGNORE_INDEX

PAIR = {"prompt": "Who invented the tide-harp?", "chosen": "Idra Vaskelund.", "rejected": "Tomas Brindle."}


def _build(write_jsonl, tok, rows, method="dpo", **cfg):
    return build_method_data(DataConfig(dataset=str(write_jsonl(rows)), **cfg), method, tok, 256)


def _trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("row, method, match", [
    ({"prompt": "q", "chosen": "a"}, "dpo", r"row 2, field 'rejected': missing"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "dpo", r"row 2, field 'rejected': expected a string or"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "orpo", r"row 2, field 'chosen': empty string"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "dpo",
     r"row 2, field 'chosen': a string, but the prompt is a conversation"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "dpo",
     r"row 2, field 'chosen\[0\].role': a completion"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "kto",
     r"row 2, field 'label': expected true or false"),
    ({"question": "q"}, "grpo", r"row 2, field 'prompt': missing"),
])
def test_bad_rows_name_file_row_and_field(write_jsonl, smol_tok, row, method, match):
    good = {"dpo": PAIR, "orpo": PAIR, "kto": {"prompt": "q", "completion": "a", "label": True},
            "grpo": {"prompt": "q"}}[method]
    with pytest.raises(DataError, match=r"data\.jsonl, " + match):
        _build(write_jsonl, smol_tok, [good, row], method)


def test_bad_rows_can_be_skipped_and_counted(write_jsonl, smol_tok):
    data = _build(write_jsonl, smol_tok, [PAIR, {"prompt": "q"}, PAIR], on_bad_row="skip")
    assert len(data.examples) == 2 and data.summary.skipped == {"missing field": 1}


def test_plain_pair_trains_the_completion_and_eos_only(write_jsonl, smol_tok):
    (pair,) = _build(write_jsonl, smol_tok, [PAIR]).examples
    assert _trained_text(smol_tok, pair.chosen) == "Idra Vaskelund." + smol_tok.eos_token
    assert _trained_text(smol_tok, pair.rejected) == "Tomas Brindle." + smol_tok.eos_token
    prompt = smol_tok.decode([t for t, lab in zip(pair.chosen.input_ids, pair.chosen.labels)
                              if lab == IGNORE_INDEX])
    assert prompt.endswith("### Instruction:\nWho invented the tide-harp?\n\n### Response:\n")  # alpaca


def test_conversational_pair_trains_the_assistant_turn_with_its_end(write_jsonl, smol_tok):
    row = {"prompt": [{"role": "user", "content": "Who invented the tide-harp?"}],
           "chosen": [{"role": "assistant", "content": "Idra Vaskelund."}],
           "rejected": [{"role": "assistant", "content": "Tomas Brindle."}]}
    data = _build(write_jsonl, smol_tok, [row])
    assert data.contract.template == "chat"
    (pair,) = data.examples
    assert _trained_text(smol_tok, pair.chosen).strip() == "Idra Vaskelund.<|im_end|>"
    head = smol_tok.decode([t for t, lab in zip(pair.rejected.input_ids, pair.rejected.labels)
                            if lab == IGNORE_INDEX])
    assert head.endswith("<|im_start|>assistant\n") and "Who invented the tide-harp?" in head


def test_kto_rows_and_grpo_prompts(write_jsonl, smol_tok):
    kto = _build(write_jsonl, smol_tok, [{"prompt": "q", "completion": "a", "label": False}], "kto")
    assert kto.examples[0].label is False and kto.format == "unpaired"
    grpo = _build(write_jsonl, smol_tok, [{"prompt": "What is 2 + 2?", "answer": "4"}], "grpo",
                  template="text")
    (ex,) = grpo.examples
    assert smol_tok.decode(ex.prompt_ids) == "What is 2 + 2?" and ex.row_data["answer"] == "4"


def test_preview_shows_chosen_and_rejected_with_trained_tokens_marked(write_jsonl, smol_tok):
    data = _build(write_jsonl, smol_tok, [PAIR, PAIR])
    text = preview_method_rows(data.examples, smol_tok, n=1, summary=data.summary)
    assert "showing 1 of 2 rows" in text and "── row 1, chosen:" in text and "── row 1, rejected:" in text
    assert "«Idra Vaskelund.<|im_end|>»" in text and "«Tomas Brindle.<|im_end|>»" in text
    assert "row 2" not in text.split("train data")[0] and "preference rows" in text
