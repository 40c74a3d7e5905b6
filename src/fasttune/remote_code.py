"""trust_remote_code: say which Python code of a model folder transformers may run, before it runs.

Only the current command line (`--trust_remote_code`) or Python call turns it on; a saved run.yaml or
YAML config cannot (config.load_yaml), so opening someone else's run never runs their code unasked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_warned: set[Path] = set()


def remote_code_warning(directory: str | Path) -> str:
    """One line naming the .py files of `directory` and the classes its config.json maps to code."""
    d = Path(directory)
    files = sorted(p.name for p in d.glob("*.py"))
    try:
        auto_map = json.loads((d / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        auto_map = {}
    mapped = sorted({str(v) for v in auto_map.values()}) if isinstance(auto_map, dict) else []
    code = ", ".join(files) or "no .py file there"
    if mapped:
        code += f"; config.json auto_map: {', '.join(mapped)}"
    return f"warning: trust_remote_code is on: transformers may import and run Python code from {d} ({code})"


def warn_remote_code(directory: str | Path) -> None:
    """Print `remote_code_warning` to stderr, once per model folder in this process."""
    d = Path(directory).resolve()
    if d not in _warned:
        _warned.add(d)
        print(remote_code_warning(d), file=sys.stderr)
