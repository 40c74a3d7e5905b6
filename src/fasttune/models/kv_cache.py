"""A static key/value cache for generation: preallocated once, filled by a prefill, then one token at a time.

Layout per layer is (B, n_kv_heads, max_len, head_dim), the layout scaled_dot_product_attention reads, so
a decoding step writes one slot and attends over a view without copying. All rows share one `length`:
batched prompts are left-padded to the same length and the padding is hidden by the attention mask.

Worked example, two prompts `a b c` and `d e`, max_len 6, after the prefill and one decoding step:
```
slot            0    1    2    3    4    5
row 0 keys      a    b    c    x    .    .       length = 4
row 1 keys      pad  d    e    y    .    .       attention_mask row 1 = 0 1 1 1
```
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for `batch_size` rows and up to `max_len` positions."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)  # (L, B, n_kv, max_len, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # slots filled, the same for every row

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache shaped for `model` (a LlamaForCausalLM), by default in its embedding's dtype/device."""
        cfg = model.config
        emb = model.get_input_embeddings().weight
        return cls(
            cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim,
            dtype=dtype or emb.dtype, device=device or emb.device,
        )

    def rows(self, start: int, end: int) -> KVCache:
        """An empty cache over rows start:end of these buffers (views: what it writes lands here), for a
        prefill of some rows while the others keep their contents (the server's continuous batching)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:end], self.v[:, start:end]  # (L, end - start, n_kv, max_len, hd)
        view.length = 0
        return view

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def check_room(self, n_new: int, batch_size: int) -> None:
        """Raise a clear error before a forward that would not fit."""
        if batch_size != self.batch_size:
            raise ValueError(f"KVCache holds {self.batch_size} rows but the input has {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"KVCache is full: {self.length} slots used + {n_new} new tokens > max_len {self.max_len}; "
                "allocate a larger cache (prompt length + max_new_tokens)"
            )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, n_kv, T, hd) of `layer` after the filled slots; return all filled slots.

        The model calls this once per layer and `advance(T)` once after the last layer, so every layer of
        one forward writes at the same offset.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, end, hd) each

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget the contents (the buffers are reused; stale slots are never read past `length`)."""
        self.length = 0
