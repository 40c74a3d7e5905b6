"""Named chat templates and .jinja files: each renders its family's released format, in Jinja's sandbox as
transformers renders it, replaces the tokenizer's template for the run, and travels with its adapter."""

from __future__ import annotations

import json

import pytest

from fasttune import api
from fasttune.config import ConfigError, RunConfig, apply_overrides
from fasttune.data.chat_templates import NAMED, render, resolve_chat_template

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *CHAT]

# what each family's released format writes for SYSTEM (then the generation prompt), bos <s>, eos </s>
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n",
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
             "Hello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye\n\n"
              "### Response:\n",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n"
              "<|assistant|>\n",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n"
             "Bye<|end|>\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_templates_write_the_released_format(name):
    assert render(NAMED[name], SYSTEM, bos_token="<s>", eos_token="</s>", add_generation_prompt=True) \
        == EXPECTED[name]


def test_qwen_adds_its_default_system_turn_only_without_one():
    with_system = render(NAMED["qwen-2.5"], SYSTEM, add_generation_prompt=True)
    assert with_system == EXPECTED["chatml"]
    assert render(NAMED["qwen-2.5"], CHAT).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>")
    assert set(NAMED) >= {"llama-3", "chatml", "mistral", "gemma", "qwen-2.5", "alpaca", "vicuna", "zephyr"}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_rendering_equals_transformers_apply_chat_template(name, smol_tok):
    tokenizer = smol_tok
    ours = render(NAMED[name], SYSTEM, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                  add_generation_prompt=True)
    theirs = tokenizer.apply_chat_template(SYSTEM, tokenize=False, chat_template=NAMED[name],
                                           add_generation_prompt=True)
    assert ours == theirs


def test_files_and_errors_name_the_option(tmp_path, smol_tok):
    tokenizer = smol_tok
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert resolve_chat_template(str(good), tokenizer) == good.read_text()
    escape = tmp_path / "escape.jinja"
    escape.write_text("{% set _ = messages.append({'role': 'x'}) %}{{ messages }}")
    with pytest.raises(ConfigError, match=r"chat_template .*escape\.jinja: refused by Jinja's sandbox"):
        resolve_chat_template(str(escape), tokenizer)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"broken\.jinja: does not render a conversation"):
        resolve_chat_template(str(broken), tokenizer)
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.jinja"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), tokenizer)
    with pytest.raises(ConfigError, match=r"'llama-9' is neither a named template \(chatml"):
        resolve_chat_template("llama-9", tokenizer)


def _job(tmp_path, model_dir, rows, **overrides):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dict(model_name=str(model_dir), dataset=str(data), eval_dataset="none", max_steps=1, r=4,
                  show_samples=0, report=False, output_dir=str(tmp_path / "run"), max_seq_length=64)
    return apply_overrides(RunConfig(), {**values, **overrides}, "test")


def test_the_template_travels_with_the_run(tmp_path, tiny_run):
    model_dir = tiny_run.parent / "tiny-llama"
    rows = [{"instruction": f"Name {i}?", "output": f"N{i}."} for i in range(4)]
    lines: list[str] = []
    api.train(_job(tmp_path, model_dir, rows, chat_template="zephyr"), log=lines.append)
    assert "  chat template zephyr (instead of the tokenizer's own)" in lines
    adapter = tmp_path / "run" / "adapter"
    contract = json.loads((adapter / "prompt_contract.json").read_text())
    assert contract["template"] == "chat" and contract["chat_template"] == NAMED["zephyr"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(adapter)).chat_template == NAMED["zephyr"]
    assert "<|assistant|>" in (adapter / "README.md").read_text()  # the model card shows it


def test_a_template_the_rows_do_not_use_is_an_error(tmp_path, tiny_run):
    model_dir = tiny_run.parent / "tiny-llama"
    with pytest.raises(ConfigError, match=r"chat_template chatml: the text rows of .* not rendered"):
        api.train(_job(tmp_path, model_dir, [{"text": "plain text"}] * 4, chat_template="chatml"),
                  log=lambda line: None)
    with pytest.raises(ConfigError, match=r"chat_template chatml: template 'alpaca' renders alpaca rows"):
        api.train(_job(tmp_path, model_dir, [{"instruction": "a", "output": "b"}] * 4,
                       chat_template="chatml", template="alpaca"), log=lambda line: None)
