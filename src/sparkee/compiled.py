"""`--compile`: torch.compile each step kind once.

A step kind is a block of consecutive layers run over a fixed number of rows: an early step runs
layers 1..L over 1 row, a full step's deep part runs layers L+1..N over 1 row (no pending
position) or k + 1 rows (a refresh with k pending), a verification pass is a refresh, and a batch
adds a row dimension. Under `--compile` the decode loop keeps the KV cache static (it attends over
the whole preallocated buffer with a mask and writes with index operations, see cache.py), so
every call of a kind has the same shapes and each kind compiles once: torch.compile with
`mode="reduce-overhead"` on CUDA (which captures CUDA graphs), the default inductor mode on CPU.
Prefill (any prompt length) stays eager.

Tested on CPU (outputs equal the eager engine token for token). CUDA graphs were not run: no GPU
was available to this project; the cache buffers are marked as static addresses for them.
"""

from __future__ import annotations

import torch

from .hf import call_layer


class CompiledBlocks:
    def __init__(self, bb, mode: str | None = None, backend: str = "inductor") -> None:
        self.bb = bb
        self.cuda = torch.device(bb.device).type == "cuda"
        self.mode = mode if mode is not None else ("reduce-overhead" if self.cuda else None)
        self.backend = backend
        self._fns: dict[tuple[int, int], object] = {}
        self._marked: set[int] = set()

    def get(self, a: int, b: int):
        fn = self._fns.get((a, b))
        if fn is None:
            layers = list(self.bb.layers[a:b])

            def block(h, mask, position_ids, position_embeddings, cache):
                for layer in layers:
                    h = call_layer(layer, h, mask, position_ids, position_embeddings, cache)
                return h

            fn = self._fns[(a, b)] = torch.compile(block, mode=self.mode, backend=self.backend, dynamic=False)
        return lambda h, mask, pids, pe, cache: self._call(fn, h, mask, pids, pe, cache)

    def _call(self, fn, h, mask, pids, pe, cache):
        if self.cuda and id(cache) not in self._marked:  # CUDA graphs need the buffers' addresses fixed
            for t in (*cache.keys, *cache.values):
                torch._dynamo.mark_static_address(t)
            self._marked.add(id(cache))
        return fn(h, mask, pids, pe, cache)


def enable_compile(bb, mode: str | None = None, backend: str = "inductor") -> None:
    """Compile `bb`'s step kinds on first use (each kind once per shape)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    # every kind is a new shape of the same Python function: allow enough of them before dynamo
    # gives up and runs eagerly
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
    bb._blocks = CompiledBlocks(bb, mode, backend)


def disable_compile(bb) -> None:
    bb._blocks = None
