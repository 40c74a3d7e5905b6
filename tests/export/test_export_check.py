"""check_export(): one held-out prompt decoded from the artifact and from base + adapter, compared."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fasttune.export.check import CheckResult, check_export, held_out_prompt
from fasttune.export.contract import load_contract, load_tokenizer
from fasttune.export.gguf import export_gguf
from fasttune.export.merge import merge
from fasttune.export.source import resolve_source


def test_merged_fp32_decodes_identically(run_dir, tmp_path):
    out = merge(run_dir, tmp_path / "merged", dtype="fp32")
    result = check_export(run_dir, out, max_new_tokens=16)
    assert result.identical and result.agreement == 1.0
    assert len(result.exported_ids) > 0 and result.prompt_ids_match
    assert "identical" in result.summary() and "EOS reached" in result.summary()


def test_check_sees_a_different_model(run_dir, llama_dir, tmp_path):
    """The check must fail to agree with an artifact that lacks the adapter (the base itself)."""
    result = check_export(run_dir, llama_dir, max_new_tokens=16)
    assert not result.identical and result.agreement < 1.0
    assert "reference:" in result.summary()


def test_gguf_check_reports_agreement(run_dir, tmp_path):
    path = export_gguf(run_dir, tmp_path / "m.gguf", type="q8_0")
    result = check_export(run_dir, path, max_new_tokens=16, use_llamacpp=False)
    assert result.prompt_ids_match  # the GGUF's own tokenizer encodes the prompt as the run's does
    assert 0.0 <= result.agreement <= 1.0 and result.exported_ids
    assert result.artifact.endswith("m.gguf")
    assert result.reader.startswith("transformers (GGUF reader")
    assert "(read by transformers (GGUF reader" in result.summary()


def test_gguf_check_reads_with_llama_cpp(llama_cpp, run_dir, tmp_path):
    path = export_gguf(run_dir, tmp_path / "m.f32.gguf", type="f32")
    result = check_export(run_dir, path, max_new_tokens=16)
    assert result.reader == llama_cpp.name and "node-llama-cpp 3.21.1" in result.summary()
    assert result.prompt_ids_match  # llama.cpp's tokenizer, special tokens parsed, gives the run's ids
    assert result.identical, result.summary()


def test_check_without_llama_cpp_refuses_an_architecture_transformers_cannot_read(gpt2_adapter, tmp_path):
    import pytest

    from fasttune.export.source import ExportError

    _, adapter = gpt2_adapter
    path = export_gguf(adapter, tmp_path / "g.gguf", type="f32")
    with pytest.raises(ExportError, match="gpt2 GGUF with llama.cpp only.*--no_check"):
        check_export(adapter, path, use_llamacpp=False)


def test_held_out_prompt_comes_from_the_runs_eval_set(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "run.yaml").write_text(
        json.dumps(
            {
                "model": json.loads((run_dir / "run.yaml").read_text())["model"],
                "data": {"dataset": "builtin:lumen", "eval_dataset": "auto"},
            }
        )
    )
    src = resolve_source(run)
    prompt = held_out_prompt(src, load_contract(src), load_tokenizer(src))
    from fasttune.data.builtin import builtin_file

    first = json.loads(builtin_file("builtin:lumen", "eval").read_text().splitlines()[0])
    assert first["instruction"] in prompt and prompt.startswith("<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_eos_flags():
    r = CheckResult(
        "a",
        "p",
        reference_ids=[5, 6, 2],
        exported_ids=[5, 7],
        reference_text="",
        exported_text="",
        stop_ids=[2],
    )
    assert r.eos_reference and not r.eos_exported
    assert r.agreement == 1 / 3 and not r.identical
    assert "EOS reached: exported no, reference yes" in r.summary()


def test_gguf_arithmetic_is_the_same_in_fasttune_and_transformers(run_dir):
    """`--as_gguf bf16` on fasttune's model and on transformers + PEFT merged: the same logits; weights
    bf16 values, the adapter merged (the fp32 reference differs by far more than the two)."""
    from fasttune.export.check import reference_model
    from fasttune.export.source import resolve_source
    from fasttune.infer.load import load_for_inference

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    im = load_for_inference(run=run_dir, device="cpu", as_gguf="bf16")
    assert all(torch.equal(p, p.bfloat16().float()) for p in im.model.parameters() if p.dim() == 2)
    src = resolve_source(run_dir)
    with torch.no_grad():
        ours = im.model(ids).logits
        theirs = reference_model(src, "bf16")(ids).logits
        fp32 = reference_model(src)(ids).logits
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((fp32 - theirs).abs().max()) > 10 * float((ours - theirs).abs().max())
    with pytest.raises(ValueError, match="not --dtype bf16"):
        load_for_inference(run=run_dir, device="cpu", dtype="bf16", as_gguf="bf16")


def test_bf16_gguf_check_uses_llama_cpps_arithmetic(llama_cpp, run_dir, tmp_path):
    path = export_gguf(run_dir, tmp_path / "m.bf16.gguf", type="bf16")
    result = check_export(run_dir, path, max_new_tokens=16)
    assert result.reader == llama_cpp.name
    assert "computed as llama.cpp's CPU backend computes a bf16 file" in result.summary()
    assert result.identical, result.summary()
