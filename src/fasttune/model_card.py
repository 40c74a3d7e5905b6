"""The model card (README.md) of an adapter, a merged model or a GGUF file: what it was trained from and
how, how well, the prompt format it expects, and how to load it in transformers/PEFT, llama.cpp and Ollama.

Everything on the card is read from the run directory (run.yaml, metrics.jsonl, the adapter's
adapter_config.json and prompt_contract.json); the metadata block is written with huggingface_hub's
ModelCardData, so the Hub reads base model, library and tags from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fasttune.data.templates import PromptContract
from fasttune.run_dir import ADAPTER_CONFIG, CONTRACT_FILE, Location, locate
from fasttune.train.metrics import read_metrics

KINDS = ("adapter", "merged", "gguf")
CARD_FILE = "README.md"


@dataclass
class CardFacts:
    """What a card says about a run; fields the run does not have stay None / empty."""

    base_model: str
    config: dict[str, Any] = field(default_factory=dict)  # run.yaml, by section
    adapter: dict[str, Any] = field(default_factory=dict)  # adapter_config.json
    contract: dict[str, Any] | None = None
    final_train: dict[str, Any] | None = None  # the last train record of metrics.jsonl
    final_eval: dict[str, Any] | None = None  # the last eval record
    first_eval: dict[str, Any] | None = None


def facts_of(run_or_adapter: str | Path) -> CardFacts:
    """CardFacts of a run directory or an adapter directory (a run's, or any PEFT adapter)."""
    where: Location = locate(run_or_adapter)
    adapter = json.loads((where.adapter_dir / ADAPTER_CONFIG).read_text())
    config: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    if where.run is not None:
        config = yaml.safe_load(where.run.run_yaml.read_text()) or {}
        records = read_metrics(where.run.metrics)
    contract_path = where.contract_path()
    contract = PromptContract.load(contract_path).to_dict() if contract_path is not None else None
    trains = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return CardFacts(base_model=str(adapter.get("base_model_name_or_path") or "unknown"), config=config,
                     adapter=adapter, contract=contract, final_train=trains[-1] if trains else None,
                     final_eval=evals[-1] if evals else None, first_eval=evals[0] if evals else None)


def _datasets(facts: CardFacts) -> list[dict[str, Any]]:
    """run.yaml's data.dataset as entries: one path, or each entry of a mixed list with the keys it set."""
    value = facts.config.get("data", {}).get("dataset")
    entries = value if isinstance(value, list) else [value] if value else []
    return [dict(e) if isinstance(e, dict) else {"path": str(e)} for e in entries]


def _dataset_line(entries: list[dict[str, Any]]) -> str:
    """`a.jsonl` (weight 0.7, format alpaca), ... with what a weight means where there are weights."""
    if not entries:
        return "not recorded"
    shown = []
    for e in entries:
        extra = ", ".join(f"{k} {v}" for k, v in e.items() if k != "path")
        shown.append(f"`{e.get('path')}`" + (f" ({extra})" if extra else ""))
    weighted = any("weight" in e for e in entries)
    return ", ".join(shown) + ("; a weight is the entry's share of the training examples of each epoch"
                               if weighted else "")


def _hub_ids(names: list[str]) -> list[str]:
    """The dataset names that are hub ids (org/name, not a local path), for the card's metadata."""
    out = []
    for name in names:
        name = name.split(":")[0] if not name.startswith("builtin:") else ""
        if name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~")):
            out.append(name)
    return out


def _method(facts: CardFacts) -> str:
    method = facts.config.get("method", {}).get("method", "sft")
    model = facts.config.get("model", {})
    quant = ("QLoRA (4-bit NF4 base)" if model.get("load_in_4bit") else
             "LoRA on an 8-bit base" if model.get("load_in_8bit") else
             "LoRA on an FP8 base" if model.get("load_in_fp8") else "LoRA")
    names = {"sft": "supervised fine-tuning", "dpo": "DPO", "orpo": "ORPO", "kto": "KTO", "grpo": "GRPO"}
    return f"{quant}, {names.get(method, method)}"


def _hyperparameters(facts: CardFacts) -> list[tuple[str, Any]]:
    a, t, m = facts.adapter, facts.config.get("train", {}), facts.config.get("model", {})
    rows: list[tuple[str, Any]] = [
        ("LoRA rank r", a.get("r")), ("lora_alpha", a.get("lora_alpha")),
        ("lora_dropout", a.get("lora_dropout")), ("use_rslora", a.get("use_rslora")),
        ("target_modules", ", ".join(sorted(a.get("target_modules") or []))),
    ]
    for key in ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "optim", "weight_decay",
                "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                "num_train_epochs", "precision", "seed"):
        if key in t:
            rows.append((key, t[key]))
    if "max_seq_length" in m:
        rows.append(("max_seq_length", m["max_seq_length"]))
    return [(k, v) for k, v in rows if v not in (None, "")]


def _results(facts: CardFacts) -> list[tuple[str, str]]:
    rows = []
    if facts.final_train:
        rows.append(("optimiser steps", str(facts.final_train["step"])))
        rows.append(("final train loss", f"{facts.final_train['loss']:.4f}"))
    if facts.final_eval:
        first = facts.first_eval["eval_loss"] if facts.first_eval else None
        at_start = first is not None and facts.first_eval["step"] == 0
        before = f" (before training {first:.4f})" if at_start else ""
        rows.append(("eval loss", f"{facts.final_eval['eval_loss']:.4f}{before}"))
        if facts.final_eval.get("perplexity") is not None:
            rows.append(("eval perplexity", f"{facts.final_eval['perplexity']:.2f}"))
        if facts.final_eval.get("n_answered"):
            n = facts.final_eval["n_answered"]
            for key, name in (("exact_match", "exact"), ("normalized_match", "normalised")):
                rows.append((f"held-out answers, {name} match", f"{facts.final_eval[key]:.1%} of {n}"))
    return rows


def _prompt_section(contract: dict[str, Any] | None) -> str:
    if contract is None:
        return ("The adapter directory holds no prompt_contract.json; prompts are framed as its tokenizer "
                "frames them.\n")
    template = contract.get("template")
    lines = [f"Trained with the **{template}** prompt template; prompts must be framed the same way "
             f"(`{CONTRACT_FILE}` holds the exact contract).", ""]
    if template == "alpaca" and contract.get("prompt_template"):
        lines += ["```", contract["prompt_template"], "```", ""]
        if contract.get("prompt_template_no_input"):
            lines += ["Without an input:", "", "```", contract["prompt_template_no_input"], "```", ""]
    elif template == "chat" and contract.get("chat_template"):
        lines += ["Chat template (Jinja):", "", "```jinja", contract["chat_template"], "```", ""]
    lines.append(f"- EOS: `{contract.get('eos_token')}` (id {contract.get('eos_id')}), trained at the end of "
                 "every response")
    if contract.get("bos_token"):
        how = "prepended" if contract.get("add_bos") else "written by the template where it wants one"
        lines.append(f"- BOS: `{contract['bos_token']}` (id {contract.get('bos_id')}), {how}")
    stops = contract.get("stop_strings") or []
    if contract.get("end_of_turn"):
        stops = [contract["end_of_turn"], *stops]
    if stops:
        lines.append("- stop at: " + ", ".join(f"`{s}`" for s in dict.fromkeys(stops)))
    return "\n".join(lines) + "\n"


def _usage(kind: str, facts: CardFacts, repo_id: str, gguf_name: str | None) -> str:
    base = facts.base_model
    if kind == "adapter":
        return f"""### transformers + PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

### fasttune

```bash
hf download {repo_id} --local-dir adapter/
fasttune chat --run adapter/
```

### llama.cpp and Ollama

Export the adapter merged into its base first:

```bash
fasttune export gguf RUN_OR_ADAPTER --out model.gguf --type q8_0
llama-cli -m model.gguf -cnv
fasttune export ollama RUN_OR_ADAPTER --out ollama/   # a Modelfile with this prompt template and stops
ollama create my-model -f ollama/Modelfile
```
"""
    if kind == "merged":
        return f"""### transformers

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

### llama.cpp and Ollama

```bash
fasttune export gguf THIS_DIRECTORY --out model.gguf --type q8_0   # or llama.cpp's convert_hf_to_gguf.py
llama-cli -m model.gguf -cnv
```
"""
    name = gguf_name or "model.gguf"
    return f"""### llama.cpp

```bash
llama-cli -hf {repo_id} -cnv            # or: llama-cli -m {name} -cnv
```

### Ollama

```bash
ollama run hf.co/{repo_id}
```

The GGUF metadata carries the chat template and EOS of the prompt contract below.
"""


def card_text(kind: str, facts: CardFacts, repo_id: str | None = None, gguf_name: str | None = None) -> str:
    """The README.md of an artifact of `kind` ('adapter', 'merged' or 'gguf') made from the run `facts`
    describes; `repo_id` is where it will live (for the loading examples)."""
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    repo = repo_id or "PATH_OR_REPO_ID"
    datasets = _datasets(facts)
    data = ModelCardData(
        base_model=None if facts.base_model == "unknown" or Path(facts.base_model).is_absolute()
        else facts.base_model,
        library_name={"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind],
        datasets=_hub_ids([str(e.get("path")) for e in datasets]) or None,
        tags=["fasttune", "lora", kind] + (["sft"] if "supervised" in _method(facts) else []),
        pipeline_tag="text-generation",
    )
    what = {"adapter": "A LoRA adapter for", "merged": "A fine-tuned model: LoRA merged into",
            "gguf": "A GGUF file of a LoRA fine-tune of"}[kind]
    hyper = "\n".join(f"| {k} | {v} |" for k, v in _hyperparameters(facts))
    results = _results(facts)
    result_text = ("| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in results)
                   if results else "No metrics were recorded with this adapter.")
    body = f"""# {repo.split('/')[-1]}

{what} **{facts.base_model}**, trained with fasttune ({_method(facts)}).

## Training

- base model: `{facts.base_model}`
- dataset(s): {_dataset_line(datasets)}
- method: {_method(facts)}

| hyperparameter | value |
|---|---|
{hyper}

## Results

{result_text}

## Prompt format

{_prompt_section(facts.contract)}
## How to use

{_usage(kind, facts, repo, gguf_name)}"""
    # the body is not a Jinja template (a chat template in it must stay as written)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def write_card(out: str | Path, kind: str, run_or_adapter: str | Path, repo_id: str | None = None,
               gguf_name: str | None = None) -> Path:
    """Write the card of `run_or_adapter`'s artifact to `out` (a directory gets README.md; a file path is
    written as given) and return its path."""
    out = Path(out)
    path = out / CARD_FILE if out.is_dir() else out
    path.write_text(card_text(kind, facts_of(run_or_adapter), repo_id, gguf_name))
    return path
