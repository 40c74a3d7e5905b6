"""`merge`: base model + LoRA adapter -> one 16-bit Hugging Face checkpoint, written shard by shard.

Each base tensor is read, merged (`W + scaling * B @ A` in fp32), cast and written straight into its
place in a shard file whose layout was planned from the base's headers, so peak memory is about one
layer, never the model twice. The output loads with `AutoModelForCausalLM` and carries
the run's tokenizer, chat template and prompt contract.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from fasttune.export.checkpoint import CheckpointReader, ExportError, logical_specs
from fasttune.export.contract import write_tokenizer_files
from fasttune.export.source import ExportSource, iter_merged, resolve_source
from fasttune.fs import replace_dir, temporary_sibling

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FP16_MAX = 65504.0


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MB', '1GiB', or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ExportError(f"max_shard_size {size!r}: expected a size such as 2GB, 500MB or 1GiB")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base**power)


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not t.is_floating_point() or not dtype.is_floating_point:
        return t
    if dtype == torch.float16:
        peak = t.abs().max().item() if t.numel() else 0.0
        if peak > _FP16_MAX:
            raise ExportError(
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
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    limit = parse_size(max_shard_size)
    src = resolve_source(run_or_adapter, base=base)
    out = Path(out_dir)
    for existing in (src.base_dir, src.adapter_dir):
        if existing is not None and out.resolve() == existing.resolve():
            raise ExportError(f"--out {out} is the input directory itself; choose a new directory")
    # Written beside `out` and renamed into place at the end: a merge that fails leaves `out` as it was.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover
    tmp.mkdir()
    try:
        _write_shards(src, tmp, DTYPES[dtype], limit, device)
        _write_config(src, tmp, dtype)
        write_tokenizer_files(src, tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _plan_shards(
    src: ExportSource, dtype: torch.dtype, limit: int
) -> list[dict[str, tuple[list[int], torch.dtype]]]:
    """Output tensors grouped into shards of at most `limit` bytes (a bigger tensor gets a shard alone)."""
    shards: list[dict] = [{}]
    size = 0
    for key, (shape, stored) in logical_specs(CheckpointReader(src.base_dir)).items():
        out_dtype = dtype if stored.is_floating_point else stored
        nbytes = math.prod(shape) * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = (shape, out_dtype)
        size += nbytes
    return shards


def _header(tensors: dict[str, tuple[list[int], torch.dtype]]) -> bytes:
    """A safetensors header: 8-byte length, then JSON padded with spaces to a multiple of 8."""
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (shape, dtype) in tensors.items():
        end = offset + math.prod(shape) * dtype.itemsize
        entries[key] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_shards(src: ExportSource, out: Path, dtype: torch.dtype, limit: int, device: str) -> list[Path]:
    """Stream every merged tensor straight into its place in a shard file; nothing is buffered.

    The shard layout is planned from the base's headers first, so each file's header is written
    before its data and only the tensor being merged is ever in memory.
    """
    plan = _plan_shards(src, dtype, limit)
    n = len(plan)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    tmps = [out / f".{name}.tmp{os.getpid()}" for name in names]
    order = [(i, key) for i, shard in enumerate(plan) for key in shard]
    merged = iter_merged(src, device=device)
    f = None
    try:
        current = -1
        for (i, key), (got_key, t) in zip(order, merged, strict=True):
            if got_key != key:
                raise RuntimeError(f"merge: expected tensor {key}, read {got_key}")
            if i != current:
                if f is not None:
                    f.close()
                f = open(tmps[i], "wb")
                f.write(_header(plan[i]))
                current = i
            shape, out_dtype = plan[i][key]
            t = _cast(key, t, out_dtype)
            if list(t.shape) != shape:
                raise RuntimeError(f"merge: tensor {key} has shape {list(t.shape)}, planned {shape}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        if f is not None:
            f.close()
        if n == 1 and not plan[0]:
            tmps[0].write_bytes(_header({}))
        for tmp, name in zip(tmps, names):
            os.replace(tmp, out / name)
    finally:
        if f is not None:
            f.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    if n > 1:
        total = sum(math.prod(s) * d.itemsize for shard in plan for s, d in shard.values())
        weight_map = {key: name for shard, name in zip(plan, names) for key in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / name for name in names]


def _write_config(src: ExportSource, out: Path, dtype: str) -> None:
    config = src.hf_config
    config.pop("quantization_config", None)  # the merged weights are plain 16-bit, whatever the base was
    config["dtype"] = DTYPE_NAMES[dtype]
    config["torch_dtype"] = DTYPE_NAMES[dtype]  # read by transformers 4.x and vLLM
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = src.base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
