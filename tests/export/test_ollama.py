"""export_ollama(): the Modelfile's TEMPLATE renders the training prompt, and its stops include EOS."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import gotemplate
from export_fixtures import CHATML, build_tokenizer, save_peft_adapter

from fasttune.data.templates import PromptContract, make_contract, render_prompt
from fasttune.export.ollama import export_ollama, ollama_template


def render_go(template: str, prompt: str, system: str = "", response: str | None = None) -> str:
    """One turn as Ollama renders a template without messages (.System, .Prompt, .Response).

    response None: the turn being generated, for which Ollama drops everything after {{ .Response }}.
    """
    cut = "\x00CUT\x00"
    data = {
        "Messages": [],
        "Prompt": prompt,
        "System": system,
        "Response": cut if response is None else response,
    }
    text = gotemplate.render(template, data)
    return text[: text.index(cut)] if response is None else text


def render_messages_go(template: str, messages: list[dict[str, str]]) -> str:
    """A conversation as Ollama renders it through .Messages."""
    return gotemplate.render(
        template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    )


def parse_modelfile(path: Path) -> dict:
    text = path.read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M).group(1)
    stops = [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, flags=re.M)]
    return {
        "from": re.search(r"^FROM (.+)$", text, flags=re.M).group(1),
        "template": template,
        "stops": stops,
    }


def test_chat_run_modelfile_renders_the_training_prompt(run_dir, tokenizer, tmp_path):
    modelfile = export_ollama(run_dir, tmp_path / "ollama", type="q8_0")
    mf = parse_modelfile(modelfile)
    assert (modelfile.parent / mf["from"]).is_file() and mf["from"] == "./model.gguf"
    assert (
        gguf.GGUFReader(modelfile.parent / "model.gguf").fields["general.architecture"].contents() == "llama"
    )
    contract = PromptContract.load(run_dir / "adapter" / "prompt_contract.json")
    question = "How many strings does the tide-harp have?"
    assert render_go(mf["template"], question) == render_prompt(question, "", contract, tokenizer)
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert render_go(mf["template"], question, system="Be terse.") == with_system
    # A finished turn ends with the end-of-turn token the model was trained to emit.
    assert render_go(mf["template"], question, response="Seven.").endswith("Seven.<|im_end|>")
    assert "<|im_end|>" in mf["stops"] and contract.eos_token in mf["stops"]


def test_alpaca_run_modelfile(alpaca_run, tokenizer, tmp_path):
    modelfile = export_ollama(alpaca_run, tmp_path / "ollama", type="f16")
    mf = parse_modelfile(modelfile)
    contract = PromptContract.load(alpaca_run / "adapter" / "prompt_contract.json")
    question = "Name the maker of the Lumen L-7."
    assert render_go(mf["template"], question) == render_prompt(question, "", contract, tokenizer)
    assert render_go(mf["template"], question).startswith("Below is an instruction")
    assert set(mf["stops"]) >= {contract.eos_token, "### Instruction:"}


def test_default_system_block_and_braces():
    """A template that inserts a default system turn (as SmolLM2's does) keeps it when Ollama has none."""
    template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault {{ '{{x}}' }} helper<|im_end|>\n"
        "{% endif %}" + CHATML
    )
    tokenizer = build_tokenizer()  # a fresh one: the session tokenizer is shared
    tokenizer.chat_template = template
    contract = make_contract("chat", "messages", tokenizer)
    tpl = ollama_template(contract, tokenizer)
    user = [{"role": "user", "content": "hi"}]
    assert render_go(tpl.template, "hi") == tokenizer.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True
    )
    assert "Default {{x}} helper" in render_go(tpl.template, "hi")
    assert "Default" not in render_go(tpl.template, "hi", system="Mine")
    assert tpl.stops[0] == "<|im_end|>"


def test_plain_model_dir_without_contract_uses_tokenizer_template(llama_dir, tokenizer, tmp_path):
    adapter = save_peft_adapter(llama_dir, tmp_path / "adapter", tokenizer=None)  # no tokenizer, no contract
    modelfile = export_ollama(adapter, tmp_path / "ollama", type="f16")
    mf = parse_modelfile(modelfile)
    user = [{"role": "user", "content": "x"}]
    assert render_go(mf["template"], "x") == tokenizer.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True
    )
    assert "<|im_end|>" in mf["stops"]


THREE_TURNS = [
    {"role": "system", "content": "Be terse. {{ not a Go action }}"},
    {"role": "user", "content": "How many strings does the tide-harp have?"},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And the frame?"},
    {"role": "assistant", "content": "Brass."},
    {"role": "user", "content": "Who makes it?"},
]


def test_chat_modelfile_renders_multi_turn_chats_as_training_does(run_dir, tokenizer, tmp_path):
    from fasttune.data.templates import render_messages

    mf = parse_modelfile(export_ollama(run_dir, tmp_path / "ollama", type="f16"))
    contract = PromptContract.load(run_dir / "adapter" / "prompt_contract.json")
    for messages in (THREE_TURNS, THREE_TURNS[1:], THREE_TURNS[1:2], THREE_TURNS[:2]):
        want = render_messages(messages, contract, tokenizer)
        assert render_messages_go(mf["template"], messages) == want
    # complete stops: the end of turn, EOS, and the opening of a new user turn
    assert {"<|im_end|>", contract.eos_token, "<|im_start|>user"} <= set(mf["stops"])


def test_default_system_block_in_multi_turn_chats():
    """SmolLM2-style: a default system turn when the conversation has none, the given one otherwise."""
    from fasttune.data.templates import render_messages

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault helper<|im_end|>\n{% endif %}"
        + CHATML
    )
    contract = make_contract("chat", "messages", tokenizer)
    tpl = ollama_template(contract, tokenizer)
    for messages in (THREE_TURNS, THREE_TURNS[1:]):
        assert render_messages_go(tpl.template, messages) == render_messages(messages, contract, tokenizer)
    assert "Default helper" in render_messages_go(tpl.template, THREE_TURNS[1:])
    assert "Default helper" not in render_messages_go(tpl.template, THREE_TURNS)


def test_alpaca_modelfile_renders_conversations_as_training_does(alpaca_run, tokenizer, tmp_path):
    from fasttune.data.templates import render_messages

    mf = parse_modelfile(export_ollama(alpaca_run, tmp_path / "ollama", type="f16"))
    contract = PromptContract.load(alpaca_run / "adapter" / "prompt_contract.json")
    for messages in (THREE_TURNS, THREE_TURNS[1:2]):
        assert render_messages_go(mf["template"], messages) == render_messages(messages, contract, tokenizer)


def test_template_that_does_not_split_into_turns_keeps_single_turn_and_warns():
    import pytest

    tokenizer = build_tokenizer()
    # numbers each user turn: the text around a user message differs from turn to turn
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[Q{{ loop.index }}] {{ m['content'] }}\n"
        "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    contract = make_contract("chat", "messages", tokenizer)
    with pytest.warns(UserWarning, match="single-turn prompts only"):
        tpl = ollama_template(contract, tokenizer)
    assert ".Messages" not in tpl.template and render_go(tpl.template, "hi") == "[Q1] hi\nA: "
