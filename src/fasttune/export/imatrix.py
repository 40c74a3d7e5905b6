"""An importance matrix for the K-quant export (`fasttune export gguf RUN --type q4_k_m --imatrix N`).

What llama.cpp's `llama-imatrix` measures, from the run's own training data: for every linear layer that
the export quantizes, the mean squared input activation of each input channel, over every token of N rows
of the training set (a seeded sample, rendered and tokenized as training did), through the model with the
adapter applied (unmerged, which computes the merged model's activations up to fp32 rounding). The output
head is left out, as `llama-imatrix` leaves it out unless asked. The quantizer (kquants.py) then weighs each
column's rounding error by it, as llama.cpp's quantizer weighs its `quant_weights`.

    imatrix = collect_imatrix(resolve_source("runs/x"), rows=128)
    imatrix.values["blk.0.attn_q.weight"]  # (in_features,) float32
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import gguf
import torch

from fasttune.export.gguf_arch import Arch, n_layers
from fasttune.export.source import ExportError, ExportSource

SEED = 0  # the row sample is the same on every export of a run
_SKIP = ("token_embd", "output", "position_embd")  # not matmul inputs llama-imatrix collects by default


@dataclass
class ImportanceMatrix:
    values: dict[str, torch.Tensor]  # GGUF tensor name (blk.N.attn_q.weight) -> (in_features,) mean of x^2
    dataset: str  # the training data it was collected on
    chunks: int  # rows of it that went through the model
    tokens: int
    counts: dict[str, int] = field(default_factory=dict)  # tokens seen by each layer

    def metadata(self) -> dict[str, str | int]:
        """The keys llama.cpp's `llama-quantize` writes for a file quantized with an imatrix (no file key:
        the matrix is computed in the export, never saved)."""
        return {
            "quantize.imatrix.dataset": self.dataset,
            "quantize.imatrix.entries_count": len(self.values),
            "quantize.imatrix.chunks_count": self.chunks,
        }


def _training_rows(src: ExportSource, tokenizer, contract, rows: int) -> tuple[str, list[list[int]]]:
    from fasttune.config import load_yaml
    from fasttune.data.tokenize import build_dataset

    run_yaml = src.run_dir / "run.yaml" if src.run_dir is not None else None
    if run_yaml is None or not run_yaml.is_file():
        raise ExportError(
            "--imatrix: the importance matrix is collected on the run's training data, and this input has no "
            "run.yaml naming it (pass a run directory, runs/NAME)"
        )
    if not (src.run_yaml.get("data") or {}).get("dataset"):
        raise ExportError(f"--imatrix: {run_yaml} names no training dataset (data.dataset)")
    cfg = load_yaml(run_yaml, stored_run=True)
    max_len = cfg.model.max_seq_length  # 'auto' in a run.yaml that kept the default: the model's context
    if not isinstance(max_len, int):
        max_len = int(src.hf_config.get("max_position_embeddings") or 2048)
    data = build_dataset(cfg.data, tokenizer, max_len, "train", contract)
    ids = [ex.input_ids for ex in data.examples]
    picked = sorted(random.Random(SEED).sample(range(len(ids)), min(rows, len(ids))))
    return str(cfg.data.dataset), [ids[i] for i in picked]


def _gguf_name(module_path: str, name_map: gguf.TensorNameMap) -> str | None:
    """llama.cpp's tensor name of a module, whatever wrappers prefix its path (PEFT, fasttune's own)."""
    parts = module_path.split(".")
    for i in range(len(parts)):
        name = name_map.get_name(".".join(parts[i:]))
        if name is not None:
            return None if name in _SKIP else f"{name}.weight"
    return None


@torch.no_grad()
def collect_imatrix(src: ExportSource, arch: Arch, rows: int, *, device: str = "cpu") -> ImportanceMatrix:
    """Mean squared input activation per channel of each quantized linear layer, over `rows` training rows."""
    from fasttune.infer.load import load_for_inference

    if rows < 1:
        raise ExportError(f"--imatrix {rows}: give the number of training rows to sample, at least 1")
    im = load_for_inference(
        str(src.base_dir), adapter=src.adapter_dir, device=device, dtype="fp32", cpu_fallback_16bit=True
    )
    dataset, samples = _training_rows(src, im.tokenizer, im.contract, rows)
    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch.name]
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers(src.hf_config))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def accumulate(_module, args) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return accumulate

    handles = []
    for path, module in im.model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(module, torch.nn.Embedding):
            continue
        name = _gguf_name(path, name_map)
        if name is not None and name not in {n for n, _ in handles}:
            handles.append((name, module.register_forward_pre_hook(hook(name))))
    if not handles:
        raise ExportError(f"--imatrix: found no linear layer of this {arch.name} model to collect from")
    try:
        tokens = 0
        for ids in samples:
            im.model(torch.tensor([ids], device=device))
            tokens += len(ids)
    finally:
        for _, h in handles:
            h.remove()
    values = {name: (s / counts[name]).to(torch.float32).cpu() for name, s in sums.items()}
    return ImportanceMatrix(values, dataset, len(samples), tokens, counts)


def describe(m: ImportanceMatrix) -> str:
    return (
        f"importance matrix: {len(m.values)} layers, {m.chunks} rows ({m.tokens} tokens) of {m.dataset}"
    )

