"""Prompt templates and the prompt contract."""

from __future__ import annotations

import pytest

from fasttune.data.errors import DataError
from fasttune.data.templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    PromptContract,
    encode_prompt,
    make_contract,
    render_messages,
    render_prompt,
    resolve_template,
)
from fasttune.data.tokenize import encode_row


def test_alpaca_strings_are_stanford_alpaca_verbatim():
    assert ALPACA_PROMPT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:\n")
    assert ALPACA_PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def test_render_prompt_alpaca_with_and_without_input(plain_tok):
    c = make_contract("auto", "alpaca", plain_tok)
    assert c.template == "alpaca"
    assert render_prompt("Add {x}", "", c, plain_tok).endswith("### Instruction:\nAdd {x}\n\n### Response:\n")
    with_input = render_prompt("Translate", "안녕", c, plain_tok)
    assert with_input.endswith("### Instruction:\nTranslate\n\n### Input:\n안녕\n\n### Response:\n")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")


def test_smollm2_chat_contract(smol_tok):
    c = make_contract("auto", "messages", smol_tok)
    assert (c.template, c.eos_id, c.eos_token, c.end_of_turn) == ("chat", 2, "<|im_end|>", "<|im_end|>")
    assert c.pad_id != c.eos_id  # SmolLM2 ships pad == eos; the contract picks another
    assert c.chat_template == smol_tok.chat_template and not c.add_bos
    assert c.stop_strings == ["<|im_end|>"]
    prompt = render_prompt("Hi", "", c, smol_tok)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_template_choice():
    assert resolve_template("auto", "alpaca") == "alpaca"
    assert resolve_template("chat", "alpaca") == "chat"
    assert resolve_template("auto", "messages") == "chat"
    assert resolve_template("alpaca", "text") == "text"
    with pytest.raises(DataError, match="messages rows always use the tokenizer's chat template"):
        resolve_template("alpaca", "messages")


def test_missing_chat_template_is_a_clear_error(plain_tok):
    with pytest.raises(DataError, match="no chat template, which messages rows need"):
        make_contract("auto", "messages", plain_tok)
    with pytest.raises(DataError, match="no chat template, which template 'chat' needs"):
        make_contract("chat", "alpaca", plain_tok)


def test_contract_round_trips_through_json(smol_tok, tmp_path):
    c = make_contract("chat", "alpaca", smol_tok)
    c.save(tmp_path / "prompt.json")
    assert PromptContract.load(tmp_path / "prompt.json") == c


@pytest.mark.parametrize("template,fixture", [("alpaca", "plain_tok"), ("chat", "smol_tok"),
                                              ("alpaca", "bos_tok")])
def test_generation_prompt_is_exactly_the_training_prefix(request, template, fixture):
    """What the model sees at inference is token for token what preceded the answer in training."""
    tok = request.getfixturevalue(fixture)
    c = make_contract(template, "alpaca", tok)
    row = {"instruction": "Name the river.", "input": "강 🌊", "output": "The Keel."}
    ex = encode_row(row, "alpaca", tok, c)
    prompt_ids = encode_prompt(render_prompt(row["instruction"], row["input"], c, tok), c, tok)
    first_trained = next(i for i, lab in enumerate(ex.labels) if lab != -100)
    assert ex.input_ids[:first_trained] == prompt_ids


def test_bos_contract_never_doubles(bos_tok):
    c = make_contract("auto", "alpaca", bos_tok)
    assert c.add_bos and c.bos_id == 256 and c.eos_id == 257 and c.pad_id == 258
    assert c.stop_strings == ["</s>", "### Instruction:"]
    assert encode_prompt("<s>hi", c, bos_tok).count(256) == 1
    assert encode_prompt("hi", c, bos_tok)[:1] == [256]


def test_render_messages_alpaca_history(plain_tok):
    c = make_contract("auto", "alpaca", plain_tok)
    text = render_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}], c, plain_tok)
    assert text == render_prompt("a", "", c, plain_tok) + "b\n\n" + render_prompt("c", "", c, plain_tok)


def test_a_contract_stored_as_completion_reads_back_as_text(plain_tok, tmp_path):
    """Runs and exports made before the plain-text template was renamed stored template 'completion'; every
    reader (generate, serve, export, the model card) loads it as 'text' and frames prompts the same way."""
    import json

    from fasttune.export.ollama import ollama_template
    from fasttune.model_card import facts_of
    from fasttune.run_dir import ADAPTER_CONFIG, CONTRACT_FILE

    c = make_contract("auto", "text", plain_tok)
    assert c.template == "text"
    stored = dict(c.to_dict(), template="completion")
    (tmp_path / CONTRACT_FILE).write_text(json.dumps(stored))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "base"}))
    loaded = PromptContract.load(tmp_path / CONTRACT_FILE)
    assert loaded == c
    assert render_prompt("Once upon", "", loaded, plain_tok) == "Once upon"
    assert ollama_template(loaded, plain_tok).template == "{{ .Prompt }}{{ .Response }}"
    assert facts_of(tmp_path).contract["template"] == "text"
    # the run.yaml of such a run, read back by generate/chat/serve (infer.load) and eval
    from fasttune.config import RunConfig
    from fasttune.infer.load import locate

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "base"}))
    RunConfig().save(run / "run.yaml")
    text = (run / "run.yaml").read_text()
    assert "format: auto" in text and "template: auto" in text
    (run / "run.yaml").write_text(text.replace("format: auto", "format: completion")
                                  .replace("template: auto", "template: completion"))
    assert locate(run).base.model_name == RunConfig().model.model_name
    with pytest.raises(DataError, match="template 'text' renders the plain prompts"):
        resolve_template("text", "alpaca")
