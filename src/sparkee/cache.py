"""Preallocated per-layer KV buffers with a length per (layer, batch row).

Early-exit steps leave the deep layers of their positions empty, so each layer keeps its own
length, and in a batch each row its own. The deep layers of a row are always missing a
contiguous tail of its positions (see generate.py), so these lengths describe the whole state,
and rolling a row back is setting its lengths.

transformers' attention modules call `update(key, value, layer_idx, ...)` (the protocol, and the
call forms of each release, are in hf.py). Before running layers the decode loop tells the cache
which batch rows the pass holds and how many new positions each row brings (`begin_pass`); each
call writes each row's positions at that row's length and returns the
keys and values of the rows in the pass, up to the longest row. Rows in a pass are left-aligned:
row j's real positions come first, padding after; padding is never written.
"""

from __future__ import annotations

import torch

from .hf import CacheProtocol


class LayeredKVCache(CacheProtocol):
    def __init__(
        self,
        num_layers: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        devices: list[torch.device],
        batch: int = 1,
        static: bool = False,
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        if static:  # one more slot: padding rows of static passes write there, nobody reads it
            shape = (batch, num_kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.num_layers, self.batch, self.max_len, self.static = num_layers, batch, max_len, static
        self.lens = [[0] * batch for _ in range(num_layers)]  # filled slots per layer and row
        # positions dropped before each layer by prefill pooling: slot = position - shift
        self.shift = [[0] * batch for _ in range(num_layers)]
        self._rows: list[int] = [0]
        self._counts: list[int] = [0]
        self._offsets: list[int] = [0]
        self._whole = True  # the pass holds every row, in order
        self._index: dict[torch.device, torch.Tensor] = {}  # the pass's rows as a tensor, per device
        self._slots: torch.Tensor | None = None  # static passes: write slot of every (row, position)

    # -- the pass the next update() calls belong to ---------------------------------------------

    def begin_pass(
        self, rows: list[int], counts: list[int], offsets: list[int], slots: torch.Tensor | None = None
    ) -> None:
        """The next layers run over batch `rows`; row j brings `counts[j]` new positions, written
        from slot `offsets[j]` on (the same for every layer of a block).

        Static passes (compiled step kinds) give `slots` ([R, r] long, padding aimed at a scratch
        slot nobody attends): update() then writes with index ops and returns the whole buffers, so
        every call of a step kind has the same shapes; the decode loop sets the lengths itself.
        """
        self._rows, self._counts, self._offsets, self._slots = rows, counts, offsets, slots
        self._whole = len(rows) == self.batch and all(r == i for i, r in enumerate(rows))
        self._index = {}

    def _row_index(self, device: torch.device) -> torch.Tensor:
        idx = self._index.get(device)
        if idx is None:
            idx = self._index[device] = torch.tensor(self._rows, device=device)
        return idx

    def write(self, key_states, value_states, layer_idx: int):
        # key_states: [R, kv_heads, r, head_dim]; row j's first counts[j] positions are real
        K, V = self.keys[layer_idx], self.values[layer_idx]
        if self._slots is not None:
            return self._static_update(K, V, key_states, value_states)
        lens = self.lens[layer_idx]
        kv_len = 0
        for j, (b, n, s) in enumerate(zip(self._rows, self._counts, self._offsets, strict=True)):
            if s + n > self.max_len:
                raise RuntimeError(f"KV cache full: {s + n} positions > {self.max_len} allocated")
            if n:
                K[b, :, s : s + n] = key_states[j, :, :n]
                V[b, :, s : s + n] = value_states[j, :, :n]
            lens[b] = s + n
            kv_len = max(kv_len, s + n)
        if self._whole:  # every row, in order: views, no copy
            return K[:, :, :kv_len], V[:, :, :kv_len]
        idx = self._row_index(K.device)
        return K[:, :, :kv_len].index_select(0, idx), V[:, :, :kv_len].index_select(0, idx)

    def _static_update(self, K, V, key_states, value_states):
        slots = self._slots
        if len(self._rows) == 1:
            b = self._rows[0]
            K[b].index_copy_(1, slots[0], key_states[0])
            V[b].index_copy_(1, slots[0], value_states[0])
        else:
            rows = self._row_index(K.device)[:, None]
            K[rows, :, slots] = key_states.transpose(1, 2)
            V[rows, :, slots] = value_states.transpose(1, 2)
        if self._whole:
            return K, V
        idx = self._row_index(K.device)
        return K.index_select(0, idx), V.index_select(0, idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lens[layer_idx])

    # -- bookkeeping ----------------------------------------------------------------------------

    def next_position(self, layer_idx: int, row: int = 0) -> int:
        """First position of `row` whose KV this layer lacks."""
        return self.lens[layer_idx][row] + self.shift[layer_idx][row]

    def truncate(self, length: int, row: int = 0) -> None:
        """Roll `row` back: every layer keeps its positions < `length` only."""
        for lens, shift in zip(self.lens, self.shift, strict=True):
            lens[row] = min(lens[row], length - shift[row])

    def row(self, row: int) -> RowView:
        return RowView(self, row)

    def nbytes(self, row: int | None = None) -> int:
        """Bytes of KV actually held (filled positions), summed over layers (and rows)."""
        total = 0
        for k, lens in zip(self.keys, self.lens, strict=True):
            per_pos = k[0, :, :1].numel() * k.element_size() * 2
            total += per_pos * (sum(lens) if row is None else lens[row])
        return total


class RowView:
    """One batch row of a cache, as a single-sequence cache looks: `lens[i]`, `layer_kv(i)`."""

    def __init__(self, cache: LayeredKVCache, row: int) -> None:
        self.cache, self.index = cache, row

    @property
    def lens(self) -> list[int]:
        return [lens[self.index] for lens in self.cache.lens]

    @property
    def shift(self) -> list[int]:
        return [s[self.index] for s in self.cache.shift]

    def next_position(self, layer_idx: int) -> int:
        return self.cache.next_position(layer_idx, self.index)

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, b = self.cache.lens[layer_idx][self.index], self.index
        return self.cache.keys[layer_idx][b : b + 1, :, :n], self.cache.values[layer_idx][b : b + 1, :, :n]

    def nbytes(self) -> int:
        return self.cache.nbytes(self.index)
