"""Causal attention whose output and log-sum-exp are kept from the forward, so a recompute skips its forward.

A layer rerun for its backward (`memory.recompute.LayerRecompute`) needs the attention's gradients, and a
flash kernel's backward reads only q, k, v, the output O and the row statistics of the softmax, never the
forward itself. In the layer's forward (`memory.layer_pass.LayerPass` with `keep_attention`) `attend_kept`
puts what the backward will read into the pass's `kept`; the rerun's pass hands it back, recomputes q, k, v
(cheap: their products) and returns the kept O without running attention again.

For q (B, H, T, D), k, v (B, Hk, T, D), H = Hk * n_rep, scale s = 1 / sqrt(D), causal:
    forward:   S = s q k^T (masked above the diagonal), lse = logsumexp_k S   (B, H, T, 1) fp32
               P = exp(S - lse), O = P v
    backward:  dV = P^T dO, dP = dO v^T, delta = rowsum(dO * O)
               dS = P * (dP - delta), dQ = s dS k, dK = s dS^T q   (dK, dV summed over the n_rep heads
               that share one kv head)
On CUDA both run as the cuDNN flash kernels SDPA itself picks (`_scaled_dot_product_cudnn_attention` and its
backward), used only where SDPA's own choice for these tensors is cuDNN and q, k, v are laid out token-major
as our model makes them (the layout the GPU tests check against the fp32 math; others take the usual path),
and dO is handed to the kernel with O's strides (the cuDNN backward of torch 2.11 gives wrong gradients when
they differ); elsewhere nothing is kept and the rerun runs attention again, except with keep_attention
'reference' (tests): the math above in fp32.
Exact: the backward reads the forward's own O and lse, as SDPA's backward does.

Packed rows (`PackedRows`: several rows per sequence, causal within each, never across): the same math with
S also masked where query and key sit in different rows. On CUDA they run as the variable-length flash kernel
(`_flash_attention_forward` / `_backward` over the batch flattened to B * T tokens, row r spanning
cu_seqlens[r] to cu_seqlens[r + 1]), whose lse is (H, B * T); the reference is the masked math above.

Kept q, k, v (`keep_qkv` of the pass, for attentions whose q, k, v are plain functions of the layer's
normed input: the fused q/k/v products and RoPE, no q/k norms): the first forward also keeps q and k after
RoPE and v, so the rerun needs neither the q/k/v base products nor RoPE (`rerun_from_kept`): the q/k/v node
returns placeholders and computes only its rank-r products, and the kept node's backward runs the attention
backward on the kept q, k, v, then RoPE's backward, giving the gradients of the pre-RoPE q, k, v. On a
Llama-3.1-8B layer they are 1.5 times the layer input; the q/k/v products are ~12% of its forward FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fasttune.memory.layer_pass import LayerPass

_CUDNN = 3  # torch.nn.attention.SDPBackend.CUDNN_ATTENTION, as torch._fused_sdp_choice returns it


@dataclass(frozen=True)
class PackedRows:
    """Rows packed into the sequences of a (B, T) batch, as the variable-length kernel reads them: the tokens
    flattened to B * T, row r spanning [cu_seqlens[r], cu_seqlens[r + 1]) (int32, rows + 1 entries), the
    longest row `max_len`, and the (B, T) row ids they came from (for the reference)."""

    cu_seqlens: torch.Tensor
    max_len: int
    doc_ids: torch.Tensor

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> PackedRows:
        """A row starts at each sequence's first token and wherever the row id changes (one host sync). While
        a step is captured as a CUDA graph (`models.capture`), without the sync: the table has the layout's
        `max_rows` rows, those past the batch's own empty (starting at B * T), and the longest row is taken
        as T, which bounds every row."""
        from fasttune.models.capture import captured_layout

        B, T = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        layout = captured_layout(doc_ids)
        if layout is not None:
            first = torch.nonzero_static(starts.reshape(-1), size=layout.max_rows, fill_value=B * T)
            first = first.squeeze(1)
            end = torch.full((1,), B * T, dtype=first.dtype, device=first.device)  # no copy from the host
            return cls(torch.cat([first, end]).to(torch.int32), T, doc_ids)
        first = starts.reshape(-1).nonzero().squeeze(1)
        cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
        return cls(cu, int((cu[1:] - cu[:-1]).max()), doc_ids)


@dataclass
class KeptAttention:
    """What the backward of one causal attention reads: O as (B, T, H, D), lse (B, H, T, 1) fp32, the
    kernel that made them ('cudnn' or 'reference'; the rerun's backward must be its backward) and the cuDNN
    kernel's dropout seed/offset (unused at dropout 0, but part of its backward's arguments)."""

    out_bthd: torch.Tensor
    lse: torch.Tensor
    backend: str
    extra: tuple = ()
    qkv_bthd: tuple[torch.Tensor, ...] = ()  # with keep_qkv: q, k after RoPE and v, as (B, T, heads, D)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The large ones, which the checkpoint saves (and the offloader moves to the host)."""
        return self.out_bthd, self.lse, *self.qkv_bthd

    @classmethod
    def from_tensors(cls, tensors, backend: str, extra: tuple = ()) -> KeptAttention:
        """The inverse of `tensors()` (after the offloader's round trip)."""
        out, lse, *qkv = tensors
        return cls(out, lse, backend, extra, tuple(qkv))


def keeps(layer_pass: LayerPass) -> bool:
    """Whether an attention under `layer_pass` keeps its output (a recomputed layer's forward) or takes a
    kept one (its rerun)."""
    if layer_pass.rerun:
        return layer_pass.kept.attention is not None
    return layer_pass.keep_attention != "off"


def _token_major(t: torch.Tensor) -> bool:
    """(B, H, T, D) laid out as (B, T, H, D) in memory (a token's heads side by side), as our model's q, k, v
    are: the layout the kept cuDNN backward was verified on. Others take the usual path."""
    B, H, T, D = t.shape
    return t.stride(-1) == 1 and t.stride(1) == D and t.stride(2) >= H * D


def _backend(q: torch.Tensor, k: torch.Tensor, rows: PackedRows | None = None,
             reference: bool = False) -> str | None:
    """Plain causal rows: 'cudnn' where SDPA would pick cuDNN for these tensors; packed rows: 'flash_varlen'
    where the flash kernel takes them; 'reference' where allowed (off CUDA); else None."""
    if not q.is_cuda:
        return "reference" if reference else None
    if rows is not None:
        D = q.shape[-1]
        ok = (q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256
              and torch.backends.cuda.flash_sdp_enabled()
              and torch.cuda.get_device_capability(q.device)[0] >= 8)
        return "flash_varlen" if ok else None
    choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return "cudnn" if choice == _CUDNN else None


def attend_kept(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_pass: LayerPass,
                qkv_reusable: bool = False, rows: PackedRows | None = None) -> torch.Tensor | None:
    """Causal self-attention that keeps its output into `layer_pass.kept` (the layer's forward) or takes the
    kept one (its rerun), where `keeps(layer_pass)` and the kernel allows it, else None (the caller then runs
    attention as usual). q (B, H, T, D), k/v (B, Hk, T, D) -> O (B, H, T, D).
    `qkv_reusable`: the caller can rerun from kept q, k, v (`rerun_from_kept`); kept if the pass asks.
    `rows`: the packed rows of the batch (causal within each), or None for plain causal rows."""
    if not keeps(layer_pass) or q.shape[2] != k.shape[2]:
        return None
    if layer_pass.rerun:  # the forward's choice of kernel holds (grad mode may change SDPA's)
        given = layer_pass.kept.attention
        B, H, T, D = q.shape
        if given.out_bthd.shape != (B, T, H, D):
            raise RuntimeError(f"attend_kept: the kept output {tuple(given.out_bthd.shape)} does not "
                               f"fit this attention's (B, T, H, D) = {(B, T, H, D)}")
        return KeptAttentionFunction.apply(q, k, v, given)
    if not all(_token_major(t) for t in (q, k, v)):
        return None
    backend = _backend(q, k, rows, reference=layer_pass.keep_attention == "reference")
    if backend is None:
        return None
    with torch.no_grad():
        out, kept = _forward(q, k, v, backend, rows)
    if qkv_reusable and layer_pass.keep_qkv:
        kept.qkv_bthd = tuple(t.transpose(1, 2) for t in (q, k, v))
    layer_pass.kept.attention = kept
    return out


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, D) -> (B * T, heads, D), the variable-length kernel's layout (a view if token-major)."""
    B, n, T, D = t.shape
    return t.transpose(1, 2).reshape(B * T, n, D)


def _forward(q, k, v, backend: str, rows: PackedRows | None) -> tuple[torch.Tensor, KeptAttention]:
    if backend == "cudnn":
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False)
        # cuDNN writes O in (B, T, H, D) memory order: the transpose is that buffer, contiguous
        return out, KeptAttention(out.transpose(1, 2), lse, backend, (seed, offset))
    if backend == "flash_varlen":
        B, H, T, D = q.shape
        cu, n = rows.cu_seqlens, rows.max_len
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            _tokens(q), _tokens(k), _tokens(v), cu, cu, n, n, 0.0, True, False)
        out_bthd = out.view(B, T, H, D)
        return out_bthd.transpose(1, 2), KeptAttention(out_bthd, lse, backend, (rows, rng, unused))
    doc = rows.doc_ids if rows is not None else None
    out, lse = attention_reference_forward(q, k, v, doc)
    return out, KeptAttention(out.transpose(1, 2), lse, backend, (rows,) if rows is not None else ())


class KeptAttentionFunction(torch.autograd.Function):
    """O = causal_attention(q, k, v), where O and lse are given (kept from the forward): nothing is computed
    here; the backward runs the kernel's backward from q, k, v, O and lse."""

    @staticmethod
    def forward(ctx, q, k, v, kept: KeptAttention):
        out = kept.out_bthd.transpose(1, 2)  # (B, H, T, D)
        ctx.save_for_backward(q, k, v, out, kept.lse)
        ctx.backend, ctx.extra = kept.backend, kept.extra
        return out.detach()  # an alias, not the input object: autograd gives it this node as grad_fn

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _kernel_backward(d_out, q, k, v, out, lse, ctx.backend, ctx.extra)
        return dq, dk, dv, None


def _kernel_backward(d_out, q, k, v, out, lse, backend: str, extra: tuple):
    """dq, dk, dv (B, heads, T, D) of the kernel that made O and lse."""
    if backend == "cudnn":
        seed, offset = extra
        T = q.shape[2]
        if d_out.stride() != out.stride():  # the kernel reads dO with O's strides
            d_out = torch.empty_strided(out.shape, out.stride(), dtype=d_out.dtype,
                                        device=d_out.device).copy_(d_out)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            d_out, q, k, v, out, lse, seed, offset, None, None, None, T, T, 0.0, True)
    if backend == "flash_varlen":
        rows, rng, unused = extra
        B, _, T, D = q.shape
        cu, n = rows.cu_seqlens, rows.max_len
        grads = torch.ops.aten._flash_attention_backward(
            _tokens(d_out).contiguous(), _tokens(q), _tokens(k), _tokens(v), _tokens(out), lse, cu, cu, n, n,
            0.0, True, rng, unused)
        return tuple(g.view(B, T, -1, D).transpose(1, 2) for g in grads)
    doc = extra[0].doc_ids if extra else None
    return attention_reference_backward(d_out, q, k, v, out, lse, doc)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows,
                     reference: bool = False) -> torch.Tensor | None:
    """Causal attention within each packed row, q (B, H, T, D), k/v (B, Hk, T, D) -> O (B, H, T, D), by the
    variable-length flash kernel where it takes these tensors (CUDA, token-major), else None (the caller
    runs its usual path). `reference`: the fp32 math off CUDA (tests). The forward runs the kernel and the
    node is the kept attention's, as for a recomputed layer's rerun."""
    if q.shape[2] != k.shape[2] or not all(_token_major(t) for t in (q, k, v)):
        return None
    backend = _backend(q, k, rows, reference=reference)
    if backend is None:
        return None
    with torch.no_grad():
        _, kept = _forward(q, k, v, backend, rows)
    return KeptAttentionFunction.apply(q, k, v, kept)  # its backward is the kernel's, from O and lse


class KeptQKVAttentionFunction(torch.autograd.Function):
    """O = causal_attention(rope(q0), rope(k0), v0) where O, lse and the post-RoPE q, k and v are all kept:
    q0, k0, v0 (B, T, heads * D) are placeholders whose values are never read. The backward runs the
    kernel's backward on the kept tensors, then RoPE's backward (`rope_backward`) for dq0, dk0."""

    @staticmethod
    def forward(ctx, q0, k0, v0, cos, sin, kept: KeptAttention):
        q, k, v = (t.transpose(1, 2) for t in kept.qkv_bthd)  # (B, heads, T, D)
        out = kept.out_bthd.transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, kept.lse, cos, sin)
        ctx.backend, ctx.extra = kept.backend, kept.extra
        return out.detach()

    @staticmethod
    def backward(ctx, d_out):
        from fasttune.kernels.rope import rope_backward

        q, k, v, out, lse, cos, sin = ctx.saved_tensors
        dq, dk, dv = _kernel_backward(d_out, q, k, v, out, lse, ctx.backend, ctx.extra)
        dq, dk = rope_backward(dq.transpose(1, 2), dk.transpose(1, 2), cos, sin)  # (B, T, heads, D)
        B, T = dq.shape[:2]
        return (dq.reshape(B, T, -1), dk.reshape(B, T, -1), dv.transpose(1, 2).reshape(B, T, -1),
                None, None, None)


def rerun_from_kept(q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor,
                    rope: tuple[torch.Tensor, torch.Tensor], given: KeptAttention) -> torch.Tensor:
    """The rerun's attention output (B, H, T, D) from the forward's `KeptAttention` with q, k, v;
    q0, k0, v0: the q/k/v node's placeholders (B, T, heads * D), connecting their backward."""
    if not given.qkv_bthd:
        raise RuntimeError("rerun_from_kept: the kept attention carries no q, k, v")
    B, T, H, D = given.out_bthd.shape
    if q0.shape != (B, T, H * D) or given.qkv_bthd[0].shape != (B, T, H, D):
        raise RuntimeError(f"rerun_from_kept: the kept q {tuple(given.qkv_bthd[0].shape)} and O "
                           f"{(B, T, H, D)} do not fit this attention's q {tuple(q0.shape)}")
    return KeptQKVAttentionFunction.apply(q0, k0, v0, *rope, given)


def _scores(q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """s q k^T in fp32 with the causal mask (and, for packed rows, the mask between rows: `doc_ids` (B, T)),
    k repeated over the query heads that share it: (B, H, T, T)."""
    n_rep = q.shape[1] // k.shape[1]
    kr = k.float().repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
    s = q.float() @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    if doc_ids is not None:
        hidden = hidden | (doc_ids[:, None, :, None] != doc_ids[:, None, None, :])  # (B, 1, T, T)
    return s.masked_fill(hidden, float("-inf"))


def attention_reference_forward(q, k, v, doc_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward math of the module docstring in fp32: (O in q's dtype, lse (B, H, T, 1) fp32)."""
    n_rep = q.shape[1] // k.shape[1]
    s = _scores(q, k, doc_ids)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    out = torch.exp(s - lse) @ v.float().repeat_interleave(n_rep, dim=1)
    return out.to(q.dtype), lse


def attention_reference_backward(d_out, q, k, v, out, lse, doc_ids=None) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv from the kept O and lse (the module docstring's backward math), in the inputs' dtypes."""
    B, Hk, T, D = k.shape
    n_rep = q.shape[1] // Hk
    p = torch.exp(_scores(q, k, doc_ids) - lse)  # (B, H, T, T)
    do = d_out.float()
    dv = (p.transpose(-1, -2) @ do).view(B, Hk, n_rep, T, D).sum(2)
    dp = do @ v.float().repeat_interleave(n_rep, dim=1).transpose(-1, -2)
    delta = (do * out.float()).sum(-1, keepdim=True)  # (B, H, T, 1)
    ds = p * (dp - delta) / math.sqrt(D)
    dq = ds @ k.float().repeat_interleave(n_rep, dim=1)
    dk = (ds.transpose(-1, -2) @ q.float()).view(B, Hk, n_rep, T, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
