"""Affinity Pooling: compress the speech part of the prompt during prefill (METHOD.md section 3).

Scan the prompt's hidden states in time order keeping a current group; the next state joins the
group when its best cosine similarity with the group's last `window` members is at least `tau`,
else the group is mean-pooled into one state and a new group starts. Only time-contiguous speech
tokens merge; text tokens are never touched. The "dual" form pools once at the input embeddings
(window 1) and once after a deep layer (window 3); every later layer runs on the shorter sequence
and keeps a shorter KV cache.

Rotary positions of a pooled state (the paper does not publish a rule): `first` gives the group
the position of its first member, `mean` the mean of its members' positions (rotary embeddings
accept fractional positions). Generated tokens keep the usual positions (prompt length + i), so
the text that follows sees the same relative distances to the un-pooled prompt end either way.

The spec (`PoolSpec`, `parse_pool`) lives in config.py; this module computes the groups and pools.
"""

from __future__ import annotations

import torch


def affinity_groups(h: torch.Tensor, mergeable: torch.Tensor, tau: float, window: int) -> list[list[int]]:
    """Groups of consecutive indices; h: [T, H], mergeable: [T] bool (speech positions)."""
    T = h.shape[0]
    hn = torch.nn.functional.normalize(h.float(), dim=-1)
    # sim[k - 1, t] = cos(h_t, h_{t-k}) for k = 1..window: a group is contiguous, so its last w
    # members before t are t-1 .. t-w (those still inside the group)
    sim = torch.full((window, T), -2.0)
    for k in range(1, min(window, T - 1) + 1):
        sim[k - 1, k:] = (hn[k:] * hn[:-k]).sum(-1)
    merge = mergeable.tolist()
    groups: list[list[int]] = []
    cur: list[int] = []
    for t in range(T):
        if cur and merge[t] and merge[cur[-1]]:
            reach = min(window, len(cur))
            if float(sim[:reach, t].max()) >= tau:
                cur.append(t)
                continue
        if cur:
            groups.append(cur)
        cur = [t]
    groups.append(cur)
    return groups


def pool(
    h: torch.Tensor, positions: torch.Tensor, speech: torch.Tensor, groups: list[list[int]], rule: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-pool h ([1, T, H]) over `groups`; returns pooled h [1, G, H], positions [G], speech mask [G]."""
    if len(groups) == h.shape[1]:
        return h, positions, speech
    idx = torch.tensor([g[0] for g in groups])
    seg = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    sizes = torch.tensor([len(g) for g in groups], dtype=h.dtype).unsqueeze(-1)
    out = torch.zeros(1, len(groups), h.shape[-1], dtype=h.dtype, device=h.device)
    out[0].index_add_(0, seg.to(h.device), h[0])
    out = out / sizes.to(h.device)
    if rule == "first":
        pos = positions[idx]
    else:
        pos = torch.zeros(len(groups), dtype=positions.dtype).index_add_(0, seg, positions) / sizes.squeeze(
            -1
        ).to(positions.dtype)
    return out, pos, speech[idx]
