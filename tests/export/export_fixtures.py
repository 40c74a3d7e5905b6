"""Builders for the export tests: a tiny byte-level BPE tokenizer with a ChatML template, a tiny random
Llama saved by transformers, LoRA adapters saved by PEFT with non-zero B (a 'trained' adapter), and the
transformers + PEFT reference logits."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The tide-harp has seven strings and a brass frame.",
    "def f(x):\n    return x * 2\n",
    "안녕하세요, 세계! 조율은 어렵습니다.",
    "Emoji 🙂🚀 and symbols: <=> != ==",
    "    indented    spaces\t\ttabs",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "### Instruction:\n### Response:\n",
    "numbers 12345 and 3.14159",
    "Ünïcödé façade naïve café",
] * 4


def build_tokenizer(add_bos: bool = False):
    """A 400-token byte-level BPE (GPT-2 pre-tokenizer) with ChatML specials, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A",
            pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", 1)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def save_llama(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            **TINY_LLAMA,
            "vocab_size": len(tokenizer) + 5,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            **overrides,
        }
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_peft_adapter(
    model_dir: Path,
    out: Path,
    tokenizer=None,
    template: str = "chat",
    seed: int = 1,
    init_scale: float = 0.2,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    **lora_kwargs,
) -> Path:
    """A PEFT adapter on `model_dir` with random non-zero B, plus tokenizer and prompt contract.

    init_scale: standard deviation of the random A and B (0.2 changes a tiny model's logits a lot).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    kwargs = dict(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(base, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * init_scale)
    peft_model.save_pretrained(out)
    if tokenizer is not None:
        from fasttune.data.templates import make_contract

        tokenizer.save_pretrained(out)
        fmt = "messages" if template == "chat" else "alpaca"
        make_contract(template, fmt, tokenizer).save(out / "prompt_contract.json")
    return out


def peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Reference: transformers base + PEFT adapter (unmerged), fp32 logits (B, T, V)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(ids).logits
