"""`FastLanguageModel` and the model object it returns: the calls notebooks make on a model, over fasttune's.

`FastLanguageModel.from_pretrained(...)` returns `(model, tokenizer)`; the model is a `NotebookModel`, a thin
`nn.Module` around our Llama-family model (or the generic transformers one) that adds what notebooks call:
`generate(**tokenizer(...), streamer=TextStreamer(tokenizer))`, `save_pretrained(dir)`, `print_trainable_
parameters()`, `config`, `device`. `get_peft_model` adds LoRA to it in place (and returns it).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fasttune.config import LoraConfig, ModelConfig

# from_pretrained arguments Unsloth takes that change nothing here; set, they draw a warning naming them.
_IGNORED_LOAD = (
    "fast_inference",
    "gpu_memory_utilization",
    "max_lora_rank",
    "float8_kv_cache",
    "use_exact_model_name",
    "fix_tokenizer",
    "device_map",
    "attn_implementation",
    "use_gradient_checkpointing",
    "random_state",
    "disable_log_stats",
)
_CHECKPOINTING = {
    True: "on",
    "unsloth": "offload",
    False: "off",
    "on": "on",
    "off": "off",
    "offload": "offload",
}
_DTYPES = {
    None: "auto",
    "auto": "auto",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "fp32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
}


def is_bfloat16_supported() -> bool:
    """True on a CUDA GPU with bf16 (Ampere and later); notebooks pick fp16 or bf16 with it."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class CausalLMOutput(dict):
    """What `model(input_ids, labels=...)` returns in transformers' shape: `.loss` and `.logits`."""

    __getattr__ = dict.get


def _saved_adapter(model_name: str) -> Any:
    """What `infer.load.locate` finds for a directory holding an adapter and no model of its own (what
    `save_pretrained` writes, or a run directory); None for anything else."""
    from fasttune.run_dir import holds_adapter

    path = Path(model_name)
    if not path.is_dir() or (path / "config.json").is_file() or not holds_adapter(path):
        return None
    from fasttune.infer.load import locate

    return locate(path)


def _reattach(model: NotebookModel, where: Any) -> None:
    """The adapter of `where` (a run_dir.Location) on the loaded base, trainable as `get_peft_model` leaves
    it, with its LoRA settings and the prompt contract saved beside it."""
    from fasttune.data.templates import PromptContract
    from fasttune.infer.load import attach_adapter
    from fasttune.lora.peft_format import read_adapter_config

    attach_adapter(model.loaded, where.adapter_dir)
    config = read_adapter_config(where.adapter_dir)
    targets = config["target_modules"]
    model.lora_config = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                   lora_dropout=float(config.get("lora_dropout") or 0.0),
                                   target_modules=[targets] if isinstance(targets, str) else list(targets),
                                   use_rslora=bool(config.get("use_rslora", False)))
    contract = where.contract_path()
    if contract is not None:
        model.prompt_contract = PromptContract.load(contract)


class NotebookModel(nn.Module):
    """fasttune's model with the methods of a transformers/PEFT model that notebooks use."""

    def __init__(self, loaded: Any, model_config: ModelConfig) -> None:
        super().__init__()
        self.model = loaded.model
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = model_config
        self.max_seq_length = model_config.max_seq_length
        self.lora_config: LoraConfig | None = None
        self.prompt_contract = None  # set by SFTTrainer; saved next to the adapter

    # ------------------------------------------------------------ what notebooks read
    @property
    def config(self) -> Any:
        return self.loaded.hf_config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def family(self) -> str:
        return self.loaded.family

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("model")
            if inner is None:
                raise
            return getattr(inner, name)

    def print_trainable_parameters(self) -> None:
        from fasttune.lora.apply import count_parameters

        trainable, total = count_parameters(self.model)
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------ forward, generate, save
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Our contract (`targets` shifted, returns LMOutput), or transformers' (`labels` unshifted,
        returns `.loss` as the mean over labelled tokens and `.logits`)."""
        if labels is None:
            return self.model(
                input_ids, position_ids=position_ids, targets=targets, attention_mask=attention_mask, **kwargs
            )
        from fasttune.models.base import IGNORE_INDEX

        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]  # targets[t] = labels[t + 1]
        out = self.model(input_ids, position_ids=position_ids, targets=shifted, attention_mask=attention_mask)
        return CausalLMOutput(loss=out.loss_sum / out.n_tokens.clamp(min=1), logits=None)

    def generate(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """transformers-style generate: prompt + new ids (B, T + n); `streamer` gets tokens as they come."""
        from fasttune.notebook.generation import notebook_generate

        return notebook_generate(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """The LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors), and the prompt
        contract when this model was trained by SFTTrainer."""
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported; upload the directory with "
                "huggingface_hub"
            )
        if kwargs.get("safe_serialization") is False:
            raise ValueError("save_pretrained(safe_serialization=False): fasttune writes safetensors only")
        other = sorted(k for k in kwargs if k not in ("push_to_hub", "safe_serialization", "token"))
        if other:
            warnings.warn(f"save_pretrained: fasttune ignores {', '.join(other)}", UserWarning, stacklevel=2)
        from fasttune.train.dist_state import gathered_adapter, is_main_process

        out = Path(save_directory)
        # Under torchrun every rank calls this: FSDP2's shards are gathered by all, rank 0 alone writes.
        weights = gathered_adapter(self.model)
        if not is_main_process():
            return
        if self.loaded.family == "llama":
            from fasttune.api import base_model_id
            from fasttune.lora.peft_format import save_adapter

            save_adapter(
                self.model,
                out,
                base_model_name_or_path=base_model_id(self.model_config, self.loaded),
                revision=self.model_config.revision,
                weights=weights,
            )
        else:
            self.model.save_adapter(out)
        if self.prompt_contract is not None:
            from fasttune.run_dir import CONTRACT_FILE

            self.prompt_contract.save(out / CONTRACT_FILE)

    def save_pretrained_merged(self, save_directory: str | Path, tokenizer: Any = None,
                               save_method: str = "merged_16bit") -> None:
        """Unsloth's: the adapter merged into its base (16-bit transformers checkpoint), or with
        save_method='lora' the adapter alone, with a model card (notebook/hub.py)."""
        from fasttune.notebook.hub import save_pretrained_merged

        save_pretrained_merged(self, save_directory, tokenizer, save_method)

    def save_pretrained_gguf(self, save_directory: str | Path, tokenizer: Any = None,
                             quantization_method: str = "q8_0") -> None:
        """Unsloth's: save_directory/model-<quantization_method>.gguf with its model card."""
        from fasttune.notebook.hub import save_pretrained_gguf

        save_pretrained_gguf(self, save_directory, tokenizer, quantization_method)

    def push_to_hub(self, repo_id: str, tokenizer: Any = None, *, token: str | None = None,
                    private: bool | None = None, commit_message: str | None = None,
                    revision: str | None = None) -> str:
        """The adapter and a model card, uploaded to `repo_id` through huggingface_hub."""
        from fasttune.notebook.hub import push_to_hub

        return push_to_hub(self, repo_id, tokenizer, token=token, private=private,
                           commit_message=commit_message, revision=revision)

    def push_to_hub_merged(self, repo_id: str, tokenizer: Any = None, save_method: str = "merged_16bit", *,
                           token: str | None = None, private: bool | None = None,
                           commit_message: str | None = None, revision: str | None = None) -> str:
        """Unsloth's: save_pretrained_merged, uploaded to `repo_id`."""
        from fasttune.notebook.hub import push_to_hub_merged

        return push_to_hub_merged(self, repo_id, tokenizer, save_method, token=token, private=private,
                                  commit_message=commit_message, revision=revision)

    def push_to_hub_gguf(self, repo_id: str, tokenizer: Any = None, quantization_method: str = "q8_0", *,
                         token: str | None = None, private: bool | None = None,
                         commit_message: str | None = None, revision: str | None = None) -> str:
        """Unsloth's: save_pretrained_gguf, uploaded to `repo_id` (the card as README.md)."""
        from fasttune.notebook.hub import push_to_hub_gguf

        return push_to_hub_gguf(self, repo_id, tokenizer, quantization_method, token=token, private=private,
                                commit_message=commit_message, revision=revision)


class FastLanguageModel:
    """The notebook entry points: load a model, add LoRA, switch between training and inference."""

    @staticmethod
    def from_pretrained(
        model_name: str = "smollm2-135m",
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = False,
        token: str | None = None,
        *,
        load_in_8bit: bool = False,
        load_in_fp8: bool = False,
        full_finetuning: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> tuple[NotebookModel, Any]:
        """(model, tokenizer). 4-bit on a machine without CUDA, or FP8 without FP8 tensor cores, loads in
        16/32-bit instead, with a warning. `model_name` may be a directory `model.save_pretrained` wrote (or
        a fasttune run directory): its base model loads, with the saved adapters on it, as Unsloth reloads
        a LoRA directory."""
        from fasttune.api import load
        from fasttune.kernels.fp8 import fp8_supported
        from fasttune.train.distributed import launched_by_torchrun, rank_device
        from fasttune.train.precision import resolve_device

        unknown = sorted(k for k in kwargs if k not in _IGNORED_LOAD)
        if unknown:
            raise TypeError(f"FastLanguageModel.from_pretrained: unknown argument(s) {', '.join(unknown)}")
        if full_finetuning:
            raise ValueError(
                "from_pretrained(full_finetuning=True) is not supported: fasttune trains LoRA "
                "adapters (call get_peft_model)"
            )
        if kwargs.get("fast_inference"):
            warnings.warn(
                "from_pretrained(fast_inference=True): vLLM is not used; generation runs on "
                "fasttune's own decoder",
                UserWarning,
                stacklevel=2,
            )
        ignored = sorted(k for k in kwargs if k != "fast_inference")
        if ignored:
            warnings.warn(
                f"FastLanguageModel.from_pretrained ignores {', '.join(ignored)}", UserWarning, stacklevel=2
            )
        if dtype not in _DTYPES:
            raise ValueError(
                f"from_pretrained: dtype={dtype!r} (use None, torch.float16, torch.bfloat16 or torch.float32)"
            )
        saved = _saved_adapter(model_name)
        if saved is not None:
            model_name = saved.base.model_name
        if launched_by_torchrun():  # each rank on its own GPU, cuda:LOCAL_RANK
            dev = rank_device(device or "auto", int(os.environ["LOCAL_RANK"]))
        else:
            dev = resolve_device(device or "auto")
        cfg = ModelConfig(
            model_name=model_name,
            max_seq_length=max_seq_length,
            dtype=_DTYPES[dtype],
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            load_in_fp8=load_in_fp8,
            token=token,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
        if (load_in_4bit or load_in_8bit) and dev.type != "cuda":
            warnings.warn(
                f"load_in_{'4' if load_in_4bit else '8'}bit=True needs bitsandbytes on a CUDA GPU; "
                f"loading {model_name} unquantised on {dev}",
                UserWarning,
                stacklevel=2,
            )
            cfg.cpu_fallback_16bit = True
        if load_in_fp8 and not fp8_supported(dev):
            warnings.warn(f"load_in_fp8=True needs FP8 tensor cores (compute capability 8.9+); loading "
                          f"{model_name} unquantised on {dev}", UserWarning, stacklevel=2)
            cfg.cpu_fallback_16bit = True
        loaded = load(cfg, dev)
        model = NotebookModel(loaded, cfg)
        if saved is not None:
            _reattach(model, saved.location)
        return model, loaded.tokenizer

    @staticmethod
    def get_peft_model(
        model: NotebookModel,
        r: int = 16,
        target_modules: Any = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config: Any = None,
        *,
        max_seq_length: int | None = None,
        modules_to_save: Any = None,
        use_dora: bool = False,
        init_lora_weights: Any = True,
        layers_to_transform: Any = None,
        **kwargs: Any,
    ) -> NotebookModel:
        """Attach LoRA adapters to `model` (in place) and return it; only the adapters train."""
        from fasttune.api import attach_lora

        if not isinstance(model, NotebookModel):
            raise TypeError("get_peft_model: pass the model returned by FastLanguageModel.from_pretrained")
        if kwargs:
            raise TypeError(f"get_peft_model: unknown argument(s) {', '.join(sorted(kwargs))}")
        refused = {  # name: (value, refused?)
            "bias": (bias, bias != "none"),
            "loftq_config": (loftq_config, bool(loftq_config)),
            "init_lora_weights": (init_lora_weights, init_lora_weights is not True),
            "layers_to_transform": (layers_to_transform, layers_to_transform is not None),
        }
        for name, (value, bad) in refused.items():
            if bad:
                raise ValueError(f"get_peft_model: {name}={value!r} is not supported by fasttune")
        if use_gradient_checkpointing not in _CHECKPOINTING:
            raise ValueError(
                f"get_peft_model: use_gradient_checkpointing={use_gradient_checkpointing!r} "
                "(use True, False or 'unsloth')"
            )
        if model.lora_config is not None:
            raise ValueError("get_peft_model: this model already has LoRA adapters")
        lora = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=float(lora_dropout),
            target_modules=list(target_modules) if target_modules else ["default"],
            use_rslora=use_rslora,
            random_state=random_state,
            bias=bias,
            use_dora=bool(use_dora),  # through PEFT; fasttune's Llama-family model refuses it (attach_lora)
            modules_to_save=list(modules_to_save or []),
        )
        attach_lora(model.loaded, lora)
        model.lora_config = lora
        model.model.set_gradient_checkpointing(_CHECKPOINTING[use_gradient_checkpointing])
        if max_seq_length:
            model.max_seq_length = max_seq_length
        return model

    @staticmethod
    def for_inference(model: NotebookModel) -> NotebookModel:
        """Evaluation mode (no dropout); generation always uses the KV cache."""
        model.eval()
        return model

    @staticmethod
    def for_training(model: NotebookModel, use_gradient_checkpointing: bool | str = True) -> NotebookModel:
        model.train()
        return model


def generation_defaults(model: NotebookModel) -> dict[str, Any]:
    """The base model's generation_config.json, as transformers would read it."""
    path = Path(model.loaded.source) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
