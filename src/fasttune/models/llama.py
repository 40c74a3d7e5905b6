"""Our Llama-family causal LM (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, SmolLM) in plain PyTorch.

Reads top to bottom: config -> RMSNorm -> attention -> MLP -> decoder layer -> model (RoPE tables: rotary.py).
Parameter names are Hugging Face's (`model.layers.N.self_attn.q_proj`, ...), so an HF state dict loads
as is. `use_kernels` picks the fasttune kernels (Triton where present) or their PyTorch references; with it
on, attention and MLP projections that are all LoRA layers run as one fused autograd node each (`lora_qkv`,
`lora_mlp`: one saved input, no gradients of the frozen base, the MLP's largest activation recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.kernels.cross_entropy import linear_cross_entropy, target_rows
from fasttune.kernels.lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv
from fasttune.kernels.rms_norm import rms_norm, rms_norm_reference
from fasttune.kernels.rope import apply_rope, apply_rope_reference
from fasttune.kernels.scratch import release_scratch
from fasttune.kernels.swiglu import swiglu, swiglu_reference
from fasttune.lora.layer import LoRALinear
from fasttune.memory.kept_attention import rerun_from_kept
from fasttune.memory.plan import ModelShape, plan_memory
from fasttune.memory.recompute import run_layers
from fasttune.memory.settings import Checkpointing
from fasttune.models.attention import AttentionMask, attend, build_attention_mask, flex_for_packed
from fasttune.models.base import IGNORE_INDEX, LMOutput
from fasttune.models.kv_cache import KVCache
from fasttune.models.padding_free import repad, unpad_rows
from fasttune.models.rotary import RotaryEmbedding, rope_inv_freq  # noqa: F401  (importable from here)

if TYPE_CHECKING:
    from fasttune.memory.layer_pass import LayerPass

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = {  # rope_scaling["rope_type"] -> keys it needs
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets it apart)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "dynamic", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v_proj (Qwen2; Llama/Qwen3 with attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias; not Qwen2)
    qk_norm: bool = False  # RMSNorm of each q/k head before RoPE (Qwen3)
    model_type: str = "llama"
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind == "default":
                self.rope_scaling = None
            elif kind not in ROPE_TYPES:
                raise ValueError(
                    f"LlamaConfig.rope_scaling rope_type={kind!r} is not supported; use one of "
                    f"{sorted(ROPE_TYPES)} or None"
                )
            else:
                missing = [key for key in ROPE_TYPES[kind] if key not in rs]
                if missing:
                    raise ValueError(f"LlamaConfig.rope_scaling ({kind}) lacks {missing}")
                # A fresh dict of exactly the keys this kind uses: equal configs compare equal, and a
                # caller's dict (transformers adds rope_theta to the one it is given) is never shared.
                self.rope_scaling = {"rope_type": kind, **{k: rs[k] for k in ROPE_TYPES[kind]}}


# ---------------------------------------------------------------- leaf modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_kernels: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor, grad_addend: torch.Tensor | None = None) -> torch.Tensor:
        """`grad_addend`: added to x's gradient (`kernels.rms_norm`; a layer recomputed in halves)."""
        if self.use_kernels:
            return rms_norm(x, self.weight, self.eps, grad_addend=grad_addend)
        if grad_addend is not None:
            return rms_norm(x, self.weight, self.eps, force_triton=False, grad_addend=grad_addend)
        return rms_norm_reference(x, self.weight, self.eps)


# ---------------------------------------------------------------- attention, MLP, block


def fused_lora_weights(*projs: nn.Module) -> list[LoRAWeights] | None:
    """The projections as the fused LoRA kernels take them, or None when one of them cannot go there
    (a plain, merged or disabled linear, active dropout, an 8-bit or FP4 base, the kernel switch off)."""
    out = []
    for p in projs:
        if not isinstance(p, LoRALinear) or not p.use_kernels or p.merged or p.disabled:
            return None
        # Submodules and the adapters' weights straight from the module's dicts: this runs for every
        # projection at every forward and rerun, and nn.Module's attribute lookup is a Python call per level.
        parts = p._modules
        if p.training and isinstance(parts["lora_dropout"], nn.Dropout):
            return None
        weight = p.kernel_weight()
        if weight is None:
            return None
        out.append(LoRAWeights(weight, parts["base_layer"].bias, parts["lora_A"]._parameters["weight"],
                               parts["lora_B"]._parameters["weight"], p.scaling))
    return out


class Attention(nn.Module):
    """Grouped-query self-attention with separate q/k/v projections (the LoRA targets keep HF names)."""

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,
        use_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=out_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, use_kernels)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, use_kernels)
        self.qk_norm = qk_norm_eps is not None
        self.use_kernels = use_kernels

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        layer_pass: LayerPass | None = None,
    ) -> torch.Tensor:
        """`layer_pass`: this layer is recomputed in halves (`memory.layer_pass`), so all its projections are
        fused (`DecoderLayer.recompute_in_halves`)."""
        B, T, _ = x.shape
        fused = fused_lora_weights(self.q_proj, self.k_proj, self.v_proj) if self.use_kernels else None
        # q, k, v are plain functions of x here: a layer's rerun may take them kept (memory/kept_attention.py)
        reusable = fused is not None and not self.qk_norm and kv_cache is None
        kept = layer_pass.kept.attention if layer_pass is not None and layer_pass.rerun else None
        if reusable and kept is not None and kept.qkv_bthd:  # the rerun: no q/k/v products, RoPE or attention
            y = rerun_from_kept(*lora_qkv(x, *fused, outputs=False), rope, kept)  # (B, nh, T, hd)
        else:
            y = self._attention(x, fused, rope, mask, kv_cache, layer_idx, reusable, layer_pass)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh * hd)
        if layer_pass is None:
            return self.o_proj(y)
        (o,) = fused_lora_weights(self.o_proj)
        return lora_linear(y, *o, layer_pass=layer_pass)

    def _attention(self, x, fused, rope, mask, kv_cache, layer_idx, reusable, layer_pass) -> torch.Tensor:
        """q/k/v projections, RoPE and attention: (B, T, H) -> (B, nh, T, hd)."""
        B, T, _ = x.shape
        if fused is not None:
            q, k, v = lora_qkv(x, *fused)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_op = apply_rope if self.use_kernels else apply_rope_reference
        q, k = rope_op(q, k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # (B, nkv, past + T, hd)
        return attend(q, k, v, mask, qkv_reusable=reusable, layer_pass=layer_pass)  # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, use_kernels: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor, layer_pass: LayerPass | None = None) -> torch.Tensor:
        """`layer_pass`: the layer is recomputed in halves (`memory.layer_pass`); all projections fused."""
        if self.use_kernels:
            fused = fused_lora_weights(self.gate_proj, self.up_proj, self.down_proj)
            if fused is not None:
                return lora_mlp(x, *fused, layer_pass=layer_pass)
        op = swiglu if self.use_kernels else swiglu_reference
        return self.down_proj(op(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LlamaConfig, use_kernels: bool = False) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            qkv_bias=c.attention_bias, out_bias=c.attention_out_bias,
            qk_norm_eps=c.rms_norm_eps if c.qk_norm else None, use_kernels=use_kernels,
        )
        self.mlp = MLP(c.hidden_size, c.intermediate_size, use_kernels)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, use_kernels)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, use_kernels)
        # False where the layer must recompute as a whole layer (`train/distributed.py`: FSDP2 gathers its
        # shards in call hooks that LayerRecompute's calls to the branches would bypass; DDP's gradient
        # hooks must not fire inside LayerRecompute's nested backward)
        self.halves_allowed = True

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn_branch(x, rope, mask, kv_cache, layer_idx)
        return x + self.mlp_branch(x)

    def attn_branch(self, x, rope, mask, kv_cache: KVCache | None = None, layer_idx: int = 0,
                    layer_pass: LayerPass | None = None) -> torch.Tensor:
        addend = None if layer_pass is None else layer_pass.grad_addend
        return self.self_attn(self.input_layernorm(x, addend), rope, mask, kv_cache, layer_idx, layer_pass)

    def mlp_branch(self, x: torch.Tensor, layer_pass: LayerPass | None = None) -> torch.Tensor:
        addend = None if layer_pass is None else layer_pass.grad_addend
        return self.mlp(self.post_attention_layernorm(x, addend), layer_pass)

    def recompute_in_halves(self) -> bool:
        """Whether `memory.recompute.LayerRecompute` may rerun this layer: allowed, and all seven projections
        fused."""
        a, m = self.self_attn, self.mlp
        projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        return self.halves_allowed and a.use_kernels and fused_lora_weights(*projs) is not None


# ---------------------------------------------------------------- the model


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm: input ids -> final hidden states (B, T, H)."""

    def __init__(self, config: LlamaConfig, use_kernels: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, use_kernels) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, use_kernels)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        self.use_kernels = use_kernels
        self.checkpointing = Checkpointing()  # the user's settings; `memory.plan` plans each batch shape

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        branch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`branch` (B, T): rows whose sequences share tokens (`models.attention`, case (d))."""
        B, T = input_ids.shape
        past = 0
        if kv_cache is not None:
            kv_cache.check_room(T, B)
            past = kv_cache.length
        # default positions without padding restart nowhere: the mask need not read them (a host sync)
        defaulted = position_ids is None and attention_mask is None and branch is None
        given = None if defaulted else position_ids
        if position_ids is None:
            position_ids = default_position_ids(B, T, past, attention_mask, input_ids.device)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} != input_ids {tuple(input_ids.shape)}"
            )

        x = self.embed_tokens(input_ids)  # (B, T, H)
        rope = self.rotary_emb(position_ids, x.dtype)  # cos, sin: (B, T, hd)
        mask = build_attention_mask(
            T, position_ids=given, attention_mask=attention_mask, past_len=past,
            sliding_window=self.config.sliding_window, device=input_ids.device, head_dim=self.config.head_dim,
            branch=branch,
        )
        plan = None
        training = self.training and torch.is_grad_enabled() and kv_cache is None
        if self.checkpointing.mode != "off" and training:  # one plan per batch shape (cached)
            plan = plan_memory(ModelShape.of(self.config), self.checkpointing, tokens=B * T,
                               span=T if mask.causal else 0, act_bytes=x.element_size(),
                               fused=self.use_kernels)
        x = run_layers(self.layers, x, lambda layer, h, i: layer(h, rope, mask, kv_cache, i), plan,
                       attn_args=(rope, mask))
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)


def default_position_ids(
    batch: int, length: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """0, 1, 2, ... after the cached tokens; with padding in `attention_mask`, count real tokens only.

    Counting real tokens is what left-padded prompts need (a prompt's first real token is position 0);
    for right padding it changes only the positions of pads, which nothing reads.
    """
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
        return pos[:, -length:]
    return torch.arange(past, past + length, device=device).expand(batch, length)


class LlamaForCausalLM(nn.Module):
    """The trainable model: model(input_ids, position_ids, targets, attention_mask, kv_cache) -> LMOutput."""

    supports_packing = True
    supports_step_graph = True  # given the batch layout, a step reads nothing on the host (train.step_graph)

    def __init__(self, config: LlamaConfig, use_kernels: bool = False) -> None:
        super().__init__()
        self.config = config
        self.use_kernels = use_kernels
        self.model = LlamaModel(config, use_kernels)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._register_load_state_dict_pre_hook(self._fill_tied_head)

    def _fill_tied_head(self, state_dict, prefix, *args) -> None:
        # Tied checkpoints often store only the embedding; the head is the same tensor.
        head, emb = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
        if self.config.tie_word_embeddings and head not in state_dict and emb in state_dict:
            state_dict[head] = state_dict[emb]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random weights as transformers initialises this family (normal(0, std), norms at one)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    @property
    def gradient_checkpointing(self) -> str:
        return self.model.checkpointing.mode

    def set_gradient_checkpointing(self, mode: str, keep_layers: int = 0, host_gate_up: float | str = "auto",
                                   keep_attention: str = "auto", keep_qkv: bool = True,
                                   device_gate_up: int = 1, narrow_keep: tuple[int, ...] = ()) -> None:
        """'off', 'on', 'offload' or 'selective', with their options: `memory.settings.Checkpointing`."""
        self.model.checkpointing = Checkpointing(mode, keep_layers, host_gate_up, keep_attention, keep_qkv,
                                                 device_gate_up, tuple(narrow_keep))

    def set_use_kernels(self, flag: bool) -> None:
        self.use_kernels = flag
        for m in self.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = flag

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        branch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (normed) hidden states (B, T, H), the input of lm_head: `train.logps` runs the head only
        at the scored positions, a chunk at a time, so the (tokens x vocab) logits never exist whole.
        `branch`: rows whose sequences share tokens (`data.pair_batches`). A right-padded batch runs
        padding-free (`models.padding_free`) where `_padding_free` allows; its pads' hidden states are then
        zeros."""
        if attention_mask is not None and branch is None and self._padding_free(input_ids.device):
            unpadded = unpad_rows(input_ids, position_ids, attention_mask)
            if unpadded is not None:
                keep, ids, pos = unpadded
                return repad(self.model(ids, pos), keep)
        return self.model(input_ids, position_ids, attention_mask, branch=branch)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """With `targets` (B, T), already shifted, -100 ignored: loss_sum and n_tokens, never full logits;
        a right-padded batch runs padding-free (`models.padding_free`) where `_padding_free` allows.

        Without: logits (B, T, V), or of the last `logits_to_keep` positions only (generation).
        """
        rows = None
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets {tuple(targets.shape)} != input_ids {tuple(input_ids.shape)}")
            if attention_mask is not None and kv_cache is None and self._padding_free(input_ids.device):
                unpadded = unpad_rows(input_ids, position_ids, attention_mask, targets)
                if unpadded is not None:
                    (_, input_ids, position_ids, targets), attention_mask = unpadded, None
            if self._fused_loss():
                rows = target_rows(targets)  # the host reads the targets now, not behind every layer's work
        h = self.model(input_ids, position_ids, attention_mask, kv_cache)  # (B, T, H)
        if targets is not None:
            loss_sum, n_tokens = self._loss(h, targets, rows)
            return LMOutput(loss_sum=loss_sum, n_tokens=n_tokens, kv_cache=kv_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return LMOutput(logits=self.lm_head(h), kv_cache=kv_cache)

    def _padding_free(self, device: torch.device) -> bool:
        """Whether a padded batch runs padding-free: where its packed rows need no dense (N, N) mask, i.e. no
        sliding window, and on CUDA a head size flex attention takes (`models.attention`)."""
        return self.config.sliding_window is None and (
            device.type != "cuda" or flex_for_packed(device, self.config.head_dim))

    def _fused_loss(self) -> bool:
        """Whether the loss goes through `linear_cross_entropy` (a plain bias-free head)."""
        return type(self.lm_head) is nn.Linear and self.lm_head.bias is None

    def _loss(self, h: torch.Tensor, targets: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        # the step's peak: no dequantised weight is in use, so the dequantisation buffer need not be held
        release_scratch()
        if self._fused_loss():
            return linear_cross_entropy(h, self.lm_head.weight, targets, rows=rows)
        # A wrapped head (adapter, quantised): run it whole; slower, still exact.
        logits = self.lm_head(h).float()  # (B, T, V)
        y = targets.reshape(-1)
        loss_sum = F.cross_entropy(
            logits.reshape(y.numel(), -1), y, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, (y != IGNORE_INDEX).sum()
