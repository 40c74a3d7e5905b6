"""The base checkpoint on disk: safetensors read one tensor at a time, bitsandbytes 4-bit weights dequantised.

`CheckpointReader` uses plain file reads (no mmap), so resident memory is only the tensor being worked
on; `logical_specs` gives the shape and dtype of every tensor as the model sees it without reading data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch


class ExportError(ValueError):
    """What the user asked to export cannot be exported as asked; the message names the file or option."""


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# bitsandbytes 4-bit checkpoints store each weight as packed uint8 plus these companions.
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_BNB_STATE = ".quant_state.bitsandbytes__"


# ---- the checkpoint on disk -------------------------------------------------------------------------


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in the file
    end: int


class CheckpointReader:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.entries: dict[str, _Entry] = {}
        for path in _weight_files(self.dir):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            # Keys in file-offset order, so reading walks each file forwards.
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if info["dtype"] not in _ST_DTYPES:
                    raise ExportError(
                        f"{path}: tensor {key} has dtype {info['dtype']}, which fasttune cannot read"
                    )
                s, e = info["data_offsets"]
                self.entries[key] = _Entry(path, info["dtype"], list(info["shape"]), 8 + n + s, 8 + n + e)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return self.entries[key].shape

    def nbytes(self, key: str) -> int:
        e = self.entries[key]
        return e.end - e.start

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        buf = bytearray(e.end - e.start)
        with open(e.file, "rb") as f:
            f.seek(e.start)
            f.readinto(buf)
        if not buf:
            return torch.empty(e.shape, dtype=_ST_DTYPES[e.dtype])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[e.dtype]).reshape(e.shape)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ExportError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; fasttune reads safetensors "
            "only (convert the checkpoint with transformers' save_pretrained first)"
        )
    raise ExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def is_bnb_4bit(hf_config: dict) -> bool:
    q = hf_config.get("quantization_config") or {}
    if q and q.get("quant_method") != "bitsandbytes":
        raise ExportError(
            f"quantization_config quant_method={q.get('quant_method')!r}: only bitsandbytes "
            "4-bit (nf4) pre-quantised bases can be dequantised for merging"
        )
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ExportError(
            "a bitsandbytes 8-bit pre-quantised base cannot be merged; use its 16-bit original (--base)"
        )
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def logical_keys(reader: CheckpointReader) -> list[str]:
    """Tensor keys without bitsandbytes' companion tensors (absmax, quant_map, quant_state, ...)."""
    return [k for k in reader.keys() if not (k.endswith(_BNB_SUFFIXES) or _BNB_STATE in k)]


def logical_specs(reader: CheckpointReader) -> dict[str, tuple[list[int], torch.dtype]]:
    """(shape, dtype) of each logical tensor as `iter_merged` yields it, in order, without reading data.

    A bitsandbytes 4-bit weight takes its shape from its quant state and comes out fp32.
    """
    specs = {k: (reader.shape(k), _ST_DTYPES[reader.entries[k].dtype]) for k in logical_keys(reader)}
    for key in reader.keys():
        if _BNB_STATE in key:
            state = json.loads(bytes(reader.get(key).tolist()).decode("utf-8"))
            specs[key.split(".quant_state.")[0]] = (list(state["shape"]), torch.float32)
    return specs


def _dequantize_bnb_4bit(reader: CheckpointReader, key: str) -> torch.Tensor:
    """A bitsandbytes NF4 weight as saved by transformers (packed bytes + companions) -> fp32, on the CPU.

    Companions of `key`: `.absmax`, `.quant_map`, optionally `.nested_absmax`/`.nested_quant_map`, and
    `.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON dict: blocksize, dtype, shape, nested_*).
    """
    state_key = next((k for k in reader.keys() if k.startswith(key + _BNB_STATE)), None)
    if state_key is None:
        return reader.get(key)  # a tensor bitsandbytes left unquantised (norms, embeddings)
    from fasttune.kernels.nf4 import NF4Weight, dequantize_nf4_reference

    state = json.loads(bytes(reader.get(state_key).tolist()).decode("utf-8"))
    if state.get("quant_type", "nf4") != "nf4":
        raise ExportError(
            f"{reader.dir}: {key} is bitsandbytes {state.get('quant_type')!r}; only nf4 "
            "4-bit checkpoints can be dequantised for merging"
        )
    nested = f"{key}.nested_absmax" in reader.entries
    w = NF4Weight(
        packed=reader.get(key),
        absmax=reader.get(f"{key}.absmax"),
        shape=tuple(state["shape"]),
        dtype=torch.float32,
        blocksize=int(state["blocksize"]),
        code=reader.get(f"{key}.quant_map"),
        nested_absmax=reader.get(f"{key}.nested_absmax") if nested else None,
        nested_code=reader.get(f"{key}.nested_quant_map") if nested else None,
        nested_blocksize=int(state.get("nested_blocksize", 256)),
        offset=torch.tensor(float(state["nested_offset"])) if nested else None,
    )
    w.check()
    return dequantize_nf4_reference(w)


def read_logical(reader: CheckpointReader, key: str, quantized: bool) -> torch.Tensor:
    """The tensor `key` as the model uses it (a 4-bit weight of a pre-quantised base dequantised to fp32)."""
    return _dequantize_bnb_4bit(reader, key) if quantized else reader.get(key)
