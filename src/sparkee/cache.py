"""Preallocated per-layer KV buffers with per-layer lengths.

Early-exit steps leave the deep layers of their positions empty, so each layer keeps its own
length. The deep layers are always missing a contiguous tail of positions (see generate.py), so a
length per layer describes the whole state, and rolling back is setting lengths.

transformers' attention modules call `update(key, value, layer_idx)`; this object answers that call
by writing at the layer's current length and returning views of the filled prefix.
"""

from __future__ import annotations

import torch


class LayeredKVCache:
    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        devices: list[torch.device],
        batch: int = 1,
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.lens = [0] * num_layers  # filled slots per layer
        # positions dropped before each layer by prefill pooling: slot = position - shift
        self.shift = [0] * num_layers
        self.max_len = max_len

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        # key_states: [B, kv_heads, n, head_dim] for the n positions that follow the layer's length
        s, n = self.lens[layer_idx], key_states.shape[-2]
        if s + n > self.max_len:
            raise RuntimeError(f"KV cache full: {s + n} positions > {self.max_len} allocated")
        self.keys[layer_idx][:, :, s : s + n] = key_states
        self.values[layer_idx][:, :, s : s + n] = value_states
        self.lens[layer_idx] = s + n
        return self.keys[layer_idx][:, :, : s + n], self.values[layer_idx][:, :, : s + n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lens[layer_idx]

    def next_position(self, layer_idx: int) -> int:
        """First position whose KV this layer lacks."""
        return self.lens[layer_idx] + self.shift[layer_idx]

    def truncate(self, length: int) -> None:
        """Roll back: every layer keeps positions < `length` only."""
        self.lens = [min(n, length - s) for n, s in zip(self.lens, self.shift, strict=True)]

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lens[layer_idx]
        return self.keys[layer_idx][:, :, :n], self.values[layer_idx][:, :, :n]

    def nbytes(self) -> int:
        """Bytes of KV actually held (filled positions), summed over layers."""
        per_pos = [k[:, :, :1].numel() * k.element_size() * 2 for k in self.keys]
        return sum(p * n for p, n in zip(per_pos, self.lens, strict=True))
