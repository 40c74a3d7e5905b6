"""`export_ollama`: the GGUF plus a `Modelfile` with TEMPLATE and `stop` lines from the run's prompt contract.

The Go TEMPLATE is derived by rendering the training template itself with placeholder text and putting
Ollama's variables where the placeholders landed, so a prompt in Ollama is byte for byte the prompt the
model was trained on. A chat template is cut into the text around each role's message (chat_turns.py),
which a `range` over Ollama's `.Messages` puts back together for any number of turns, with or without a
system message (and the default system block a template inserts when there is none).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasttune.data.templates import ALPACA_PROMPT_NO_INPUT, PromptContract
from fasttune.export.chat_turns import chat_turns
from fasttune.export.checkpoint import ExportError
from fasttune.export.contract import load_contract, load_tokenizer
from fasttune.export.gguf import export_gguf, gguf_supported
from fasttune.export.source import resolve_source

MODELFILE = "Modelfile"
_PROMPT, _SYSTEM = "\x00FT_PROMPT\x00", "\x00FT_SYSTEM\x00"


@dataclass
class OllamaTemplate:
    template: str  # Go template text
    stops: list[str]


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only '{{' needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def _fill(rendered: str) -> str:
    return _go_literal(rendered).replace(_PROMPT, "{{ .Prompt }}").replace(_SYSTEM, "{{ .System }}")


def chat_go_template(chat_template: str, tokenizer: Any, end_of_turn: str | None) -> str:
    """A Go template equal to `chat_template` for one (optionally system-prefixed) user turn."""

    def render(messages: list[dict[str, str]]) -> str | None:
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template
            )
        except Exception:  # a template that refuses system messages, say
            return None

    plain = render([{"role": "user", "content": _PROMPT}])
    if plain is None or _PROMPT not in plain:
        raise ExportError(
            "the run's chat template does not render a single user message; cannot derive "
            "an Ollama TEMPLATE from it"
        )
    with_system = render([{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _PROMPT}])
    end = _go_literal(end_of_turn or "")
    if with_system is None or _SYSTEM not in with_system:
        return _fill(plain) + "{{ .Response }}" + end
    return (
        "{{ if .System }}"
        + _fill(with_system)
        + "{{ else }}"
        + _fill(plain)
        + "{{ end }}"
        + "{{ .Response }}"
        + end
    )


def chat_messages_template(chat_template: str, tokenizer: Any, end_of_turn: str | None) -> str:
    """Any number of turns through `.Messages` where the template cuts into per-role pieces; the one-turn
    template (`.System`, `.Prompt`, `.Response`) where Ollama passes no messages."""
    single = chat_go_template(chat_template, tokenizer, end_of_turn)
    turns = chat_turns(chat_template, tokenizer)
    if turns is None:
        warnings.warn(
            "the run's chat template does not split into the same text around every turn; the Ollama "
            "TEMPLATE renders single-turn prompts only (.System, .Prompt)",
            stacklevel=3,
        )
        return single
    return "{{ if .Messages }}" + turns.go_template(_go_literal) + "{{ else }}" + single + "{{ end }}"


def alpaca_go_template(contract: PromptContract) -> str:
    """Each user message as an Alpaca instruction and each answer after it, as the run renders a
    conversation (system messages are dropped); one instruction where Ollama passes no messages."""
    prompt = contract.prompt_template_no_input or ALPACA_PROMPT_NO_INPUT
    before, after = (_go_literal(part) for part in prompt.split("{instruction}", 1))
    messages = (
        "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq $m.Role "user" }}'
        + before
        + "{{ $m.Content }}"
        + after
        + '{{ else if eq $m.Role "assistant" }}{{ $m.Content }}'
        + "{{ if not $last }}\n\n{{ end }}{{ end }}{{ end }}"
    )
    return (
        "{{ if .Messages }}"
        + messages
        + "{{ else }}"
        + before
        + "{{ .Prompt }}"
        + after
        + "{{ .Response }}{{ end }}"
    )


def ollama_template(contract: PromptContract | None, tokenizer: Any) -> OllamaTemplate:
    """TEMPLATE and stop strings for a run's contract (or, without one, the tokenizer's chat template)."""
    eos = contract.eos_token if contract is not None else tokenizer.eos_token
    if contract is not None and contract.template == "alpaca":
        return OllamaTemplate(alpaca_go_template(contract), _stops(contract.stop_strings, eos))
    if contract is not None and contract.template == "text":
        return OllamaTemplate("{{ .Prompt }}{{ .Response }}", _stops(contract.stop_strings, eos))
    chat = contract.chat_template if contract is not None else getattr(tokenizer, "chat_template", None)
    if not chat:
        return OllamaTemplate("{{ .Prompt }}{{ .Response }}", _stops([], eos))
    end = contract.end_of_turn if contract is not None else None
    stops = contract.stop_strings if contract is not None else [end or ""]
    turns = chat_turns(chat, tokenizer)
    opener = turns.user_prefix.strip() if turns is not None else ""
    # a model that runs past its end of turn into a new user turn is stopped there too
    return OllamaTemplate(chat_messages_template(chat, tokenizer, end), _stops([*stops, opener], eos))


def _stops(stops: list[str], eos: str | None) -> list[str]:
    return list(dict.fromkeys(s for s in [*stops, eos] if s))


def modelfile_text(gguf_name: str, tpl: OllamaTemplate) -> str:
    if '"""' in tpl.template:
        raise ExportError('the prompt template contains """, which a Modelfile TEMPLATE cannot hold')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{tpl.template}"""']
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in tpl.stops]
    return "\n".join(lines) + "\n"


def export_ollama(
    run_or_adapter: str | Path,
    out_dir: str | Path,
    type: str = "q8_0",
    *,
    base: str | None = None,
    device: str = "cpu",
) -> Path:
    """Write `<out_dir>/model.gguf` and `<out_dir>/Modelfile`; then `ollama create NAME -f Modelfile`.

    type: the GGUF type (q8_0 by default: small and close to 16-bit; f16, bf16, q4_0, ... as in
    `export_gguf`). Returns the Modelfile's path.
    """
    src = resolve_source(run_or_adapter, base=base)
    gguf_supported(src)  # refuse an architecture llama.cpp lacks before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tpl = ollama_template(load_contract(src), load_tokenizer(src))
    gguf_path = export_gguf(run_or_adapter, out / "model.gguf", type=type, base=base, device=device)
    path = out / MODELFILE
    path.write_text(modelfile_text(gguf_path.name, tpl))
    return path
