"""A notebook script ported to fasttune as a user ports it: only its import lines change."""

from __future__ import annotations

from pathlib import Path


def ported(notebook: Path, imports: dict[str, str], tmp_path: Path) -> Path:
    """`notebook` with each import line of `imports` (each found exactly once) replaced by fasttune's, written
    to tmp_path/notebook.py; every other line is checked unchanged."""
    original = notebook.read_text()
    text = original
    for theirs, ours in imports.items():
        assert original.count(theirs) == 1, theirs
        text = text.replace(theirs, ours)
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines()) if a != b]
    assert len(changed) == len(imports)
    assert all(a.startswith("from ") and b.startswith("from fasttune import") for a, b in changed)
    script = tmp_path / "notebook.py"
    script.write_text(text)
    return script
