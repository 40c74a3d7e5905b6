"""`fasttune generate`, `chat` and `eval` as a user runs them: a base model directory, a run directory with an
adapter and prompt contract, stdin for chat."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml
from infer_models import real_vocab_model

from fasttune.cli import main
from fasttune.config import RunConfig
from fasttune.data.templates import encode_prompt, make_contract, render_prompt
from fasttune.infer.generate import generate
from fasttune.lora.apply import apply_lora
from fasttune.lora.peft_format import save_adapter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir, smollm2_tokenizer):
    """runs/x as training leaves it: run.yaml naming the base, adapter/ with LoRA weights and the contract."""
    run = tmp_path_factory.mktemp("run")
    cfg = RunConfig()
    cfg.model.model_name = str(model_dir)
    (run / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    model = real_vocab_model()
    apply_lora(model, 4, 8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter is not the identity
    save_adapter(model, run / "adapter", base_model_name_or_path=str(model_dir))
    make_contract("alpaca", "alpaca", smollm2_tokenizer).save(run / "adapter" / "prompt_contract.json")
    return run, model


def test_generate_from_a_base_model_directory(model_dir, smollm2_tokenizer, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--raw",
                "Once upon a time",
                "--max_new_tokens",
                "8",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    ids = smollm2_tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    expected = generate(real_vocab_model(), ids, max_new_tokens=8, tokenizer=smollm2_tokenizer)
    assert (
        out.out
        == smollm2_tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip() + "\n"
    )
    assert "tokens/s" in out.err and "loaded " in out.err


def test_generate_with_a_run_renders_the_instruction_and_uses_the_adapter(run_dir, smollm2_tokenizer, capsys):
    run, lora_model = run_dir
    assert (
        main(
            [
                "generate",
                "--run",
                str(run),
                "--instruction",
                "Name the inventor.",
                "--max_new_tokens",
                "8",
                "--no_stream",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    contract = make_contract("alpaca", "alpaca", smollm2_tokenizer)
    prompt = encode_prompt(
        render_prompt("Name the inventor.", "", contract, smollm2_tokenizer), contract, smollm2_tokenizer
    )
    ids = torch.tensor([prompt])
    with_adapter = generate(lora_model, ids, max_new_tokens=8, eos_token_ids=[contract.eos_id])
    without = generate(real_vocab_model(), ids, max_new_tokens=8, eos_token_ids=[contract.eos_id])
    text = smollm2_tokenizer.decode(with_adapter[0, len(prompt) :], skip_special_tokens=True)
    for stop in contract.stop_strings:
        text = text.split(stop)[0]
    assert not torch.equal(with_adapter, without)  # so the comparison below shows the adapter was loaded
    assert out == text.strip() + "\n"  # the CLI drops leading and trailing blank space


def test_chat_reads_stdin_until_exit(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhow are you?\n/exit\nnot read\n"))
    assert main(["chat", "--model", str(model_dir), "--max_new_tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens/s") == 2 and "(conversation cleared)" in err


def test_eval_writes_loss_perplexity_and_matches(run_dir, tmp_path, capsys):
    run, _ = run_dir
    data = tmp_path / "held_out.jsonl"
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--run",
                str(run),
                "--dataset",
                str(data),
                "--max_new_tokens",
                "4",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    result = json.loads(out_json.read_text())
    assert result["n_rows"] == 3 and result["n_answered"] == 3 and result["eval_tokens"] > 0
    assert 0.0 <= result["exact_match"] <= result["normalized_match"] <= 1.0
    assert "perplexity" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, model_dir, capsys):
    assert main(["generate", "--run", str(tmp_path), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttune: error: cannot load") and "not a run directory" in err
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert "fasttune: error: nothing to generate from" in capsys.readouterr().err
