"""What an export reads: a run, adapter or model directory resolved to its base checkpoint and LoRA deltas.

`resolve_source` finds the pieces, `read_adapter` turns PEFT's file into merge deltas, and
`iter_merged` yields each base tensor (read one at a time by `checkpoint.CheckpointReader`) with its
adapter's `scaling * B @ A` already added in fp32.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from fasttune.export.checkpoint import CheckpointReader, ExportError, is_bnb_4bit, logical_keys, read_logical
from fasttune.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunDir, RunNotFound, holds_adapter, locate

# ExportError is re-exported: the CLI catches it as `fasttune.export.source.ExportError`.
__all__ = ["ExportError", "ExportSource", "iter_merged", "read_adapter", "resolve_source"]

PEFT_PREFIX = "base_model.model."

# ---- the adapter ------------------------------------------------------------------------------------


@dataclass
class LoraDelta:
    """One adapted layer: delta = scaling * B @ A, transposed where the base stores (in, out) (Conv1D)."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        d = (self.B.to(device, torch.float32) @ self.A.to(device, torch.float32)) * self.scaling  # (out, in)
        return d.T if self.fan_in_fan_out else d


@dataclass
class Adapter:
    config: dict
    deltas: dict[str, LoraDelta]  # module path (PEFT key without prefix) -> delta
    replaced: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # modules_to_save: module.weight -> tensor


def _pattern_value(pattern: dict, path: str, default: float) -> float:
    # PEFT matches a pattern key against the end of the module path.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _saved_module(key: str, modules_to_save: list[str]) -> bool:
    module = key.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in modules_to_save)


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """A PEFT LoRA adapter as merge deltas; errors name the file and the feature that cannot be merged."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{cfg_path}: peft_type {config['peft_type']!r}; only LoRA adapters can be merged")
    for key, what in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias"),
        ("layer_replication", "layer_replication"),
        ("trainable_token_indices", "trainable_token_indices"),
    ):
        if config.get(key):
            raise ExportError(f"{cfg_path}: {key}={config[key]!r} ({what}) cannot be merged by fasttune")
    if config.get("bias", "none") != "none":
        raise ExportError(
            f"{cfg_path}: bias={config['bias']!r}; only adapters with bias='none' can be merged"
        )
    if not w_path.is_file():
        pickle = (
            " (adapter_model.bin is pickle; fasttune reads safetensors only)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        raise ExportError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}{pickle}")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(w_path)).items():
        key = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        elif ".modules_to_save." in key or _saved_module(key, config.get("modules_to_save") or []):
            # PEFT saves a fully trained module (modules_to_save) under its own name.
            replaced[re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", key)] = value
        else:
            raise ExportError(
                f"{w_path}: tensor {key!r} is not a LoRA A/B weight or a modules_to_save copy; "
                "fasttune merges linear LoRA layers only (no embedding LoRA, no DoRA)"
            )
    alpha, r_default = config.get("lora_alpha", 8), config.get("r", 8)
    deltas = {}
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExportError(f"{w_path}: {path} has {sorted(ab)} but needs both lora_A and lora_B")
        r = ab["lora_A"].shape[0]
        a = _pattern_value(config.get("alpha_pattern") or {}, path, alpha)
        if r != _pattern_value(config.get("rank_pattern") or {}, path, r_default):
            raise ExportError(f"{w_path}: {path}.lora_A has rank {r}, the config says otherwise")
        scaling = a / math.sqrt(r) if config.get("use_rslora") else a / r
        deltas[path] = LoraDelta(ab["lora_A"], ab["lora_B"], scaling, bool(config.get("fan_in_fan_out")))
    return Adapter(config, deltas, replaced)


# ---- the run / adapter / model directory ------------------------------------------------------------


@dataclass
class ExportSource:
    """Everything an export needs to know about what it exports."""

    path: Path  # what the user named
    base_dir: Path  # config.json + safetensors of the base model
    base_name: str  # the base as the run named it
    adapter_dir: Path | None = None  # None: a plain model directory, nothing to merge
    run_dir: Path | None = None

    @property
    def hf_config(self) -> dict:
        return json.loads((self.base_dir / "config.json").read_text())

    @property
    def tokenizer_dir(self) -> Path:
        """The run's tokenizer files (saved with the adapter) if there are any, else the base model's."""
        if self.adapter_dir is not None and any(
            (self.adapter_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
        ):
            return self.adapter_dir
        return self.base_dir

    @property
    def run_yaml(self) -> dict:
        path = RunDir(self.run_dir).run_yaml if self.run_dir is not None else None
        if path is None or not path.is_file():
            return {}
        import yaml

        return yaml.safe_load(path.read_text()) or {}


def resolve_source(path: str | Path, base: str | None = None) -> ExportSource:
    """`runs/x`, `runs/x/adapter`, any PEFT adapter directory, or a model directory -> ExportSource.

    `base` overrides the base model the run or adapter names (a hub id, preset, directory or .gguf).
    """
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: no such run, adapter or model directory")
    if not holds_adapter(p) and (p / "config.json").is_file():
        return ExportSource(path=p, base_dir=p, base_name=str(p))
    try:
        where = locate(p)
    except RunNotFound as e:
        raise ExportError(f"{e}; a model directory (config.json) is also accepted") from None
    adapter_dir = where.adapter_dir
    run_dir = where.run.root if where.run is not None else None
    src = ExportSource(path=p, base_dir=p, base_name="", adapter_dir=adapter_dir, run_dir=run_dir)
    adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    model_cfg = src.run_yaml.get("model") or {}
    name = base or model_cfg.get("model_name") or adapter_cfg.get("base_model_name_or_path")
    if not name:
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty and no run.yaml "
            "names the model; pass the base model explicitly (--base)"
        )
    if not base and not model_cfg.get("model_name"):
        name = _preset_for_hub_id(str(name))
    src.base_name = str(name)
    src.base_dir = resolve_base_checkpoint(
        str(name), revision=None if base else (model_cfg.get("revision") or adapter_cfg.get("revision"))
    )
    return src


def _preset_for_hub_id(name: str) -> str:
    """A run on an embedded preset records the preset's hub id in adapter_config.json (for PEFT users); it
    was trained on the embedded weights, so merge into those (offline) unless the run says otherwise."""
    from fasttune.models.presets import PRESETS

    return next((preset for preset, spec in PRESETS.items() if spec.get("hf_id") == name), name)


def resolve_base_checkpoint(name: str, revision: str | None = None) -> Path:
    """A local directory with config.json + safetensors for a preset, hub id, directory or .gguf file."""
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    from fasttune.config import ModelConfig
    from fasttune.models import loading

    try:
        return Path(loading.resolve_source(ModelConfig(model_name=name, revision=revision)))
    except (FileNotFoundError, RuntimeError) as e:
        raise ExportError(f"base model {name!r}: {e}") from None


# ---- the merged tensors -----------------------------------------------------------------------------


def _module_to_key(adapter: Adapter, reader: CheckpointReader) -> dict[str, str]:
    """Base weight key of each adapted module; tolerates a base saved without its outer prefix."""
    keys = set(reader.keys())
    found = {}
    for path in list(adapter.deltas) + [k.removesuffix(".weight") for k in adapter.replaced]:
        for cand in (path, path.split(".", 1)[-1]):
            if f"{cand}.weight" in keys:
                found[path] = f"{cand}.weight"
                break
        else:
            raise ExportError(
                f"adapter layer {path!r} has no weight in the base checkpoint {reader.dir} "
                "(is this adapter for another model?)"
            )
    return found


def iter_merged(
    src: ExportSource, *, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every base tensor; adapted weights come merged in fp32, the rest as stored.

    Only one base tensor (plus its delta) is in memory at a time.
    """
    reader = CheckpointReader(src.base_dir)
    adapter = read_adapter(src.adapter_dir) if src.adapter_dir is not None else Adapter({}, {})
    targets = {key: path for path, key in _module_to_key(adapter, reader).items()}
    quantized = is_bnb_4bit(src.hf_config)
    for key in logical_keys(reader):
        t = read_logical(reader, key, quantized)
        path = targets.get(key)
        if path in adapter.deltas:
            d = adapter.deltas[path]
            if tuple(t.shape) != _delta_shape(d):
                raise ExportError(
                    f"adapter layer {path}: delta shape {_delta_shape(d)} does not match base "
                    f"weight {key} {tuple(t.shape)}"
                )
            t = (t.to(device, torch.float32) + d.delta(device)).cpu()
        elif path is not None:  # modules_to_save: the adapter carries the whole trained tensor
            t = adapter.replaced[path + ".weight"]
        yield key, t


def _delta_shape(d: LoraDelta) -> tuple[int, int]:
    out_in = (d.B.shape[0], d.A.shape[1])
    return out_in[::-1] if d.fan_in_fan_out else out_in
