"""Named chat templates (`chat_template: NAME`) and template files (`chat_template: path.jinja`), which
replace the tokenizer's own for a run.

A template is checked by rendering a probe conversation in Jinja's ImmutableSandboxedEnvironment, the
environment transformers' apply_chat_template renders every prompt in, so a template that reaches for
Python internals or fails to render stops the run before training, naming the option. The chosen text
becomes the tokenizer's chat_template: the prompt contract, the adapter's tokenizer files and every export
(merged tokenizer, GGUF metadata, Ollama Modelfile) carry it.

Each named template writes the format its model family was released with, as text; `bos_token` and
`eos_token` are the tokenizer's. A worked example, chatml with one exchange:
```
<|im_start|>user
Hi<|im_end|>
<|im_start|>assistant
Hello!<|im_end|>
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fasttune.config import ConfigError

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)



def _literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (Jinja decodes backslash escapes in literals)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Qwen2.5: ChatML under a default system prompt. With `tools` (JSON-schema function specs) the system turn
# lists them, one JSON object a line, and says how to call them. An assistant turn's `tool_calls` ({function:
# {name, arguments}} or {name, arguments}) are written as <tool_call> blocks after its text; consecutive
# `tool` results share one user turn, each inside <tool_response>.
_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN_TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def qwen_25(system: str) -> str:
    """The Qwen2.5 template, `system` written when the conversation has no system turn."""
    return (
        "{% set has_system = messages | length > 0 and messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\n' + (messages[0]['content'] if has_system else "
        + _literal(system) + ") }}"
        "{% if tools %}{{ " + _literal(_QWEN_TOOLS_HEAD) + " }}"
        "{% for spec in tools %}{{ '\n' + spec | tojson }}"
        "{% endfor %}{{ " + _literal(_QWEN_TOOLS_TAIL) + " }}{% endif %}{{ '<|im_end|>\n' }}"
        "{% for message in (messages[1:] if has_system else messages) %}"
        "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
        "{{ '<|im_start|>assistant' }}{% if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
        "{% for call in message['tool_calls'] %}"
        "{% set fn = call['function'] if call['function'] is defined else call %}"
        "{{ " + _literal('\n<tool_call>\n{"name": "') + " + fn['name'] + " + _literal('", "arguments": ')
        + " + fn['arguments'] | tojson + " + _literal("}\n</tool_call>") + " }}{% endfor %}"
        "{{ '<|im_end|>\n' }}"
        "{% elif message['role'] == 'tool' %}"
        "{% if loop.previtem is not defined or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user' }}"
        "{% endif %}"
        "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
        "{% if loop.nextitem is not defined or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\n' }}"
        "{% endif %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


_LLAMA_3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + "
    "'\n<</SYS>>\n\n' %}{% set turns = messages[1:] %}{% else %}{% set system = '' %}"
    "{% set turns = messages %}{% endif %}{% for message in turns %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Mistral-Instruct: [INST] turns; a system message goes in front of the first user turn
_MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + "
    "'\n\n' %}{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}"
    "{% endif %}{% for message in turns %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "(system if loop.first else '') + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Gemma: roles user and model; no system role, so a system message goes in front of the first user turn
_GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + "
    "'\n\n' %}{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}"
    "{% endif %}{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + "
    "'\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

_VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% else %}"
    "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions. ' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_PHI_3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NAMED: dict[str, str] = {
    "chatml": _CHATML,
    "qwen-2.5": qwen_25(_QWEN_SYSTEM),
    "llama-3": _LLAMA_3,
    "llama-2": _LLAMA_2,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "alpaca": _ALPACA,
    "vicuna": _VICUNA,
    "zephyr": _ZEPHYR,
    "phi-3": _PHI_3,
}

_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"}]


def template_text(value: str) -> str:
    """The Jinja text `chat_template: value` names: a NAMED template or a .jinja file."""
    if value in NAMED:
        return NAMED[value]
    path = Path(value).expanduser()
    if path.suffix == ".jinja":
        try:
            return path.read_text()
        except OSError as e:
            raise ConfigError(f"chat_template: cannot read {path}: {e.strerror or e}") from None
    raise ConfigError(f"chat_template: {value!r} is neither a named template ({', '.join(NAMED)}) nor a "
                      ".jinja file")


def render(text: str, messages: list[dict[str, Any]], bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = False, **extra: Any) -> str:
    """`messages` rendered by the template `text` in Jinja's ImmutableSandboxedEnvironment, with the
    settings transformers' apply_chat_template uses (trim_blocks, lstrip_blocks, loop controls, `tojson` as
    plain json.dumps without HTML escaping or sorted keys, `raise_exception`), so that both render alike."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                        add_generation_prompt=add_generation_prompt, **extra)


def template_problem(text: str, tokenizer: Any) -> str | None:
    """Why the template `text` cannot render a probe conversation in the sandbox; None when it can."""
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        render(text, _PROBE, bos_token=str(tokenizer.bos_token or ""),
               eos_token=str(tokenizer.eos_token or ""), add_generation_prompt=True)
    except SecurityError as e:
        return f"refused by Jinja's sandbox: {e}"
    except (TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"does not render a conversation: {e}"
    return None


def resolve_chat_template(value: str, tokenizer: Any) -> str:
    """The template text for `chat_template: value`, checked by rendering a probe conversation in the
    sandbox; any failure is a ConfigError naming the option."""
    text = template_text(value)
    problem = template_problem(text, tokenizer)
    if problem is not None:
        raise ConfigError(f"chat_template {value}: {problem}")
    return text
