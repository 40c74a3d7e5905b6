"""`merge`: base model + LoRA adapter -> one 16-bit Hugging Face checkpoint, written shard by shard.

Each base tensor is read, merged (`W + scaling * B @ A` in fp32), cast and appended to the current
shard; a full shard is written and dropped before the next is filled, so peak memory is about one
shard plus one layer, never the model twice. The output loads with `AutoModelForCausalLM` and carries
the run's tokenizer, chat template and prompt contract.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fasttune.export.contract import write_tokenizer_files
from fasttune.export.source import ExportSource, iter_merged, resolve_source

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FP16_MAX = 65504.0


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MB', '1GiB', or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected a size such as 2GB, 500MB or 1GiB")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base**power)


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    if dtype == torch.float16:
        peak = t.abs().max().item() if t.numel() else 0.0
        if peak > _FP16_MAX:
            raise ValueError(
                f"merged tensor {key} reaches {peak:.4g}, beyond float16's range; "
                "merge with dtype bf16 instead"
            )
    return t.to(dtype).contiguous()


def merge(
    run_or_adapter: str | Path,
    out_dir: str | Path,
    dtype: str = "bf16",
    max_shard_size: str | int = "2GB",
    *,
    base: str | None = None,
    device: str = "cpu",
) -> Path:
    """Merge a run's (or adapter directory's) LoRA into its base model and save a HF checkpoint.

    run_or_adapter: `runs/<name>`, `runs/<name>/adapter`, or any PEFT LoRA adapter directory.
    dtype: bf16 (default), fp16 or fp32 for the floating-point tensors.
    max_shard_size: largest safetensors shard ('2GB'); a single shard is saved as model.safetensors.
    base: use this base model instead of the one the run names (hub id, preset, directory, .gguf).
    device: where the `B @ A` products run ('cuda' is faster for big models; the result is the same).
    Returns `out_dir`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    limit = parse_size(max_shard_size)
    src = resolve_source(run_or_adapter, base=base)
    out = Path(out_dir)
    for existing in (src.base_dir, src.adapter_dir):
        if existing is not None and out.resolve() == existing.resolve():
            raise ValueError(f"--out {out} is the input directory itself; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()

    _write_shards(src, out, DTYPES[dtype], limit, device)
    _write_config(src, out, dtype)
    write_tokenizer_files(src, out)
    return out


def _write_shards(src: ExportSource, out: Path, dtype: torch.dtype, limit: int, device: str) -> list[Path]:
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    tmp_files: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        nonlocal shard, size
        path = out / f".shard-{len(tmp_files):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        tmp_files.append((path, list(shard)))
        shard, size = {}, 0

    for key, t in iter_merged(src, device=device):
        t = _cast(key, t, dtype)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > limit:
            flush()
        shard[key] = t
        size += nbytes
        total += nbytes
    if shard or not tmp_files:
        flush()

    n = len(tmp_files)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for (tmp, _), name in zip(tmp_files, names):
        os.replace(tmp, out / name)
    if n > 1:
        weight_map = {key: name for (_, keys), name in zip(tmp_files, names) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in names]


def _write_config(src: ExportSource, out: Path, dtype: str) -> None:
    config = src.hf_config
    config.pop("quantization_config", None)  # the merged weights are plain 16-bit, whatever the base was
    config["dtype"] = DTYPE_NAMES[dtype]
    config["torch_dtype"] = DTYPE_NAMES[dtype]  # read by transformers 4.x and vLLM
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = src.base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
