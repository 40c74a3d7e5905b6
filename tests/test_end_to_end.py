"""The default job on the real embedded model: SmolLM2-135M-Instruct learns the Lumen dataset.

It runs exactly what `fasttune train` runs with no options (only the output directory and the sample
printing differ) and asserts that learning is visible: the held-out loss falls, and the greedy answers
to the fixed probe questions (held-out phrasings) contain the dataset's invented facts for most of them.
The base model cannot know these facts, which the test checks too.
"""

from __future__ import annotations

import pytest

from fasttune import api
from fasttune.config import RunConfig


def probe_hits(samples, probes) -> list[bool]:
    return [all(k.lower() in s.answer.lower() for k in p["expect"]) for s, p in zip(samples, probes)]


@pytest.mark.slow
def test_default_job_learns_the_embedded_dataset(tmp_path):
    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.show_samples = 0
    probes = api.probe_questions()
    lines: list[str] = []

    result = api.train(cfg, log=lines.append)
    after = api.answer(result.model, result.tokenizer, result.contract, probes)
    hits = probe_hits(after, probes)
    report = "\n".join(f"{'OK' if ok else '--'} {s.question} -> {s.answer}" for ok, s in zip(hits, after))

    m = result.metrics
    assert m["eval_loss"] < 0.5 * m["first_eval_loss"], report
    assert sum(hits) > len(probes) // 2, report  # most of them

    # the facts were learned, not known: with the adapter switched off the same probes fail
    from fasttune.lora.apply import lora_modules

    for _, module in lora_modules(result.model):
        module.lora_B.weight.data.zero_()
    base_hits = probe_hits(api.answer(result.model, result.tokenizer, result.contract, probes), probes)
    assert sum(base_hits) <= 1, report
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert any("eval loss" in line for line in lines)
