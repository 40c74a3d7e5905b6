"""Unsloth's `get_chat_template` and `standardize_sharegpt` (its `unsloth.chat_templates` functions), with
Unsloth's names and what they render, so that a conversational notebook runs after changing its imports:

    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    dataset = standardize_sharegpt(dataset)      # {"from": "human", "value": ..} -> {"role": "user", ..}
    dataset = dataset.map(lambda rows: {"text": [tokenizer.apply_chat_template(c, tokenize=False)
                                                 for c in rows["conversations"]]}, batched=True)

`get_chat_template` sets `tokenizer.chat_template` to the named format (the text each name renders equals
what Unsloth's renders for it) and returns the tokenizer. It never rewrites the vocabulary: where Unsloth
would rename the EOS token to the template's stop word (`map_eos_token=True` with `chatml` on a tokenizer
whose EOS is another token), it stops and says so. Names Unsloth has that are not here are an error that
lists those that are.

Worked example: `llama-3.1` on [user "Hi", assistant "Hello!"] with bos <|begin_of_text|> renders
    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n
    Today Date: 26 July 2024\\n\\n<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>
(one string; the line breaks after `\\n` are only for reading).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fasttune.data.chat_templates import _literal, template_problem
from fasttune.notebook.unsloth_formats import TEMPLATES

# Unsloth's default for `mapping`: the messages already carry role/content with user/assistant roles
DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def _sharegpt_reader(mapping: dict[str, str]) -> str:
    """A template prefix that rewrites messages keyed as `mapping` says (say from/value with human/gpt)
    into role/content with user/assistant before the format renders them; messages that already have a
    `role` key pass unchanged."""
    role, content = _literal(mapping["role"]), _literal(mapping["content"])
    user, assistant = _literal(mapping["user"]), _literal(mapping["assistant"])
    return (
        "{% if messages and 'role' not in messages[0] %}{% set converted = namespace(items=[]) %}"
        "{% for message in messages %}{% set name = message[" + role + "] %}"
        "{% set name = 'user' if name == " + user + " else ('assistant' if name == " + assistant
        + " else name) %}"
        "{% set converted.items = converted.items + [dict(message, role=name, content=message[" + content
        + "])] %}{% endfor %}{% set messages = converted.items %}{% endif %}"
    )


def get_chat_template(tokenizer: Any, chat_template: str | Sequence[str] = "chatml",
                      mapping: dict[str, str] | None = None, map_eos_token: bool = True,
                      system_message: str | None = None) -> Any:
    """Set `tokenizer.chat_template` to Unsloth's format `chat_template` (a name, or a (template text,
    stop word) pair) and return the tokenizer.

    `mapping` (Unsloth's: role/content key names and the user/assistant role names) lets the template read
    ShareGPT messages directly. `system_message` replaces the default system text of a format that has one
    (llama-3.1: empty; qwen-2.5: Qwen's); for a format without one it is an error, as is a mapping of the stop
    word onto EOS that would need the vocabulary rewritten."""
    if not isinstance(map_eos_token, bool):
        raise TypeError(f"get_chat_template: map_eos_token must be True or False, not {map_eos_token!r}")
    gemma = type(tokenizer).__name__.startswith("Gemma")
    if gemma and chat_template == "chatml":
        raise ValueError("get_chat_template: chatml on a Gemma tokenizer is Unsloth's gemma_chatml, which "
                         "renames tokens in the vocabulary; fasttune does not rewrite a vocabulary: use "
                         "chat_template='gemma' or 'gemma-3'")
    if isinstance(chat_template, str):
        if chat_template not in TEMPLATES:
            raise ValueError(f"get_chat_template: chat_template={chat_template!r} is not one of the "
                             f"formats fasttune provides ({', '.join(TEMPLATES)}); pass (template_text, "
                             "stop_word) or set tokenizer.chat_template yourself")
        named = TEMPLATES[chat_template]
        if system_message is not None and named.default_system is None:
            raise ValueError(f"get_chat_template: {chat_template!r} has no default system message to "
                             "replace with system_message; put a system turn in the conversations instead")
        text, stop_word = named.text(system_message), named.stop_word
        what = f"chat_template={chat_template!r}"
        map_eos_token = map_eos_token and named.maps_eos
    elif isinstance(chat_template, (list, tuple)) and len(chat_template) == 2 \
            and all(isinstance(x, str) for x in chat_template):
        text, stop_word = chat_template
        what = "the template text"
        if "{system_message}" in text:
            if system_message is None:
                raise ValueError("get_chat_template: the template has a {system_message} placeholder: pass "
                                 "system_message")
            text = text.replace("{system_message}", system_message)
        elif system_message is not None:
            raise ValueError("get_chat_template: system_message was given, but the template has no "
                             "{system_message} placeholder to put it in")
    else:
        raise TypeError("get_chat_template: chat_template must be a format name or a (template_text, "
                        f"stop_word) pair of strings, not {chat_template!r}")
    eos = tokenizer.eos_token
    if map_eos_token and stop_word not in ("eos_token", eos):
        raise ValueError(f"get_chat_template: with map_eos_token=True, Unsloth renames the tokenizer's EOS "
                         f"token {eos!r} to {stop_word!r} in its vocabulary; fasttune does not rewrite a "
                         f"vocabulary. Pass map_eos_token=False: {stop_word!r} then ends each turn as text "
                         f"and EOS stays {eos!r}")
    if gemma and not text.startswith(("{{ bos_token }}", "{{- bos_token }}")):
        text = "{{ bos_token }}" + text   # as Unsloth: Gemma trains badly without its BOS
    if mapping is not None and mapping != DEFAULT_MAPPING:
        missing = [k for k in DEFAULT_MAPPING if k not in mapping]
        if missing:
            raise ValueError(f"get_chat_template: mapping lacks {', '.join(missing)} (it needs role, "
                             "content, user and assistant)")
        text = _sharegpt_reader(mapping) + text
    problem = template_problem(text, tokenizer)
    if problem is not None:
        raise ValueError(f"get_chat_template: {what}: {problem}")
    tokenizer.chat_template = text
    return tokenizer


def _normal(role: str) -> str:
    return role.strip().lower()


def standardize_sharegpt(dataset: Any, tokenizer: Any = None,
                         aliases_for_system: Sequence[str] = ("system",),
                         aliases_for_user: Sequence[str] = ("user", "human", "input"),
                         aliases_for_assistant: Sequence[str] = ("gpt", "assistant", "output"),
                         batch_size: int = 1000, num_proc: int | None = None) -> Any:
    """The `conversations` column of a datasets.Dataset rewritten as role/content messages with system,
    user and assistant roles (ShareGPT's from/value with human/gpt, or any two string keys of which one holds
    the role names); role names match their aliases without regard to case or surrounding spaces. A
    dataset without a `conversations` column is returned unchanged, as Unsloth's is.

    Every row is checked: a message whose keys differ from the first message's, a value that is not a
    string, or a role that is no alias stops with the row and message named."""
    if tokenizer is not None and (hasattr(tokenizer, "image_processor") or hasattr(tokenizer, "tokenizer")):
        raise ValueError("standardize_sharegpt: a processor (vision model) was given as tokenizer; fasttune "
                         "trains text models, whose messages hold plain strings")
    columns = dataset.column_names
    if columns is None:  # an IterableDataset whose features are not known: its first row's
        columns = list(next(iter(dataset)))
    if "conversations" not in columns:
        return dataset
    aliases: dict[str, str] = {}
    for role, names in (("system", aliases_for_system), ("user", aliases_for_user),
                        ("assistant", aliases_for_assistant)):
        for name in names:
            key = _normal(name)
            if aliases.get(key, role) != role:
                raise ValueError(f"standardize_sharegpt: the alias {name!r} stands for both {aliases[key]} "
                                 f"and {role} (aliases are compared without case or surrounding spaces)")
            aliases[key] = role
    role_key, content_key = _role_and_content_keys(dataset, aliases)

    def standard(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = []
        for i, conversation in zip(indices, rows["conversations"]):
            messages = []
            for j, message in enumerate(conversation):
                where = f"row {i + 1}, conversations[{j}]"
                if set(message) != {role_key, content_key}:
                    raise ValueError(f"standardize_sharegpt: {where} has the keys {sorted(message)}, where "
                                     f"the first message has {sorted((role_key, content_key))}")
                name, text = message[role_key], message[content_key]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise ValueError(f"standardize_sharegpt: {where}: {role_key} and {content_key} must be "
                                     "strings")
                if _normal(name) not in aliases:
                    raise ValueError(f"standardize_sharegpt: {where}.{role_key} is {name!r}, which is in "
                                     "none of aliases_for_system, aliases_for_user, aliases_for_assistant")
                messages.append({"role": aliases[_normal(name)], "content": text})
            out.append(messages)
        return {"conversations": out}

    kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "with_indices": True}
    if type(dataset).__name__ != "IterableDataset":
        kwargs.update(num_proc=num_proc, desc="Standardizing conversations")
    return dataset.map(standard, **kwargs)


standardize_data_formats = standardize_sharegpt   # Unsloth's newer name for the same function


def _role_and_content_keys(dataset: Any, aliases: dict[str, str]) -> tuple[str, str]:
    """The (role key, content key) of the first message: the key named `role` or `from` when one is, else the
    one whose values in the first rows are all role names."""
    first_rows = dataset.take(10) if hasattr(dataset, "take") else dataset
    messages = [m for row in first_rows for m in (row["conversations"] or [])]
    if not messages:
        raise ValueError("standardize_sharegpt: the first rows' conversations hold no messages")
    keys = list(messages[0])
    if len(keys) != 2:
        raise ValueError(f"standardize_sharegpt: the first message has the keys {sorted(keys)}; a message "
                         "has two, its role and its text")
    named = [k for k in keys if k in ("role", "from")]
    if len(named) == 1:
        role_key = named[0]
    else:
        roles_only = [k for k in keys if all(isinstance(m.get(k), str) and _normal(m[k]) in aliases
                                             for m in messages)]
        if len(roles_only) != 1:
            raise ValueError(f"standardize_sharegpt: cannot tell which of {sorted(keys)} holds the role: "
                             "name it `role` or `from`")
        role_key = roles_only[0]
    return role_key, keys[1] if keys[0] == role_key else keys[0]
