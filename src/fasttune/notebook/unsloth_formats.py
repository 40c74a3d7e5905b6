"""Unsloth's chat formats by the names its `get_chat_template` takes (notebook/chat_templates.py): for each
name, the template text that renders what Unsloth's renders, the stop word that ends a turn, whether Unsloth
maps that stop word onto EOS, and the default system message a caller may replace.

The formats that `chat_template: NAME` also offers and Unsloth writes alike (llama-3, qwen-2.5, phi-3) come
from data/chat_templates.py; the others are written here, with Unsloth's treatment of roles (its chatml
writes any role but user and assistant as system; where a format stops on such a role, so does this one).

Worked example, `alpaca` with its default system message on [user "Hi", assistant "Yo"], bos <s>, eos </s>:
    <s>Below are some instructions that describe some tasks. Write responses that appropriately complete
    each request.\n\n### Instruction:\nHi\n\n### Response:\nYo</s>\n\n
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fasttune.data.chat_templates import _QWEN_SYSTEM, NAMED, _literal, qwen_25

_ONLY_TWO_ROLES = "{{ raise_exception('Only user and assistant roles are supported!') }}"

_LLAMA_31_DATE = "26 July 2024"


def llama_31(system: str) -> str:
    """Llama 3.1/3.2/3.3 Instruct as Unsloth writes it: a system turn that always opens with the knowledge
    cutoff and `date_string` (default 26 July 2024), then the conversation's system text or `system`; turns
    are not trimmed. Tools are refused rather than dropped (this template does not write them)."""
    no_tools = _literal("this llama-3.1 template does not write tools, tool calls or tool results")
    return (
        "{{ bos_token }}"
        "{% if tools or custom_tools or builtin_tools %}"
        "{{ raise_exception(" + no_tools + ") }}{% endif %}"
        "{% if date_string is not defined %}{% set date_string = " + _literal(_LLAMA_31_DATE) + " %}"
        "{% endif %}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set system_text = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set system_text = " + _literal(system) + " %}"
        "{% set turns = messages %}{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n'"
        " + 'Today Date: ' + date_string + '\n\n' + system_text + '<|eot_id|>' }}"
        "{% for message in turns %}"
        "{% if message['role'] in ('tool', 'ipython') or message['tool_calls'] %}"
        "{{ raise_exception(" + no_tools + ") }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )


def _system_then_turns(system: str, gap: str, user: str, user_end: str, assistant: str, assistant_end: str,
                       generation: str) -> str:
    """BOS, the system text (the conversation's or `system`) and `gap`, then each user turn as
    `user` + text + `user_end` and each assistant turn as `assistant` + text + EOS + `assistant_end`."""
    return (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + " + _literal(gap)
        + " }}{% set turns = messages[1:] %}{% else %}{{ " + _literal(system + gap) + " }}"
        "{% set turns = messages %}{% endif %}{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ " + _literal(user) + " + message['content'] + "
        + _literal(user_end) + " }}{% elif message['role'] == 'assistant' %}{{ " + _literal(assistant)
        + " + message['content'] + eos_token + " + _literal(assistant_end) + " }}{% else %}" + _ONLY_TWO_ROLES
        + "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ " + _literal(generation) + " }}{% endif %}"
    )


def unsloth(system: str) -> str:
    return _system_then_turns(system, "\n", ">>> User: ", "\n", ">>> Assistant: ", "\n", ">>> Assistant: ")


def alpaca(system: str) -> str:
    return _system_then_turns(system, "\n\n", "### Instruction:\n", "\n\n", "### Response:\n", "\n\n",
                              "### Response:\n")


def vicuna(system: str) -> str:
    return _system_then_turns(system, " ", "USER: ", " ", "ASSISTANT: ", "", "ASSISTANT:")


def vicuna_old(system: str) -> str:
    return _system_then_turns(system, "\n", "### Human: ", "\n", "### Assistant: ", "\n", "### Assistant:")




def _three_roles(user: str, assistant: str, other: str, end: str) -> str:
    """Each turn as its header + text + `end`: `user`, `assistant`, and `other` for any other role (Unsloth's
    chatml and zephyr write a system header for every role that is not user or assistant)."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ " + _literal(user) + " }}"
        "{% elif message['role'] == 'assistant' %}{{ " + _literal(assistant) + " }}{% else %}{{ "
        + _literal(other) + " }}{% endif %}{{ message['content'] + " + end + " }}{% endfor %}"
        "{% if add_generation_prompt %}{{ " + _literal(assistant) + " }}{% endif %}"
    )


_CHATML_UNSLOTH = _three_roles("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n",
                               "'<|im_end|>\n'")
_ZEPHYR_UNSLOTH = _three_roles("<|user|>\n", "<|assistant|>\n", "<|system|>\n", "eos_token + '\n'")

# Llama 2 as Unsloth writes it: the system text inside <<SYS>> of the first user turn (alone in its own
# [INST] when no user turn follows, untrimmed); later turns trimmed, each user turn after its own BOS
_LLAMA_2_UNSLOTH = (
    "{% set turns = messages %}{% if messages[0]['role'] == 'system' %}{% if messages[1]['role'] == 'user' %}"
    "{{ bos_token + '[INST] <<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' + messages[1]['content']"
    " + ' [/INST]' }}{% set turns = messages[2:] %}{% else %}"
    "{{ bos_token + '[INST] ' + messages[0]['content'] + ' [/INST]' }}{% set turns = messages[1:] %}"
    "{% endif %}{% endif %}{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% else %}" + _ONLY_TWO_ROLES + "{% endif %}{% endfor %}"
)

# Mistral as Unsloth writes it: a system turn joins the first user turn with a space inside one [INST]
# (alone in its own [INST] when no user turn follows); no generation prompt
_MISTRAL = (
    "{{ bos_token }}{% set turns = messages %}{% if messages[0]['role'] == 'system' %}"
    "{% if messages[1]['role'] == 'user' %}"
    "{{ '[INST] ' + messages[0]['content'] + ' ' + messages[1]['content'] + ' [/INST]' }}"
    "{% set turns = messages[2:] %}{% else %}{{ '[INST] ' + messages[0]['content'] + ' [/INST]' }}"
    "{% set turns = messages[1:] %}{% endif %}{% endif %}{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}"
    + _ONLY_TWO_ROLES + "{% endif %}{% endfor %}"
)

# Gemma and Gemma 2 as Unsloth writes them: a system turn joins the first user turn with a space; trimmed
_GEMMA = (
    "{{ bos_token }}{% set turns = messages %}{% if messages[0]['role'] == 'system' %}"
    "{{ '<start_of_turn>user\n' + messages[0]['content'] | trim + ' ' + messages[1]['content'] | trim"
    " + '<end_of_turn>\n' }}{% set turns = messages[2:] %}{% endif %}{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '<start_of_turn>user\n' + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% elif message['role'] == 'assistant' %}{{ '<start_of_turn>model\n'"
    " + message['content'] | trim + '<end_of_turn>\n' }}{% else %}" + _ONLY_TWO_ROLES + "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Gemma 3 (and 3n, alike on text): the system text opens the first turn; user and model turns must alternate;
# text is trimmed, and a content list's text items are written in order (an image or audio item is refused:
# fasttune trains text models)
def _gemma_3(name: str) -> str:
    refused = _literal(f"this {name} template renders text only")
    return (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] %}"
        "{% set prefix = (first if first is string else first[0]['text']) + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
        " + '\n' + (prefix if loop.first else '') }}"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% elif message['content'] is iterable %}{% for item in message['content'] %}"
        "{% if item['type'] == 'text' %}{{ item['text'] | trim }}"
        "{% elif item['type'] in ('image', 'audio') %}{{ raise_exception(" + refused + ") }}{% endif %}"
        "{% endfor %}{% else %}{{ raise_exception('Invalid content type') }}{% endif %}"
        "{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )


# Phi-4: <|im_sep|> after the role; turns of other roles are left out, as Unsloth's format leaves them
_PHI_4 = (
    "{% for message in messages %}{% if message['role'] in ('system', 'user', 'assistant') %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

_STARLING = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ 'GPT4 Correct ' + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)



@dataclass(frozen=True)
class NamedTemplate:
    """One of Unsloth's template names: how to build its text from a system message, the stop word it ends a
    turn with ("eos_token": the tokenizer's EOS), whether Unsloth maps that stop word onto EOS, and its
    default system message (None: the format has none to replace)."""
    build: Callable[[str | None], str]
    stop_word: str
    maps_eos: bool
    default_system: str | None

    def text(self, system: str | None) -> str:
        return self.build(self.default_system if system is None else system)


def _fixed(text: str) -> Callable[[str | None], str]:
    return lambda _system: text


_VICUNA_SYSTEM = ("A chat between a curious {0} and an artificial intelligence assistant. The assistant "
                  "gives helpful, detailed, and polite answers to the {0}'s questions.")

TEMPLATES: dict[str, NamedTemplate] = {
    "unsloth": NamedTemplate(unsloth, "eos_token", False, "You are a helpful assistant to the user"),
    "chatml": NamedTemplate(_fixed(_CHATML_UNSLOTH), "<|im_end|>", True, None),
    "zephyr": NamedTemplate(_fixed(_ZEPHYR_UNSLOTH), "eos_token", False, None),
    "mistral": NamedTemplate(_fixed(_MISTRAL), "eos_token", False, None),
    "llama": NamedTemplate(_fixed(_LLAMA_2_UNSLOTH), "eos_token", False, None),
    "vicuna": NamedTemplate(vicuna, "eos_token", False, _VICUNA_SYSTEM.format("user")),
    **dict.fromkeys(("vicuna_old", "vicuna old"),
                    NamedTemplate(vicuna_old, "eos_token", False, _VICUNA_SYSTEM.format("human"))),
    "alpaca": NamedTemplate(alpaca, "eos_token", False,
                            "Below are some instructions that describe some tasks. Write responses that "
                            "appropriately complete each request."),
    **dict.fromkeys(("gemma", "gemma2"), NamedTemplate(_fixed(_GEMMA), "<end_of_turn>", True, None)),
    **dict.fromkeys(("gemma-3", "gemma3"),
                    NamedTemplate(_fixed(_gemma_3("gemma-3")), "<end_of_turn>", False, None)),
    **dict.fromkeys(("gemma-3n", "gemma3n"),
                    NamedTemplate(_fixed(_gemma_3("gemma-3n")), "<end_of_turn>", False, None)),
    **dict.fromkeys(("llama-3", "llama3"), NamedTemplate(_fixed(NAMED["llama-3"]), "eos_token", False, None)),
    **dict.fromkeys(("llama-3.1", "llama-31", "llama-3.2", "llama-32", "llama-3.3", "llama-33"),
                    NamedTemplate(llama_31, "eos_token", False, "")),
    **dict.fromkeys(("qwen-2.5", "qwen-25", "qwen25", "qwen2.5", "qwen-2.5-coder", "qwen-25-coder",
                     "qwen2.5-coder", "qwen25-coder"),
                    NamedTemplate(qwen_25, "eos_token", False, _QWEN_SYSTEM)),
    **dict.fromkeys(("phi-3", "phi-35", "phi-3.5"),
                    NamedTemplate(_fixed(NAMED["phi-3"]), "<|end|>", False, None)),
    "phi-4": NamedTemplate(_fixed(_PHI_4), "<|im_end|>", False, None),
    "starling": NamedTemplate(_fixed(_STARLING), "<|end_of_turn|>", False, None),
    "yi-chat": NamedTemplate(_fixed(NAMED["chatml"]), "<|endoftext|>", False, None),
    **dict.fromkeys(("lfm-2", "lfm-2.5"),
                    NamedTemplate(_fixed("{{ bos_token }}" + NAMED["chatml"]), "<|im_end|>", False, None)),
}
