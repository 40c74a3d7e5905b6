"""train_on_responses_only: Unsloth's masking rules on token ids, and on a prepared SFTTrainer dataset."""

from __future__ import annotations

import pytest

from fasttune import train_on_responses_only
from fasttune.notebook import SFTTrainer
from fasttune.notebook.responses import response_labels

Q, A = [1, 2], [3, 4]  # instruction part, response part
_ = -100


@pytest.mark.parametrize("ids, want", [
    # one turn: the response runs to the end of the row
    ([9, 1, 2, 7, 3, 4, 5, 6, 8], [_, _, _, _, _, _, 5, 6, 8]),
    # two turns: the second instruction part ends the first response, which starts again after it
    ([1, 2, 7, 3, 4, 5, 1, 2, 7, 3, 4, 6, 8], [_, _, _, _, _, 5, _, _, _, _, _, 6, 8]),
    # no response part: nothing trained
    ([1, 2, 7, 5, 6], [_, _, _, _, _]),
    # the response part ends the row: nothing follows it to train
    ([1, 2, 7, 3, 4], [_, _, _, _, _]),
    # the last position ends a response even where an instruction part starts there
    ([3, 4, 5, 6, 1], [_, _, 5, 6, 1]),
    # after an instruction part the search resumes one token later: a response part right after it
    # is not seen (Unsloth's rule)
    ([3, 4, 5, 1, 2, 3, 4, 6], [_, _, 5, _, _, _, _, _]),
])
def test_response_labels_follow_unsloths_rules(ids, want):
    assert response_labels(ids, ids, Q, A) == want


def test_response_labels_keep_masks_already_there():
    ids = [3, 4, 5, 6, 7]
    assert response_labels(ids, [_, _, _, 6, 7], Q, A) == [_, _, _, 6, 7]


ALPACA = "Below is an instruction.\n\n### Instruction:\n{}\n\n### Response:\n{}"


def test_masks_a_prepared_notebook_dataset_to_its_responses(loaded, tokenizer):
    model, tok = loaded
    qa = [("Say hi", "hi there"), ("Count to three", "1 2 3")]
    rows = [{"text": ALPACA.format(q, a) + tok.eos_token} for q, a in qa]
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows)
    whole = [r["labels"] for r in trainer.train_dataset]
    assert trainer is train_on_responses_only(trainer, instruction_part="### Instruction:\n",
                                              response_part="### Response:\n")
    for (_, a), row, before in zip(qa, trainer.train_dataset, whole):
        trained = [t for t in row["labels"] if t != -100]
        assert tokenizer.decode(trained) == a + tok.eos_token
        assert before == row["input_ids"]  # trained whole until masked
    fn = train_on_responses_only(None, "### Instruction:\n", "### Response:\n", tokenizer=tok,
                                 return_function=True)
    batch = {"input_ids": [r["input_ids"] for r in trainer.train_dataset]}
    assert fn(batch)["labels"] == [r["labels"] for r in trainer.train_dataset]


def test_rows_without_a_response_are_dropped_and_none_at_all_is_an_error(loaded):
    model, tok = loaded
    rows = [{"text": ALPACA.format("q", "a")}, {"text": "no template here"}]
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows)
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        train_on_responses_only(trainer, "### Instruction:\n", "### Response:\n")
    assert len(trainer.train_dataset) == 1
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows[1:])
    with pytest.raises(ValueError, match="response_part='### Response:"):
        train_on_responses_only(trainer, "### Instruction:\n", "### Response:\n")


def test_arguments_it_cannot_honour_are_named(loaded):
    model, tok = loaded
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "x"}])
    with pytest.raises(ValueError, match="response_part"):
        train_on_responses_only(trainer, instruction_part="### Instruction:\n")
    with pytest.raises(ValueError, match="force_match=False"):
        train_on_responses_only(trainer, "a", "b", force_match=False)
