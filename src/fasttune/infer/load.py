"""What generation, chat and eval load: a base model, plus a LoRA adapter, plus the run's prompt contract.

Three ways to name it: a run directory (`runs/x`: run.yaml names the base, adapter/ holds the LoRA weights,
tokenizer and prompt contract), an adapter directory (PEFT files; the base from its run.yaml or its
adapter_config.json), or a base model alone (no contract: prompts are used as given).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fasttune.config import ModelConfig
from fasttune.data.templates import PromptContract
from fasttune.run_dir import ADAPTER_CONFIG, CONTRACT_FILE, Location
from fasttune.run_dir import locate as locate_run


@dataclass
class InferenceModel:
    model: torch.nn.Module
    tokenizer: Any
    contract: PromptContract | None  # None for a base model without a run
    eos_token_ids: list[int]
    description: str  # what was loaded, for the first line the CLI prints
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


@dataclass
class _Found:
    base: ModelConfig
    location: Location | None  # None: a base model alone


def _preset_for_hub_id(name: str) -> str:
    """Adapters record the hub id of a preset's base; map it back so nothing is downloaded."""
    from fasttune.models.presets import PRESETS

    for preset, spec in PRESETS.items():
        if spec.get("hf_id") == name:
            return preset
    return name


def locate(path: str | Path, model_name: str | None = None) -> _Found:
    """A run or adapter directory -> the base model config and where the adapter is."""
    from fasttune.config import load_yaml

    where = locate_run(path)
    base = load_yaml(where.run.run_yaml, stored_run=True).model if where.run is not None else ModelConfig()
    if model_name is not None:
        base.model_name = model_name
    elif where.run is None:
        config = where.adapter_dir / ADAPTER_CONFIG
        recorded = json.loads(config.read_text()).get("base_model_name_or_path")
        if not recorded:
            raise ValueError(f"{config}: names no base model; pass --model")
        base.model_name = _preset_for_hub_id(recorded)
    return _Found(base, where)


def stop_ids(contract: PromptContract | None, tokenizer: Any, source: str | None = None) -> list[int]:
    """Token ids that end an answer: the contract's EOS and end-of-turn token, or the tokenizer's EOS and
    the base model's generation_config eos ids (Llama 3 instruct ends turns with <|eot_id|>)."""
    ids: list[int] = []
    if contract is not None:
        ids.append(contract.eos_id)
        if contract.end_of_turn:
            eot = tokenizer.convert_tokens_to_ids(contract.end_of_turn)
            if isinstance(eot, int) and eot != tokenizer.unk_token_id:
                ids.append(eot)
    elif tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if source is not None and (Path(source) / "generation_config.json").is_file():
        eos = json.loads((Path(source) / "generation_config.json").read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys(int(i) for i in ids))


def attach_adapter(loaded: Any, adapter_dir: Path) -> None:
    """Read a PEFT adapter into the loaded model: our LoRA layers, or PEFT's for the generic path."""
    if loaded.family == "llama":
        from fasttune.lora.peft_format import load_adapter

        load_adapter(loaded.model, adapter_dir)
    else:
        from peft import PeftModel

        loaded.model.hf_model = PeftModel.from_pretrained(loaded.model.hf_model, str(adapter_dir))
    loaded.model.eval()


def load_for_inference(
    model_name: str | None = None,
    *,
    adapter: str | Path | None = None,
    run: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool | None = None,
    cpu_fallback_16bit: bool = False,
    trust_remote_code: bool = False,
    as_gguf: str | None = None,
) -> InferenceModel:
    """Load what `fasttune generate/chat/eval` talk to. `run` is a run or adapter directory; `adapter` an
    adapter directory on top of `model_name`; neither: the base model alone. `trust_remote_code` comes
    only from this call: what a run directory saved never turns it on. `as_gguf` (f16 or bf16): compute as
    llama.cpp's CPU backend runs that GGUF export of the model (infer/gguf_arithmetic.py); needs fp32."""
    from fasttune.models.loading import load_model
    from fasttune.train.precision import resolve_device

    if run is not None and adapter is not None:
        raise ValueError("pass either a run directory or --adapter, not both")
    if as_gguf is not None:
        if dtype not in ("auto", "fp32"):
            raise ValueError(f"--as_gguf {as_gguf} computes in fp32 with {as_gguf} weights: "
                             f"not --dtype {dtype}")
        dtype = "fp32"
    found = locate(run or adapter, model_name) if (run or adapter) else _Found(
        ModelConfig(model_name=model_name or ModelConfig().model_name), None)
    base = replace(found.base, dtype=dtype, trust_remote_code=trust_remote_code,
                   cpu_fallback_16bit=cpu_fallback_16bit or found.base.cpu_fallback_16bit)
    if load_in_4bit is not None:
        base.load_in_4bit = load_in_4bit
    dev = resolve_device(device)
    if trust_remote_code:
        from fasttune.models.loading import resolve_source
        from fasttune.remote_code import warn_remote_code

        warn_remote_code(resolve_source(base))
    loaded = load_model(base, dev)
    notes = list(loaded.notes)
    tokenizer, contract = loaded.tokenizer, None
    what = f"{base.model_name} ({loaded.family}, {str(loaded.dtype).removeprefix('torch.')}, {dev})"
    if found.location is not None:
        adapter_dir = found.location.adapter_dir
        attach_adapter(loaded, adapter_dir)
        what += f" + adapter {adapter_dir}"
        contract_path = found.location.contract_path()
        if contract_path is not None:
            contract = PromptContract.load(contract_path)
        if (adapter_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if contract is None:
            notes.append(f"{adapter_dir}: no {CONTRACT_FILE}; prompts are used as given")
    if as_gguf is not None:
        from fasttune.infer.gguf_arithmetic import use_gguf_arithmetic

        hf = getattr(loaded.model, "hf_model", None)
        if hf is not None and hasattr(hf, "merge_and_unload"):  # PEFT on the generic path
            loaded.model.hf_model = hf.merge_and_unload()
        use_gguf_arithmetic(loaded.model, as_gguf)
        what += f", computed as llama.cpp's CPU backend runs its {as_gguf} GGUF"
    eos = stop_ids(contract, tokenizer, loaded.source)
    return InferenceModel(loaded.model, tokenizer, contract, eos, what, notes)
