"""Is a merged checkpoint ready for vLLM and TGI? The files and fields those servers read, checked.

vLLM and text-generation-inference load a Hugging Face directory through transformers' own readers:
config.json (`architectures`, `model_type`, `torch_dtype`, the context length), the safetensors weights
(one file or an index whose shards all exist), the tokenizer (tokenizer.json + tokenizer_config.json,
with the chat template their OpenAI chat routes apply) and generation_config.json, whose `eos_token_id`
list both add to the stop tokens. `serving_problems` lists what is missing; `SERVE_COMMANDS` are the
commands to serve the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from fasttune.data.templates import PromptContract
from fasttune.export.contract import CONTRACT_FILE, stop_token_ids

SERVE_COMMANDS = (
    "vllm serve {dir} --served-model-name {name}",
    "docker run --gpus all -p 8080:80 -v {dir}:/model ghcr.io/huggingface/text-generation-inference "
    "--model-id /model",
)


def _weights_problems(d: Path) -> list[str]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return [
            f"{d / s}: shard named in the index is missing" for s in sorted(shards) if not (d / s).is_file()
        ]
    if not (d / "model.safetensors").is_file():
        return [f"{d}: no model.safetensors or model.safetensors.index.json"]
    return []


def serving_problems(model_dir: str | Path, stop_ids: list[int] | None = None) -> list[str]:
    """What vLLM / TGI would miss in `model_dir`; empty when ready.

    stop_ids: ids that must stop generation (default: those of the prompt contract saved beside the
    weights, EOS and the end-of-turn token).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    d = Path(model_dir)
    if stop_ids is None and (d / CONTRACT_FILE).is_file() and (d / "tokenizer.json").is_file():
        contract = PromptContract.load(d / CONTRACT_FILE)
        stop_ids = stop_token_ids(contract, AutoTokenizer.from_pretrained(d))
    problems = _weights_problems(d)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return [*problems, f"{cfg_path}: missing"]
    raw = json.loads(cfg_path.read_text())
    config = AutoConfig.from_pretrained(d)
    if not raw.get("architectures"):
        problems.append(f"{cfg_path}: no 'architectures' (vLLM picks the model class from it)")
    if raw.get("quantization_config"):
        problems.append(f"{cfg_path}: quantization_config on 16-bit weights")
    if not (raw.get("torch_dtype") or raw.get("dtype")):
        problems.append(f"{cfg_path}: no torch_dtype (vLLM's --dtype auto reads it)")
    if not any(getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")):
        problems.append(f"{cfg_path}: no context length (max_position_embeddings)")
    if not (d / "tokenizer.json").is_file():
        problems.append(f"{d}: no tokenizer.json (the servers need a fast tokenizer)")
    else:
        tokenizer = AutoTokenizer.from_pretrained(d)
        if not getattr(tokenizer, "chat_template", None):
            problems.append(f"{d}: the tokenizer has no chat template (the chat routes need one)")
    gen_path = d / "generation_config.json"
    if not gen_path.is_file():
        problems.append(f"{gen_path}: missing (its eos_token_id list is what stops generation)")
    else:
        eos = GenerationConfig.from_pretrained(d).eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        missing = [i for i in stop_ids or [] if i not in eos]
        if missing:
            problems.append(f"{gen_path}: eos_token_id {eos} lacks the stop ids {missing}")
    return problems
