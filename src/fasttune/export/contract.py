"""The run's prompt contract on the way out: the tokenizer, chat template and stop ids every export carries.

An alpaca run has no chat template of its own, so one is written that renders the Alpaca prompt
exactly as training did; a chat run keeps the template it trained with. Either way a user of the
exported model who calls `apply_chat_template` gets the prompt the model learned to answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fasttune.data.templates import ALPACA_PROMPT_NO_INPUT, PromptContract
from fasttune.export.checkpoint import ExportError
from fasttune.export.source import ExportSource
from fasttune.run_dir import CONTRACT_FILE


def load_contract(src: ExportSource) -> PromptContract | None:
    """The contract saved with the run's adapter (or run directory); None for a plain model or old run."""
    for d in (src.adapter_dir, src.run_dir, src.base_dir):
        if d is not None and (d / CONTRACT_FILE).is_file():
            return PromptContract.load(d / CONTRACT_FILE)
    return None


def load_tokenizer(src: ExportSource) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src.tokenizer_dir))


def alpaca_chat_template(contract: PromptContract) -> str:
    """A Jinja chat template that renders messages as `data.templates.render_messages` does for alpaca.

    Earlier user/assistant pairs become Alpaca blocks followed by a blank line, system turns are
    dropped, and the generation prompt is the no-input Alpaca prompt for the last user turn.
    """
    prompt = contract.prompt_template_no_input or ALPACA_PROMPT_NO_INPUT
    if prompt.count("{instruction}") != 1:
        raise ExportError("the run's alpaca prompt_template_no_input must contain {instruction} once")
    head, tail = (json.dumps(part, ensure_ascii=False) for part in prompt.split("{instruction}"))
    bos = json.dumps(contract.bos_token or "", ensure_ascii=False) if contract.add_bos else '""'
    return (
        "{%- set ns = namespace(pending=none) -%}"
        "{{- " + bos + " -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{%- set ns.pending = m['content'] -%}"
        "{%- elif m['role'] == 'assistant' and ns.pending is not none -%}"
        "{{- " + head + " + ns.pending + " + tail + " + m['content'] + '\\n\\n' -}}"
        "{%- set ns.pending = none -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- " + head + " + (ns.pending if ns.pending is not none else '') + " + tail + " -}}"
        "{%- endif -%}"
    )


def chat_template_for(contract: PromptContract | None, tokenizer: Any) -> str | None:
    """The chat template the exported model should carry."""
    if contract is None:
        return getattr(tokenizer, "chat_template", None)
    if contract.template == "chat":
        return contract.chat_template
    if contract.template == "alpaca":
        return alpaca_chat_template(contract)
    return getattr(tokenizer, "chat_template", None)


def stop_token_ids(contract: PromptContract | None, tokenizer: Any) -> list[int]:
    """EOS first, then the end-of-turn token where it differs: every id generation should stop at."""
    ids = (
        [contract.eos_id]
        if contract is not None
        else ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    )
    if contract is not None and contract.end_of_turn:
        eot = tokenizer.convert_tokens_to_ids(contract.end_of_turn)
        if isinstance(eot, int) and eot not in ids and eot != tokenizer.unk_token_id:
            ids.append(eot)
    return ids


def write_tokenizer_files(src: ExportSource, out: Path) -> PromptContract | None:
    """Save the run's tokenizer with its chat template, the contract, and stop ids in generation_config."""
    tokenizer = load_tokenizer(src)
    contract = load_contract(src)
    template = chat_template_for(contract, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))
    if contract is not None:
        contract.save(out / CONTRACT_FILE)
    stops = stop_token_ids(contract, tokenizer)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    old = gen.get("eos_token_id")
    old = [] if old is None else [old] if isinstance(old, int) else list(old)
    merged = list(dict.fromkeys(stops + old))
    if merged:
        gen["eos_token_id"] = merged[0] if len(merged) == 1 else merged
    if contract is not None:
        gen.setdefault("pad_token_id", contract.pad_id)
        if contract.bos_id is not None:
            gen.setdefault("bos_token_id", contract.bos_id)
    gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    return contract
