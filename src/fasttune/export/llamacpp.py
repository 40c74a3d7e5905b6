"""The real llama.cpp as a reader of exported GGUF files, through the npm package `node-llama-cpp`.

node-llama-cpp ships llama.cpp prebuilt for CPUs, so no compiler is needed. `scripts/setup_llamacpp.sh`
installs the pinned version into `.llamacpp/` of the repository, or set FASTTUNE_LLAMACPP_DIR to a
directory that holds `node_modules/node-llama-cpp`. FASTTUNE_LLAMACPP_THREADS sets llama.cpp's threads
(default: up to 4). `llamacpp_reader.mjs` loads one file and answers a list
of requests as JSON (metadata, tokenize, greedy generation, next-token log-probabilities, chat template);
this module runs it with `node` and returns the answers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_LLAMA_CPP_VERSION = "3.21.1"
_READER = Path(__file__).with_name("llamacpp_reader.mjs")
_REPO_DIR = Path(__file__).resolve().parents[3] / ".llamacpp"  # the source checkout's install folder


class LlamaCppError(RuntimeError):
    """node-llama-cpp failed on a file; the message carries its stderr."""


@dataclass(frozen=True)
class LlamaCpp:
    node: str
    entry: Path  # node-llama-cpp's dist/index.js
    version: str  # node-llama-cpp's version

    @property
    def name(self) -> str:
        return f"llama.cpp (node-llama-cpp {self.version}, CPU)"

    def run(
        self, jobs: list[tuple[str | Path, list[dict]]], *, context: int = 512, timeout: float = 900
    ) -> dict:
        """Answer each job's requests on its GGUF file in one node process.

        Returns {"llama_cpp": versions, "jobs": [[result, ...], ...]}.
        """
        payload = {
            "jobs": [{"model": str(Path(m).resolve()), "requests": reqs} for m, reqs in jobs],
            "context": context,
            "threads": int(os.environ.get("FASTTUNE_LLAMACPP_THREADS") or min(4, os.cpu_count() or 1)),
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(payload, f)
        env = {**os.environ, "NODE_LLAMA_CPP_ENTRY": str(self.entry)}
        try:
            out = subprocess.run(
                [self.node, str(_READER), f.name], capture_output=True, text=True, env=env, timeout=timeout
            )
        finally:
            os.unlink(f.name)
        if out.returncode != 0:
            tail = "\n".join(out.stderr.strip().splitlines()[-8:])
            names = ", ".join(str(m) for m, _ in jobs)
            raise LlamaCppError(f"llama.cpp could not read {names}: {tail}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def results(self, model: str | Path, requests: list[dict], **kw: Any) -> list[dict]:
        """The answers to `requests` on one file."""
        return self.run([(model, requests)], **kw)["jobs"][0]


def find_llamacpp() -> LlamaCpp | None:
    """node + node-llama-cpp if both are installed (FASTTUNE_LLAMACPP_DIR or the checkout's .llamacpp/)."""
    node = shutil.which("node")
    root = Path(os.environ.get("FASTTUNE_LLAMACPP_DIR") or _REPO_DIR)
    package = root / "node_modules" / "node-llama-cpp"
    entry = package / "dist" / "index.js"
    if node is None or not entry.is_file():
        return None
    version = json.loads((package / "package.json").read_text()).get("version", "?")
    return LlamaCpp(node, entry, version)


def greedy_request(tokens: list[int], max_tokens: int, stop_ids: list[int]) -> dict:
    return {"op": "generate", "tokens": list(tokens), "max_tokens": max_tokens, "stop_ids": list(stop_ids)}


def perplexity(logprob_lists: list[list[float]]) -> float:
    """exp of the mean negative log-probability over every predicted token of every sequence."""
    flat = [lp for lps in logprob_lists for lp in lps]
    return math.exp(-sum(flat) / len(flat))
