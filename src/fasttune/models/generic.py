"""Any other transformers causal LM (GPT-2, OPT, Gemma, Phi, ...) behind our model contract; LoRA via PEFT.

`GenericCausalLM(hf_model)` answers `model(input_ids, position_ids, targets, attention_mask, kv_cache)` with
an `LMOutput` like our Llama does. With targets it runs the HF body for the final hidden states and the
chunked linear cross-entropy on the output embedding, so the full logits never exist; where the head is
not a plain bias-free linear (soft-capping, logit scales, a wrapped head) it falls back to HF's logits.
Packed rows are not supported here (`supports_packing = False`): the stock attention would cross rows.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.kernels.cross_entropy import linear_cross_entropy
from fasttune.models.attention import is_packed
from fasttune.models.base import IGNORE_INDEX, LMOutput

# Config fields that change logits after lm_head (Gemma 2 soft-capping, Cohere/Granite/MPT scales, ...).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_scale_init")


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def _checkpointing(hf: nn.Module) -> bool:
    # transformers 5 renamed the flag; reading the old name there warns.
    name = "is_activation_checkpointing" if hasattr(type(hf), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    return bool(getattr(hf, name, False))


class GenericCausalLM(nn.Module):
    """A transformers AutoModelForCausalLM (or a PeftModel of one) with the fasttune forward contract."""

    supports_packing = False

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.config = self.base_hf.config
        self._chunked: bool | None = None  # decided (and checked) at the first forward with targets

    # ------------------------------------------------------------ what sits inside

    @property
    def base_hf(self) -> nn.Module:
        """The transformers model, under any PEFT wrapper (its linears may be LoRA layers)."""
        m = self.hf_model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def is_peft(self) -> bool:
        return hasattr(self.hf_model, "peft_config")

    def get_input_embeddings(self) -> nn.Module:
        return self.base_hf.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base_hf.get_output_embeddings()

    def _body(self) -> nn.Module | None:
        """The decoder without its head (GPT-2 `transformer`, OPT `model`), or None when there is no split."""
        hf = self.base_hf
        body = getattr(hf, "base_model", hf)
        return None if body is hf else body

    def _head_is_plain_linear(self) -> bool:
        head = self.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None or self._body() is None:
            return False
        return all(getattr(self.config, a, None) in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)

    # ------------------------------------------------------------ forward

    def _inputs(self, fn, input_ids, position_ids, attention_mask, kv_cache) -> dict:
        kwargs: dict = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None and _accepts(fn, "position_ids"):
            kwargs["position_ids"] = position_ids
        if kv_cache is not None:
            kwargs["cache" if _accepts(fn, "cache") else "past_key_values"] = kv_cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        return kwargs

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: object | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Same contract as LlamaForCausalLM; `kv_cache` is a transformers Cache (see `new_kv_cache`)."""
        if kv_cache is None and is_packed(position_ids):
            raise ValueError(
                f"packed rows (position_ids restarting at 0) are not supported for model_type "
                f"{getattr(self.config, 'model_type', '?')!r} (generic path); set packing: off"
            )
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets {tuple(targets.shape)} != input_ids {tuple(input_ids.shape)}")
            if self._chunked is None:
                self._chunked = self._head_is_plain_linear() and self._check_chunked_head(input_ids)
            if self._chunked:
                body = self._body()
                out = body(**self._inputs(body.forward, input_ids, position_ids, attention_mask, None))
                h = out.last_hidden_state  # (B, T, H): what lm_head reads
                loss_sum, n_tokens = linear_cross_entropy(h, self.get_output_embeddings().weight, targets)
                return LMOutput(loss_sum=loss_sum, n_tokens=n_tokens)
            logits = self.hf_model(
                **self._inputs(self.base_hf.forward, input_ids, position_ids, attention_mask, None)
            ).logits.float()  # (B, T, V)
            y = targets.reshape(-1)
            loss_sum = F.cross_entropy(
                logits.reshape(y.numel(), -1), y, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            return LMOutput(loss_sum=loss_sum, n_tokens=(y != IGNORE_INDEX).sum())

        kwargs = self._inputs(self.base_hf.forward, input_ids, position_ids, attention_mask, kv_cache)
        keep_inside = logits_to_keep and _accepts(self.base_hf.forward, "logits_to_keep")
        if keep_inside:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.hf_model(**kwargs)
        logits = out.logits
        if logits_to_keep and not keep_inside:
            logits = logits[:, -logits_to_keep:]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return LMOutput(logits=logits, kv_cache=cache if kv_cache is not None else None)

    @torch.no_grad()
    def _check_chunked_head(self, input_ids: torch.Tensor) -> bool:
        """Once: does lm_head(body(x)) reproduce the model's own logits on a short slice of the batch?

        Guards the chunked loss against architectures that transform logits in ways no config field
        names. Runs in eval mode (no dropout) and restores the training flags afterwards.
        """
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            x = input_ids[:1, :16]
            body = self._body()
            h = body(**self._inputs(body.forward, x, None, None, None)).last_hidden_state
            ours = (h @ self.get_output_embeddings().weight.t()).float()
            theirs = self.hf_model(**self._inputs(self.base_hf.forward, x, None, None, None)).logits.float()
        finally:
            for m, training in modes.items():
                m.training = training
        ok = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=2e-2, atol=2e-2)
        if not ok:
            warnings.warn(
                f"{getattr(self.config, 'model_type', '?')}: the head is not lm_head(hidden states); "
                "computing the loss from full logits (exact, more memory)",
                stacklevel=3,
            )
        return ok

    # ------------------------------------------------------------ training helpers

    def set_gradient_checkpointing(self, mode: str) -> None:
        """'off', 'on' (HF's per-layer non-reentrant checkpointing) or 'offload' (its layer inputs on CPU)."""
        if mode not in ("off", "on", "offload"):
            raise ValueError(f"gradient_checkpointing={mode!r}: expected one of ('off', 'on', 'offload')")
        hf = self.base_hf
        if mode == "off":
            if _checkpointing(hf):
                name = "activation_checkpointing_disable"
                (getattr(hf, name, None) or hf.gradient_checkpointing_disable)()
            return
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"model_type {getattr(self.config, 'model_type', '?')!r} does not support gradient "
                "checkpointing in transformers; set gradient_checkpointing: off"
            )
        kwargs = {"use_reentrant": False}
        # On a CPU-only model the activations already live on the host (and transformers' offload asks
        # for pinned memory, which a machine without an accelerator cannot allocate).
        offload = mode == "offload" and next(hf.parameters()).device.type != "cpu"
        if hasattr(type(hf), "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable(kwargs, offload=offload)
            return
        if offload:
            warnings.warn("this transformers version cannot offload checkpoints; using 'on'", stacklevel=2)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def gradient_checkpointing(self) -> str:
        return "on" if _checkpointing(self.base_hf) else "off"

    def new_kv_cache(self):
        """An empty transformers cache to pass as `kv_cache` for generation."""
        from transformers import DynamicCache

        return DynamicCache()

    def save_adapter(self, directory: str | Path) -> None:
        """adapter_config.json + adapter_model.safetensors in PEFT's own format."""
        if not self.is_peft:
            raise ValueError("save_adapter: no LoRA adapters on this model; call apply_lora_generic first")
        self.hf_model.save_pretrained(str(directory))


def _peft_targets(target_modules: list[str] | str) -> list[str] | str:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(target_modules)
    if not names or any(n in ("default", "all-linear") for n in names):
        if len(names) > 1:
            raise ValueError(f"target_modules={names}: 'default'/'all-linear' cannot be mixed with names")
        return "all-linear"
    return names


def apply_lora_generic(
    model: GenericCausalLM,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | str = "all-linear",
    use_rslora: bool = False,
    random_state: int = 3407,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
) -> GenericCausalLM:
    """Wrap the HF model with PEFT LoRA adapters (every base weight frozen); returns the same object.

    target_modules: 'default' or 'all-linear' (every linear/Conv1D layer except the output head), or
    module names such as ['q_proj', 'v_proj'] (PEFT matching rules). use_dora and modules_to_save are
    PEFT's own options.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if model.is_peft:
        raise ValueError("apply_lora_generic: this model already has LoRA adapters")
    hf = model.hf_model
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=_peft_targets(target_modules),
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2 style Conv1D stores weights transposed; PEFT needs to know.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in hf.modules()),
    )
    device = next(hf.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    # Seed only the adapter initialisation, leaving the caller's RNG streams as they were.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(random_state)
        try:
            model.hf_model = get_peft_model(hf, config)
        except ValueError as err:
            raise ValueError(f"apply_lora_generic: target_modules={target_modules!r}: {err}") from err
    model._chunked = None  # the head check runs again on the wrapped model
    return model
