"""gpu_run.sh: every suite and part it names runs something, the docs name only parts that exist, and a
wrong name stops it with status 2 before anything runs."""

import re
import subprocess
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_run.sh"


def parts() -> dict[str, list[str]]:
    """The script's PARTS table: suite -> its parts ([] for a suite run whole)."""
    text = SCRIPT.read_text()
    table = re.search(r"declare -A PARTS=\((.*?)\)\n", text, re.S).group(1)
    table = table.replace("\\\n", "")  # a line continued inside the quotes, as bash reads it
    return {s: p.split() for s, p in re.findall(r'\[(\w+)\]="([^"]*)"', table)}


def test_every_part_runs_a_step():
    text = SCRIPT.read_text()
    found = parts()
    assert set(found) == {"tests", "headline", "batch2", "long", "shapes", "fp8", "decode", "serve", "uneven",
                          "pref", "checks", "ab", "dist"}
    for suite, names in found.items():
        for part in names or [None]:
            pattern = rf"has {suite} {re.escape(part)}\b" if part else rf"has {suite}( |$|\))"
            assert re.search(pattern, text, re.M), f"{suite}/{part} runs nothing"


@pytest.mark.parametrize("doc", ["RESULTS.md", "README.md"])
def test_docs_name_existing_suites_and_parts(doc):
    found = parts()
    named = re.findall(r"`([a-z0-9]+)/([a-z0-9-]+)`", (BENCHMARKS / doc).read_text())
    named += re.findall(r"gpu_run\.sh ([a-z0-9]+)/([a-z0-9-]+)", (BENCHMARKS / doc).read_text())
    assert named
    for suite, part in named:
        assert suite in found and part in found[suite], f"{doc} names {suite}/{part}"


@pytest.mark.parametrize("arg,message", [
    ("", "usage"), ("nosuch", "unknown suite 'nosuch'"), ("headline/nosuch", "has no part 'nosuch'"),
    ("decode/x", "has no part 'x'"), ("tests,long/9k", "has no part '9k'")])
def test_bad_names_exit_2_before_running(tmp_path, arg, message):
    run = subprocess.run(["bash", str(SCRIPT), arg], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert run.returncode == 2
    assert message in run.stderr and run.stdout == ""
