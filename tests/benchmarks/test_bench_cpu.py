"""bench_cpu's worker on a tiny Llama directory: both stacks train from the same weights to the same loss."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    directory = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def test_both_stacks_train_the_same_weights(tiny_llama_dir, capsys):
    from bench_cpu import print_table, worker

    rows = [dict(worker(stack, tiny_llama_dir, batch=2, seq=16, steps=2, warmup=1), run=0)
            for stack in ("fasttune", "hf")]
    ours, hf = rows
    # B = 0 at init, so the adapters are an identity: the first loss is the base model's on both stacks
    assert ours["loss0"] == pytest.approx(hf["loss0"], rel=1e-5)
    # r * (in + out) per projection: q, o 32->32; k, v 32->16 (2 KV heads of 8); gate, up, down 32<->48
    per_layer = 16 * (64 + 64 + 48 + 48 + 80 + 80 + 80)
    assert ours["trainable"] == hf["trainable"] == 2 * per_layer
    for r in rows:
        assert len(r["losses"]) == 3 and len(r["step_times"]) == 2 and r["tokens_per_s"] > 0
        assert r["peak_rss_mib"] >= r["rss_after_load_mib"] > 0
        json.dumps(r)  # a row must go to the JSONL file as it is
    print_table(rows)
    out = capsys.readouterr().out
    assert "median fasttune" in out and "x transformers + PEFT" in out
