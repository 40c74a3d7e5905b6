"""bench_pref on the CPU: its texts have the exact token counts its tables rest on, and fasttune and TRL's
DPOTrainer train the same token ids from them."""

import argparse

import bench_pref as bp
import pytest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from make_assets import make_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("smollm2") / "tokenizer"))


def test_rows_have_exact_lengths(tokenizer):
    rows = bp.pref_rows(tokenizer, pairs=2, steps=3, prompt_len=40, completion_len=24)
    assert len(rows) == 6 and len({r["prompt"] for r in rows}) == 6
    for r in rows:
        assert r["chosen"] != r["rejected"]
        for k in ("chosen", "rejected"):
            ex = bp.pair_example(tokenizer, r["prompt"], r[k])
            assert len(ex.input_ids) == 64
            assert sum(lab != -100 for lab in ex.labels) == 24  # the completion, EOS included
            assert ex.input_ids[-1] == tokenizer.eos_token_id


def test_a_row_of_the_wrong_length_is_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(bp, "texts", lambda words, count, length, seed: ["tokenizer's"] * count)
    with pytest.raises(SystemExit, match="tokens, not"):
        bp.pref_rows(tokenizer, pairs=1, steps=1, prompt_len=4, completion_len=4)


@pytest.mark.slow
def test_trl_tokenizes_the_rows_as_fasttune_trains_them(tokenizer, tmp_path):
    """TRL's DPOTrainer (the TRL and Unsloth rows) builds the ids fasttune trains: prompt, completion, EOS."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = bp.pref_rows(tokenizer, pairs=2, steps=1, prompt_len=12, completion_len=10)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=22)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    for row, prepared in zip(rows, trainer.train_dataset):
        for k in ("chosen", "rejected"):
            ours = bp.pair_example(tokenizer, row["prompt"], row[k])
            assert prepared["prompt_ids"] + prepared[f"{k}_ids"] == ours.input_ids
            assert len(prepared[f"{k}_ids"]) == 10


def test_step_tokens_counts_both_sequences_of_each_pair():
    args = argparse.Namespace(pairs=2, prompt_len=512, completion_len=512)
    assert bp.step_tokens(args) == 4096
