"""That a chat template wrote a row's tool parts: the `tools` it was given, every tool call of an assistant
turn, every tool result. A template that never reads them would train the row without them, so each
missing part is a DataError naming its field (the file and row are added by the caller)."""

from __future__ import annotations

from typing import Any

from fasttune.data.errors import DataError

_USE = "use a chat template that renders tools (e.g. chat_template qwen-2.5, or the model's own)"


def tools_rendered(with_tools: str, without_tools: str) -> None:
    """The conversation rendered with the row's tools differs from it rendered without them."""
    if with_tools == without_tools:
        raise DataError(f"the chat template ignores the tools (the text is the same without them); {_USE}",
                        field="tools", reason="template drops tools")


def calls_rendered(turn_text: str, calls: list[dict[str, Any]], i: int) -> None:
    """Each call's function name shows in the text of assistant turn i, as the template wrote it."""
    for k, call in enumerate(calls):
        name = call.get("function", call)["name"]
        if name not in turn_text:
            raise DataError(f"the chat template does not write this tool call (function {name!r} is not in "
                            f"the turn's text); {_USE}", field=f"messages[{i}].tool_calls[{k}]",
                            reason="template drops tools")


def result_rendered(full: str, message: dict[str, Any], i: int, cursor: int) -> int:
    """Where tool result i (message i, role 'tool') ends in `full`, searched from `cursor`; an empty result
    leaves nothing to find."""
    content = message["content"].strip()
    if not content:
        return cursor
    at = full.find(content, cursor)
    if at < 0:
        raise DataError(f"the chat template does not write this tool result (role 'tool'); {_USE}",
                        field=f"messages[{i}].content", reason="template drops tools")
    return at + len(content)
