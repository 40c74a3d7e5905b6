"""Unsloth's get_chat_template and standardize_sharegpt: each name renders Unsloth's format through the
tokenizer's own apply_chat_template, ShareGPT rows become role/content messages, and what cannot be honoured
(a vocabulary rewrite, a name not provided, a system message with nowhere to go, a bad row) is an error."""

from __future__ import annotations

import copy
import re

import pytest
from datasets import Dataset, IterableDataset

from fasttune import get_chat_template, standardize_data_formats, standardize_sharegpt
from fasttune.data.chat_templates import render
from fasttune.notebook.chat_templates import TEMPLATES

CHAT = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "Hello!"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *CHAT]

HEAD = "<|start_header_id|>{}<|end_header_id|>\n\n"
LLAMA_31_CHAT = (HEAD.format("system") + "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\n"
                 "<|eot_id|>" + HEAD.format("user") + "Hi <|eot_id|>" + HEAD.format("assistant")
                 + "Hello!<|eot_id|>")


@pytest.fixture
def tok(tokenizer):
    return copy.deepcopy(tokenizer)   # SmolLM2's: bos <|im_start|>, eos <|im_end|>


def test_llama_31_is_unsloths_format_through_apply_chat_template(tok):
    tok = get_chat_template(tok, chat_template="llama-3.1")
    bos = tok.bos_token
    assert tok.apply_chat_template(CHAT, tokenize=False) == bos + LLAMA_31_CHAT
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        bos + LLAMA_31_CHAT.split("Hi ")[0] + "Hi <|eot_id|>" + HEAD.format("assistant"))
    # the conversation's system turn, else system_message, follows the dates; date_string replaces the date
    with_system = tok.apply_chat_template(SYSTEM, tokenize=False, date_string="1 May 2025")
    assert with_system == bos + LLAMA_31_CHAT.replace("26 July 2024\n\n", "1 May 2025\n\nBe brief.")
    tok = get_chat_template(tok, chat_template="llama-3.2", system_message="You answer in Korean.")
    assert tok.apply_chat_template(CHAT, tokenize=False) == bos + LLAMA_31_CHAT.replace(
        "2024\n\n", "2024\n\nYou answer in Korean.")


def test_llama_31_refuses_tools_rather_than_dropping_them(tok):
    from jinja2.exceptions import TemplateError

    tok = get_chat_template(tok, chat_template="llama-3.1")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(TemplateError, match="does not write tools"):
        tok.apply_chat_template(CHAT, tools=tools, tokenize=False)
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    with pytest.raises(TemplateError, match="does not write tools"):
        tok.apply_chat_template([CHAT[0], call], tokenize=False)


def test_named_formats(tok):
    chatml = "<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert get_chat_template(tok, "chatml").apply_chat_template(CHAT, tokenize=False) == chatml
    qwen = get_chat_template(tok, "qwen2.5", system_message="Answer kindly.")
    assert qwen.apply_chat_template(CHAT, tokenize=False) == \
        "<|im_start|>system\nAnswer kindly.<|im_end|>\n" + chatml
    assert get_chat_template(tok, "qwen-2.5").apply_chat_template(CHAT, tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")
    assert get_chat_template(tok, "llama3").apply_chat_template(CHAT, tokenize=False) == \
        tok.bos_token + HEAD.format("user") + "Hi<|eot_id|>" + HEAD.format("assistant") + "Hello!<|eot_id|>"
    assert get_chat_template(tok, "phi-3.5").apply_chat_template(CHAT, tokenize=False) == \
        "<|user|>\nHi <|end|>\n<|assistant|>\nHello!<|end|>\n"
    # Unsloth's chatml writes every role but user and assistant as system
    tool_turn = [CHAT[0], {"role": "tool", "content": "42"}]
    assert get_chat_template(tok, "chatml").apply_chat_template(tool_turn, tokenize=False) == \
        "<|im_start|>user\nHi <|im_end|>\n<|im_start|>system\n42<|im_end|>\n"
    alpaca = get_chat_template(tok, "alpaca").apply_chat_template(CHAT, tokenize=False)
    assert alpaca == (tok.bos_token + "Below are some instructions that describe some tasks. Write responses "
                      "that appropriately complete each request.\n\n### Instruction:\nHi \n\n### Response:\n"
                      "Hello!" + tok.eos_token + "\n\n")
    assert get_chat_template(tok, "mistral").apply_chat_template(SYSTEM, tokenize=False) == \
        tok.bos_token + "[INST] Be brief. Hi  [/INST]Hello!" + tok.eos_token
    gemma = get_chat_template(tok, "gemma", map_eos_token=False)
    assert gemma.apply_chat_template(SYSTEM, tokenize=False, add_generation_prompt=True) == (
        tok.bos_token + "<start_of_turn>user\nBe brief. Hi<end_of_turn>\n<start_of_turn>model\nHello!"
        "<end_of_turn>\n<start_of_turn>model\n")
    gemma_3 = get_chat_template(tok, "gemma-3")
    assert gemma_3.apply_chat_template(SYSTEM, tokenize=False) == (
        tok.bos_token + "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
        "<end_of_turn>\n")
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        gemma_3.apply_chat_template([CHAT[0], CHAT[0]], tokenize=False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_name_renders_alike_in_transformers_and_in_fasttunes_sandbox(tok, name):
    tok = get_chat_template(tok, chat_template=name, map_eos_token=False)
    ours = render(tok.chat_template, SYSTEM, bos_token=tok.bos_token, eos_token=tok.eos_token,
                  add_generation_prompt=True)
    assert ours == tok.apply_chat_template(SYSTEM, tokenize=False, add_generation_prompt=True)
    assert "Hello!" in ours and "Be brief." in ours


def test_mapping_reads_sharegpt_messages_as_they_are(tok):
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tok = get_chat_template(tok, chat_template="llama-3.1", mapping=mapping)
    sharegpt = [{"from": "human", "value": "Hi "}, {"from": "gpt", "value": "Hello!"}]
    assert tok.apply_chat_template(sharegpt, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.apply_chat_template(CHAT, tokenize=False) == tok.bos_token + LLAMA_31_CHAT
    with pytest.raises(ValueError, match="mapping lacks user, assistant"):
        get_chat_template(tok, "chatml", mapping={"role": "from", "content": "value"})


def test_a_custom_pair_and_its_system_placeholder(tok):
    text = "{{ '{system_message}|' }}{% for m in messages %}{{ m['content'] + '</t>' }}{% endfor %}"
    tok = get_chat_template(tok, (text, "</t>"), map_eos_token=False, system_message="S")
    assert tok.apply_chat_template(CHAT, tokenize=False) == "S|Hi </t>Hello!</t>"
    with pytest.raises(ValueError, match="pass system_message"):
        get_chat_template(tok, (text, "</t>"), map_eos_token=False)
    with pytest.raises(ValueError, match="does not render a conversation"):
        get_chat_template(tok, ("{{ messages[0]['nope'] + 1 }}", "eos_token"))


def test_what_cannot_be_honoured_is_an_error(tok):
    # SmolLM2's EOS is <|im_end|>: chatml's stop word is EOS already, nothing to rename
    assert get_chat_template(tok, "chatml").eos_token == "<|im_end|>"
    tok.eos_token = "<|endoftext|>"
    with pytest.raises(ValueError, match=re.escape("renames the tokenizer's EOS token '<|endoftext|>' to "
                                                   "'<|im_end|>'")):
        get_chat_template(tok, "chatml")
    assert get_chat_template(tok, "chatml", map_eos_token=False).eos_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="Pass map_eos_token=False"):
        get_chat_template(tok, ("{{ messages[0]['content'] }}", "</s>"))
    with pytest.raises(ValueError, match="'qwen-3' is not one of the formats fasttune provides"):
        get_chat_template(tok, "qwen-3")
    # gemma's stop word <end_of_turn> is not this tokenizer's EOS: Unsloth would rename EOS to it
    with pytest.raises(ValueError, match="Pass map_eos_token=False"):
        get_chat_template(tok, "gemma")
    with pytest.raises(ValueError, match="'chatml' has no default system message"):
        get_chat_template(tok, "chatml", map_eos_token=False, system_message="S")
    with pytest.raises(TypeError, match="map_eos_token must be True or False"):
        get_chat_template(tok, "chatml", map_eos_token="yes")


ROWS = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello!"}], "source": "a"},
    {"conversations": [{"from": " Human", "value": "2+2?"}, {"from": "GPT", "value": "4"}], "source": "b"},
]


def test_standardize_sharegpt_turns_from_value_into_role_content():
    out = standardize_sharegpt(Dataset.from_list(ROWS))
    assert out["conversations"] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    assert out["source"] == ["a", "b"]
    # role/content rows with other role names, and a streamed dataset
    renamed = [{"conversations": [{"content": "Hi", "role": "input"}, {"content": "Yo", "role": "output"}]}]
    assert standardize_sharegpt(Dataset.from_list(renamed))["conversations"] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    assert standardize_data_formats(Dataset.from_list(ROWS))["conversations"] == out["conversations"]
    streamed = standardize_sharegpt(IterableDataset.from_generator(lambda: iter(ROWS)))
    assert [r["conversations"] for r in streamed] == out["conversations"]
    # a dataset without conversations passes unchanged, as Unsloth's
    plain = Dataset.from_list([{"text": "x"}])
    assert standardize_sharegpt(plain) is plain


def test_standardize_sharegpt_names_the_row_it_cannot_read():
    bot = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}
    bad_role = [ROWS[0], bot]
    with pytest.raises(ValueError, match=r"row 2, conversations\[1\]\.from is 'bot', which is in none of"):
        standardize_sharegpt(Dataset.from_list(bad_role))
    assert standardize_sharegpt(Dataset.from_list(bad_role), aliases_for_assistant=["gpt", "bot"]) \
        ["conversations"][1][1] == {"role": "assistant", "content": "Yo"}
    with pytest.raises(ValueError, match="stands for both user and assistant"):
        standardize_sharegpt(Dataset.from_list(ROWS), aliases_for_assistant=["gpt", "Human "])
    no_text = [{"conversations": [{"from": "human", "value": None}]}]
    with pytest.raises(ValueError, match=r"row 1, conversations\[0\]: from and value must be strings"):
        standardize_sharegpt(Dataset.from_list(no_text))
    three = [{"conversations": [{"from": "human", "value": "Hi", "weight": "1"}]}]
    with pytest.raises(ValueError, match="a message has two, its role and its text"):
        standardize_sharegpt(Dataset.from_list(three))
