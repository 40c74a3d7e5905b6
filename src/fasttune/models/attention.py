"""Causal self-attention for our Llama family: which keys each query may see, and the SDPA call.

`build_attention_mask` runs once per forward and decides between three cases:
(a) plain causal (no packing, no padding on the left, no cache): SDPA's `is_causal`, no mask tensor;
(b) packed rows: a row begins where `position_ids == 0` and attention never crosses a row boundary:
```
position_ids  0 1 2 0 1 2 3 4          doc ids = cumsum(position_ids == 0) = 1 1 1 2 2 2 2 2
query 4 (d) sees keys 3, 4 only        mask[q, k] = doc[q] == doc[k] and k <= q
```
(c) generation with a KV cache and an optional `attention_mask` (B, T_total) of 1/0 for left-padded prompts:
query i of this step sits at slot past_len + i and sees slots k <= past_len + i whose mask is 1.
(d) branched rows (`branch` (B, T), preference pairs sharing their prompt: `data/pair_batches.py`): a row
begins where `position_ids == 0`, and a query sees the keys before it in its row whose branch is 0 (shared)
or its own:
```
branch        0 0 1 1 2 2 2                           query 5 (branch 2) sees keys 0, 1, 4, 5
```
`attend` then runs `F.scaled_dot_product_attention`, except for cases (b) and (d) on CUDA. Case (b) runs the
variable-length flash kernel over the rows (`kept_attention.packed_attention`; one aten call, where compiled
flex costs a guard check per call) where it takes the tensors; case (d), and (b) where it does not, run the
compiled `flex_attention` with a block mask built once per forward (`models/flex_mask.py`, a chunk of query
blocks at a time) that skips the blocks that cross rows. Neither keeps a (B, T, T) mask.
`set_attention_backend` overrides the choice (benchmarks, tests).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fasttune.memory.kept_attention import PackedRows, attend_kept, keeps, packed_attention
from fasttune.models.capture import captured_layout
from fasttune.models.flex_mask import block_mask

if TYPE_CHECKING:
    from fasttune.memory.layer_pass import LayerPass

# `enable_gqa` lets SDPA read the small K/V directly (torch >= 2.5); older versions repeat K/V.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
BACKENDS = ("auto", "sdpa", "flex")
_backend = {"name": "auto"}
_compiled_flex: dict[str, Callable] = {}
_RIGHT_PADDED: dict[str, tuple] = {}  # "last": (weak reference to a mask, its version, right-padded)


def set_attention_backend(name: str) -> None:
    """'auto' (packed rows on CUDA: the varlen flash kernel, else flex; SDPA otherwise), 'sdpa' (always),
    'flex' (packed and plain causal rows wherever flex_attention runs; compiled on CUDA, eager elsewhere,
    which is slow and for tests)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {BACKENDS}")
    _backend["name"] = name


@dataclass
class AttentionMask:
    """How the queries of one forward may look at the keys; built once, shared by every layer.

    causal: True means plain causal attention over q_len == kv_len and `mask` is None.
    mask: (B, 1, q_len, kv_len) bool, True where the query may attend (None with `causal`, or when every
        key is visible, as for one decoding step without padding).
    doc_ids: (B, T) packed-row ids when the batch is packed (for varlen/flex backends), else None.
    doc_causal: True when the pattern is exactly "causal within a row" (packing without padding keys,
        window or cache), which the flex backend can run from `doc_ids` alone.
    """

    causal: bool
    mask: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    doc_causal: bool = False
    branch: torch.Tensor | None = None  # (B, T) for branched rows (case (d)), which flex runs without `mask`
    _bias: dict = field(default_factory=dict, repr=False, compare=False)

    def sdpa_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask for SDPA: bool when nothing is saved for a backward, else one shared additive bias.

        SDPA turns a bool mask into a float bias (padded to 16 columns for the memory-efficient kernel)
        on every call, and autograd keeps each layer's copy: L x B x T x T values. Building the bias
        once, aligned, lets every layer save the same tensor.
        """
        if self.mask is None or not torch.is_grad_enabled():
            return self.mask
        bias = self._bias.get(dtype)
        if bias is None:
            *lead, kv_len = self.mask.shape
            width = -(-kv_len // 16) * 16
            bias = torch.full((*lead, width), float("-inf"), dtype=dtype, device=self.mask.device)
            # (B, 1, q_len, kv_len) view whose rows start at multiples of 16 elements
            bias = bias[..., :kv_len].masked_fill_(self.mask, 0.0)
            self._bias[dtype] = bias
        return bias


def is_packed(position_ids: torch.Tensor | None) -> bool:
    """True when some row restarts its positions after the first token, i.e. several rows share a sequence."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    layout = captured_layout(position_ids)
    if layout is not None:  # a captured step: the caller read it from the batch's host copy
        return layout.packed
    return bool((position_ids[:, 1:] == 0).any())


def right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: ones then zeros in every row (left on the device, for a caller that joins it to
    other checks under one host sync)."""
    return (attention_mask[:, 1:] <= attention_mask[:, :-1]).all()


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Ones then zeros in every row: causal attention already keeps real queries off the padding.

    The answer is remembered for the last mask asked about, while that tensor lives unchanged (its version
    counter): the passes of one preference or RL step over the same rows (reference, then policy) read it
    on the host once, and the policy's forward does not wait for the reference's to finish on the GPU."""
    if attention_mask.is_inference():  # no version counter to tell a changed mask by: read it each time
        return bool(right_padded(attention_mask))
    seen = _RIGHT_PADDED.get("last")
    if seen is not None and seen[0]() is attention_mask and seen[1] == attention_mask._version:
        return seen[2]
    value = bool(right_padded(attention_mask))
    _RIGHT_PADDED["last"] = (weakref.ref(attention_mask), attention_mask._version, value)
    return value


def build_attention_mask(
    q_len: int,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    past_len: int = 0,
    sliding_window: int | None = None,
    device: torch.device | None = None,
    head_dim: int | None = None,
    branch: torch.Tensor | None = None,
) -> AttentionMask:
    """Decide the attention pattern of one forward of `q_len` new tokens after `past_len` cached ones.

    position_ids: (B, q_len); restarts at 0 mark packed rows (only looked at without a cache).
    attention_mask: (B, past_len + q_len) of 1 (real) / 0 (padding), or None.
    sliding_window: Mistral-style window (a query sees keys with q - k < window), or None.
    head_dim: of the attention heads; packed rows go to flex only for the sizes its compiled kernels take.
    branch: (B, q_len) branch of each token (case (d)), or None.
    """
    kv_len = past_len + q_len
    if branch is not None:
        return _branched_mask(q_len, position_ids, attention_mask, branch, past_len, sliding_window, device,
                              head_dim)
    key_ok = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != kv_len:
            raise ValueError(
                f"attention_mask must be (batch, cached + new tokens) = (B, {kv_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
        padded = not bool(attention_mask.bool().all())
        if padded and not (past_len == 0 and _is_right_padded(attention_mask)):
            key_ok = attention_mask.bool()[:, None, :]  # (B, 1, kv_len)

    doc_ids = None
    if past_len == 0 and is_packed(position_ids):
        doc_ids = (position_ids == 0).cumsum(dim=1)  # (B, T)

    windowed = sliding_window is not None and kv_len > sliding_window
    doc_causal = doc_ids is not None and key_ok is None and not windowed
    if doc_causal and flex_for_packed(doc_ids.device, head_dim):
        return AttentionMask(causal=False, doc_ids=doc_ids, doc_causal=True)  # flex needs no dense mask
    if key_ok is None and doc_ids is None and not windowed:
        if past_len == 0:
            return AttentionMask(causal=True)
        if q_len == 1:
            return AttentionMask(causal=False)  # one new token sees every cached slot

    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # (q_len, 1) slot of each query
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    allowed = k_pos <= q_pos  # (q_len, kv_len)
    if windowed:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None]  # (1, q_len, kv_len)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if key_ok is not None:
        allowed = allowed & key_ok
    # A query always sees itself, so no row of the mask is empty (SDPA returns NaN for empty rows);
    # this only changes the outputs at padding positions, which nothing reads.
    allowed = allowed | (k_pos == q_pos)[None]
    # (B|1, 1, q_len, kv_len)
    return AttentionMask(causal=False, mask=allowed[:, None], doc_ids=doc_ids, doc_causal=doc_causal)


def _branched_mask(q_len, position_ids, attention_mask, branch, past_len, sliding_window, device,
                   head_dim) -> AttentionMask:
    """Case (d): rows from position restarts, each query on the keys before it of branch 0 or its own."""
    if past_len or position_ids is None or branch.shape != (position_ids.shape[0], q_len):
        raise ValueError("branch: needs position_ids of the same (B, T) shape and no KV cache")
    if sliding_window is not None and q_len > sliding_window:
        raise ValueError(f"branch: rows longer than the sliding window ({sliding_window}) are not supported")
    if attention_mask is not None and not _is_right_padded(attention_mask):
        raise ValueError("branch: the attention_mask must be right-padded")
    doc_ids = (position_ids == 0).cumsum(dim=1)  # (B, T)
    if flex_for_packed(doc_ids.device, head_dim):
        return AttentionMask(causal=False, doc_ids=doc_ids, branch=branch)  # flex needs no dense mask
    pos = torch.arange(q_len, device=device)
    allowed = (pos[None, :] <= pos[:, None])[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
    allowed = allowed & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
    return AttentionMask(causal=False, mask=allowed[:, None], doc_ids=doc_ids, branch=branch)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd); query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    b, n_kv, t, hd = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, t, hd).reshape(b, n_kv * n_rep, t, hd)


def packed_rows(mask: AttentionMask) -> PackedRows:
    """The packed rows of this forward as the variable-length kernel reads them (cached on `mask`)."""
    rows = mask._bias.get("rows")
    if rows is None:
        rows = mask._bias["rows"] = PackedRows.from_doc_ids(mask.doc_ids)
    return rows


def _flex_attention(on_cuda: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if not on_cuda:
        return flex_attention
    if "fn" not in _compiled_flex:  # compiled once per process, on first use
        # torch's automatic dynamic shapes: the first batch width compiles static, a second one recompiles
        # once with the width dynamic. (With dynamic=False every new width recompiled, and past dynamo's
        # recompile limit flex ran unfused, with the whole score matrix in memory.)
        _compiled_flex["fn"] = torch.compile(flex_attention)
    return _compiled_flex["fn"]


def _block_mask(mask: AttentionMask, q: torch.Tensor):
    """The flex BlockMask of this forward (cached on `mask`, so every layer and the recompute share it)."""
    bm = mask._bias.get("flex")
    if bm is None:
        B, T = q.shape[0], q.shape[2]
        doc, branch = mask.doc_ids, mask.branch
        if doc is None:
            def pattern(b, h, qi, ki):
                return ki <= qi
        elif branch is not None:
            def pattern(b, h, qi, ki):
                return ((ki <= qi) & (doc[b, qi] == doc[b, ki])
                        & ((branch[b, ki] == 0) | (branch[b, ki] == branch[b, qi])))
        else:
            def pattern(b, h, qi, ki):
                return (ki <= qi) & (doc[b, qi] == doc[b, ki])
        bm = mask._bias["flex"] = block_mask(pattern, B if doc is not None else None, T, q.device)
    return bm


def flex_for_packed(device: torch.device, head_dim: int | None) -> bool:
    """Whether packed rows go to flex (then `build_attention_mask` skips the dense (B, T, T) mask).

    Compiled flex_attention finds no kernel for some head sizes (24 on an H100 with torch 2.11): 'auto'
    takes it for powers of two from 16 to 256 only.
    """
    name = _backend["name"]
    if name == "flex":
        return True
    pow2 = head_dim is not None and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    return name == "auto" and device.type == "cuda" and pow2


def _use_flex(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> bool:
    if (mask.doc_causal or mask.branch is not None) and mask.mask is None:
        return True
    # Plain causal self-attention (no cache) goes to flex only when asked for.
    return _backend["name"] == "flex" and mask.causal and q.shape[2] == k.shape[2]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
           qkv_reusable: bool = False, layer_pass: LayerPass | None = None) -> torch.Tensor:
    """q: (B, n_heads, q_len, hd), k/v: (B, n_kv, kv_len, hd) -> (B, n_heads, q_len, hd).
    `layer_pass`: a layer recomputed in halves, whose forward may keep the output and whose rerun takes it
    (memory/kept_attention.py), for plain or packed causal rows; `qkv_reusable`: the caller can rerun from
    kept q, k, v (`kept_attention.rerun_from_kept`)."""
    n_rep = q.shape[1] // k.shape[1]
    if layer_pass is not None and (mask.causal or mask.doc_causal) and keeps(layer_pass):
        kept = attend_kept(q, k, v, layer_pass, qkv_reusable, None if mask.causal else packed_rows(mask))
        if kept is not None:
            return kept
    if layer_pass is None and mask.doc_causal and mask.mask is None and _backend["name"] == "auto":
        out = packed_attention(q, k, v, packed_rows(mask))  # the varlen flash kernel, where it runs
        if out is not None:
            return out
    if _use_flex(q, k, mask):
        return _flex_attention(q.is_cuda)(q, k, v, block_mask=_block_mask(mask, q), enable_gqa=n_rep > 1)
    if mask.causal and _SDPA_HAS_GQA:
        # The flash kernel takes GQA natively when there is no mask tensor.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    # With a mask tensor the memory-efficient kernel runs, which does not take GQA in every torch release;
    # repeating K/V keeps us off the quadratic-memory math fallback.
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.sdpa_mask(q.dtype), is_causal=mask.causal)
