"""Tool-calling rows: a `tools` column of function specs, assistant `tool_calls` and `tool` results, rendered
by a template that supports them exactly as transformers' apply_chat_template renders them, the assistant
turns (tool calls included) trained and the tool results not; bad rows and templates that would drop the
tool parts are errors naming the file, row and field."""

from __future__ import annotations

import copy
import json

import pytest

from fasttune.config import DataConfig
from fasttune.data.chat_templates import NAMED, render
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows
from fasttune.data.templates import make_contract, render_messages
from fasttune.data.tokenize import build_dataset
from fasttune.infer.evaluate import question_and_reference
from fasttune.models.base import IGNORE_INDEX

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
MESSAGES = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        CALL, {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
    {"role": "tool", "name": "get_weather", "content": "9 C, rain"},
    {"role": "assistant", "content": "Paris: 18 °C and sunny. Oslo: 9 °C with rain."},
]
ROW = {"tools": TOOLS, "messages": MESSAGES}

# Qwen2.5's released tool format for a short exchange, as its own template writes it
QWEN_TOOL_TEXT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
    "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def qwen_tok(smol_tok):
    """SmolLM2's tokenizer (ChatML's special tokens) with the named qwen-2.5 template, which renders tools."""
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = NAMED["qwen-2.5"]
    return tok


def _build(write_jsonl, tok, rows, **kw):
    return build_dataset(DataConfig(dataset=str(write_jsonl(rows)), **kw), tok, 2048)


def test_qwen_writes_the_released_tool_format(qwen_tok):
    short = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "18 C"}]
    theirs = qwen_tok.apply_chat_template(short, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert theirs == QWEN_TOOL_TEXT
    # fasttune's own sandboxed rendering (the template check) writes the same text: tojson as transformers'
    assert render(NAMED["qwen-2.5"], short, tools=TOOLS, add_generation_prompt=True) == QWEN_TOOL_TEXT
    # without tools, the template is the plain Qwen2.5 chat it was
    plain = qwen_tok.apply_chat_template(short[:1], tokenize=False)
    assert plain == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                     "assistant.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n")


@pytest.mark.parametrize("stored", ["list", "json string"])
def test_tokens_equal_apply_chat_template_with_tools(qwen_tok, write_jsonl, stored):
    """The trained row is token for token transformers' apply_chat_template(messages, tools=...) (TRL's
    rendering); a `tools` column held as a JSON string, as Arrow tables often hold it, reads the same."""
    row = dict(ROW, tools=json.dumps(TOOLS) if stored == "json string" else TOOLS)
    (ex,) = _build(write_jsonl, qwen_tok, [row]).examples
    assert ex.input_ids == qwen_tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=True,
                                                        return_dict=True)["input_ids"]


def _trained_runs(ex, tok) -> tuple[list[str], list[str]]:
    """(trained texts, untrained texts), each run of consecutive tokens decoded."""
    runs: list[tuple[bool, list[int]]] = []
    for tok_id, label in zip(ex.input_ids, ex.labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok_id)
        else:
            runs.append((trained, [tok_id]))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return [decode(ids) for t, ids in runs if t], [decode(ids) for t, ids in runs if not t]


def test_assistant_turns_with_their_tool_calls_are_trained_and_tool_results_are_not(qwen_tok, write_jsonl):
    (ex,) = _build(write_jsonl, qwen_tok, [ROW]).examples
    trained, context = _trained_runs(ex, qwen_tok)
    assert trained == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "Paris: 18 °C and sunny. Oslo: 9 °C with rain.<|im_end|>",
    ]
    assert "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n9 C, rain" in context[1]
    assert '"name": "get_weather", "description"' in context[0]  # the tools, in the system turn
    assert all(label == IGNORE_INDEX for label in ex.labels[: len(qwen_tok(context[0])["input_ids"])])


def test_a_tool_calling_turn_with_text_trains_the_text_and_the_calls(qwen_tok, write_jsonl):
    messages = [MESSAGES[0], dict(MESSAGES[1], content="Let me look.", tool_calls=[CALL]), MESSAGES[2]]
    (ex,) = _build(write_jsonl, qwen_tok, [{"tools": TOOLS, "messages": messages}]).examples
    trained, _ = _trained_runs(ex, qwen_tok)
    assert trained == ['Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                       "</tool_call><|im_end|>"]


def test_generation_prompt_carries_the_tools_and_a_tool_call_answer_is_not_scored(qwen_tok):
    contract = make_contract("auto", "messages", qwen_tok)
    prompt, reference, question = question_and_reference({"tools": TOOLS, "messages": MESSAGES}, contract,
                                                         qwen_tok)
    assert prompt == qwen_tok.apply_chat_template(MESSAGES[:4], tools=TOOLS, tokenize=False,
                                                  add_generation_prompt=True)
    assert reference == MESSAGES[4]["content"] and question == MESSAGES[0]["content"]
    assert question_and_reference({"tools": TOOLS, "messages": MESSAGES[:2]}, contract, qwen_tok) is None
    alpaca = make_contract("auto", "alpaca", qwen_tok)
    with pytest.raises(DataError, match="a conversation with tools needs a chat template"):
        render_messages(MESSAGES[:1], alpaca, qwen_tok, tools=TOOLS)


def _with(i: int, **changes) -> dict:
    messages = copy.deepcopy(MESSAGES)
    for key, value in changes.items():
        if value is None:
            messages[i].pop(key, None)
        else:
            messages[i][key] = value
    return {"tools": TOOLS, "messages": messages}


@pytest.mark.parametrize("row,field,message", [
    ({"tools": {"name": "get_weather"}, "messages": MESSAGES}, "tools", "expected a list of function specs"),
    ({"tools": "[{'name': 1}]", "messages": MESSAGES}, "tools", "a JSON string that does not parse"),
    ({"tools": ["get_weather"], "messages": MESSAGES}, "tools[0]", "expected an object (function spec)"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}], "messages": MESSAGES},
     "tools[0].function.name", "a function spec needs a function name"),
    (_with(2, content=None), "messages[2].content", "missing"),
    (_with(2, content=7), "messages[2].content", "expected a string"),
    (_with(2, role="function"), "messages[2].role", "unknown role 'function'"),
    (_with(2, tool_call_id=3), "messages[2].tool_call_id", "expected a string"),
    (_with(1, tool_calls={"name": "get_weather"}), "messages[1].tool_calls", "expected a non-empty list"),
    (_with(1, tool_calls=[{"type": "function", "function": {"name": "get_weather"}}]),
     "messages[1].tool_calls[0].function.arguments", "expected the call's arguments as an object"),
    (_with(1, tool_calls=[{"arguments": {}}]), "messages[1].tool_calls[0].name",
     "a tool call needs a function"),
    (_with(0, tool_calls=[CALL]), "messages[0].tool_calls", "only assistant turns make tool calls"),
    (_with(1, tool_calls=None), "messages[1].content", "empty string"),
])
def test_malformed_tool_rows_name_file_row_and_field(write_jsonl, row, field, message):
    path = write_jsonl([{"messages": MESSAGES[:1] + MESSAGES[4:]}, row])
    with pytest.raises(DataError) as err:
        load_rows(str(path), DataConfig())
    assert str(err.value).startswith(f"{path}, row 2, field '{field}': {message}")


# ChatML that writes each call's name but skips tool results: every tool part but one is rendered
_CALLS_NO_RESULTS = (
    "{% for m in messages %}{% if m['role'] != 'tool' %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}{{ c['function']['name'] }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("template,row,field,message", [
    ("chatml", ROW, "tools", "the chat template ignores the tools"),
    ("chatml", {"messages": MESSAGES}, "messages[1].tool_calls[0]",
     "the chat template does not write this tool call (function 'get_weather'"),
    ("mistral", {"messages": MESSAGES}, "messages[1].tool_calls[0]",
     "the chat template does not write this tool call"),
    (_CALLS_NO_RESULTS, {"messages": MESSAGES}, "messages[2].content",
     "the chat template does not write this tool result"),
])
def test_a_template_that_drops_tool_parts_is_an_error(smol_tok, write_jsonl, template, row, field, message):
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = NAMED.get(template, template)
    path = write_jsonl([{"messages": MESSAGES[:1] + MESSAGES[4:]}, row])
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(dataset=str(path)), tok, 2048)
    assert str(err.value).startswith(f"{path}, row 2, field '{field}': {message}")
    skipped = build_dataset(DataConfig(dataset=str(path), on_bad_row="skip"), tok, 2048)
    assert skipped.summary.skipped == {"template drops tools": 1} and len(skipped.examples) == 1


def test_a_dataset_entry_names_its_own_tools_column(qwen_tok, write_jsonl):
    from fasttune.config import ConfigError, RunConfig, apply_overrides
    from fasttune.data import mixing

    path = write_jsonl([{"functions": TOOLS, "messages": MESSAGES}])
    entry = {"path": str(path), "columns": {"tools": "functions"}}
    data = apply_overrides(RunConfig(), {"data": {"dataset": [entry]}}, "test").data
    (ex,) = mixing.build_train(data, qwen_tok, 2048, seed=1).examples
    assert ex.input_ids == qwen_tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=True,
                                                        return_dict=True)["input_ids"]
    old = {"data": {"dataset": [{"path": str(path), "format": "completion"}]}}
    with pytest.raises(ConfigError, match=r"dataset\[1\] .*\.format: 'completion': plain text rows are "
                                          r"format 'text' now"):
        apply_overrides(RunConfig(), old, "t")


@pytest.mark.parametrize("row,fmt", [
    ({"instruction": "Weather in Seoul?", "output": "Sunny.", "tools": TOOLS}, "alpaca"),
    ({"text": "Weather in Seoul: sunny.", "tools": TOOLS}, "text"),
    ({"prompt": "Weather in Seoul?", "completion": "Sunny.", "tools": TOOLS}, "prompt_completion"),
])
def test_tools_on_rows_without_chat_turns_are_an_error(write_jsonl, row, fmt):
    path = write_jsonl([{k: v for k, v in row.items() if k != "tools"}, row])
    with pytest.raises(DataError) as err:
        load_rows(str(path), DataConfig(format=fmt))
    assert str(err.value).startswith(f"{path}, row 2, field 'tools': a 'tools' column needs messages rows")
    assert len(load_rows(str(path), DataConfig(format=fmt, on_bad_row="skip")).rows) == 1
