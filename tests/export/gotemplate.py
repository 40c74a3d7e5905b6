"""A small interpreter of Go's text/template, enough for Ollama Modelfile TEMPLATEs, written for the tests.

Follows Go's semantics for what it covers: text and {{ actions }} (with the - trim markers), if / else if /
else / end, range over a list with `$i, $m :=`, variable declarations, fields (.X, $.X, $m.X, (expr).X),
string and integer literals, parenthesised pipelines, and the built-in functions eq, ne, not, and, or,
len, index and slice. Truth is Go's: false, 0, "" and empty lists are false. Anything else is an error, so
a template using more than this fails the test instead of rendering wrongly.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$?[A-Za-z_]\w*(?:\.\w+)*|\$(?:\.\w+)*|\.(?:\w+(?:\.\w+)*)?|-?\d+)'
)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"cannot read {text[pos:]!r}")
        out.append(m.group(1))
        pos = m.end()
        if pos < len(text) and text[pos] == "." and out[-1] == ")":  # (expr).Field
            f = re.match(r"\.\w+(?:\.\w+)*", text[pos:])
            out.append("FIELD" + f.group(0))
            pos += f.end()
    return out


def _truth(v: Any) -> bool:
    return bool(v)


def _field(v: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        v = v[name] if isinstance(v, dict) else getattr(v, name)
    return v


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "index": lambda v, *ks: _index(v, ks),
    "slice": lambda v, *ks: v[ks[0] : ks[1]] if len(ks) == 2 else v[ks[0] :] if ks else v,
}


def _index(v: Any, keys: tuple) -> Any:
    for k in keys:
        v = v[k]
    return v


class _Scope:
    def __init__(self, root: Any):
        self.root, self.dot, self.vars = root, root, [{"$": root}]

    def var(self, name: str) -> Any:
        for frame in reversed(self.vars):
            if name in frame:
                return frame[name]
        raise KeyError(name)


def _eval(tokens: list[str], scope: _Scope) -> Any:
    """A pipeline of one command: a function call or an operand."""
    args, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            value = _eval(tokens[i + 1 : j - 1], scope)
            if j < len(tokens) and tokens[j].startswith("FIELD"):
                value = _field(value, tokens[j][5:])
                j += 1
            args.append(value)
            i = j
            continue
        if t.startswith('"'):
            args.append(json.loads(t))
        elif re.fullmatch(r"-?\d+", t):
            args.append(int(t))
        elif t.startswith("$"):
            name, _, path = t.partition(".")
            args.append(_field(scope.var(name), path))  # $, $.X, $m, $m.X
        elif t.startswith("."):
            args.append(_field(scope.dot, t[1:]))
        elif t in ("and", "or"):
            args.append(t)
        elif t in _FUNCS:
            args.append(_FUNCS[t])
        else:
            raise ValueError(f"unknown identifier {t!r}")
        i += 1
    head = args[0]
    if head == "and":
        return next((a for a in args[1:] if not _truth(a)), args[-1])
    if head == "or":
        return next((a for a in args[1:] if _truth(a)), args[-1])
    if callable(head):
        return head(*args[1:])
    if len(args) != 1:
        raise ValueError(f"{tokens} is not a function call")
    return head


def _parse(template: str) -> list:
    """Nodes: str | ("out", toks) | ("set", name, toks) | ("if", [(toks, body)], else_body)
    | ("range", key, value, toks, body)."""
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip(), bool(m.group(3))))
        pos = m.end()
    parts.append(("text", template[pos:]))
    for i, p in enumerate(parts):  # a -}} trims the whitespace after it
        if p[0] == "action" and p[2] and i + 1 < len(parts):
            parts[i + 1] = ("text", parts[i + 1][1].lstrip())
    nodes, stack = [], []
    current = nodes
    for p in parts:
        if p[0] == "text":
            if p[1]:
                current.append(p[1])
            continue
        action = p[1]
        if action.startswith("/*"):
            continue
        if action.startswith("if "):
            node = ["if", [(_tokens(action[3:]), [])], None]
            current.append(node)
            stack.append((current, node))
            current = node[1][0][1]
        elif action.startswith("else if "):
            node = stack[-1][1]
            node[1].append((_tokens(action[8:]), []))
            current = node[1][-1][1]
        elif action == "else":
            node = stack[-1][1]
            node[2] = []
            current = node[2]
        elif action.startswith("range "):
            m = re.fullmatch(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", action, re.S)
            node = ["range", m.group(1), m.group(2), _tokens(m.group(3)), []]
            current.append(node)
            stack.append((current, node))
            current = node[4]
        elif action == "end":
            current, _ = stack.pop()
        elif re.match(r"\$\w+\s*:=", action):
            name, expr = action.split(":=", 1)
            current.append(["set", name.strip(), _tokens(expr)])
        else:
            current.append(["out", _tokens(action)])
    if stack:
        raise ValueError("unclosed {{ if }} or {{ range }}")
    return nodes


def _run(nodes: list, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            value = _eval(node[1], scope)
            out.append(str(value))
        elif node[0] == "set":
            scope.vars[-1][node[1]] = _eval(node[2], scope)
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, scope)):
                    _run(body, scope, out)
                    break
            else:
                if node[2] is not None:
                    _run(node[2], scope, out)
        elif node[0] == "range":
            items, saved = _eval(node[3], scope), scope.dot
            for i, item in enumerate(items):
                scope.vars.append({node[1]: i, node[2]: item})
                scope.dot = item
                _run(node[4], scope, out)
                scope.vars.pop()
            scope.dot = saved


def render(template: str, data: dict) -> str:
    out: list[str] = []
    _run(_parse(template), _Scope(data), out)
    return "".join(out)
