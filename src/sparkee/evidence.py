"""What the full pass says at one early position, in the form the acceptance rules read it.

The rules of accept.py are pure Python (the config floor): they decide from an `Evidence`, which
holds the tensors and does the arithmetic on them (ranks, probabilities, entropy, speculative
sampling). The engine builds one per checked position.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .accept import Distance


@dataclass
class Evidence:
    """The full model's verdict at one early position: what a rule decides from."""

    logits: torch.Tensor  # [n] the full model's processed logits over `ids` (or the whole vocabulary)
    ids: torch.Tensor | None  # [n] sorted token ids of those entries; None: the whole vocabulary
    best: int  # the token of the largest logit
    previous: int | None = None  # the token before the early one (no-stretch)
    distance: Distance | None = None  # the unit-distance plug-in
    # sampling in verified mode only; greedy, or unverified (judged greedily, no draws): None
    probs: torch.Tensor | None = None  # [n] the full model's sampling distribution over the same entries
    early_probs: torch.Tensor | None = None  # [V] q, the early step's distribution over the vocabulary
    gen: torch.Generator | None = None  # the row's own generator

    @cached_property
    def choice(self) -> int:
        """The full model's own token: its argmax when greedy, one draw from its distribution when
        sampling (drawn once, when a rule first asks)."""
        if self.probs is None:
            return self.best
        return token_of(int(torch.multinomial(self.probs, 1, generator=self.gen)), self.ids)

    def column(self, token: int) -> int | None:
        """The entry of `token` in the logits; None when it is not among them."""
        if self.ids is None:
            return token
        i = int(torch.searchsorted(self.ids, token))
        return i if i < self.ids.numel() and int(self.ids[i]) == token else None

    def in_top_k(self, token: int, k: int) -> bool:
        """Whether `token` is among the full model's k most likely tokens (and can be drawn)."""
        col = self.column(token)
        if col is None:  # the early token is not even a candidate of the full model's projection
            return False
        src = self.probs if self.probs is not None else self.logits
        kth = torch.topk(src, min(k, src.numel())).values[-1]
        return bool(src[col] >= kth) and (self.probs is None or bool(self.probs[col] > 0))

    @cached_property
    def distribution(self) -> torch.Tensor:
        """p: the sampling distribution when sampling, else the softmax at temperature 1."""
        return self.probs if self.probs is not None else torch.softmax(self.logits.float(), -1)

    def prob(self, token: int) -> float:
        """p(token); 0 when the token is not among the entries."""
        col = self.column(token)
        return 0.0 if col is None else float(self.distribution[col])

    @cached_property
    def entropy(self) -> float:
        """H(p) in nats."""
        return entropy(self.distribution)

    @property
    def speculative(self) -> bool:
        """Whether the early step's proposal distribution is known (sampling in verified mode)."""
        return self.probs is not None and self.early_probs is not None

    def speculative_sample(self, token: int) -> tuple[bool, int]:
        """Speculative sampling: keep `token` with probability min(1, p(x) / q(x)), else draw from
        max(0, p - q), so the output distribution is the full model's."""
        q = self.early_probs
        p = torch.zeros(q.numel())
        p[self.ids.cpu() if self.ids is not None else slice(None)] = self.probs.cpu()
        if float(torch.rand((), generator=self.gen)) < min(1.0, float(p[token] / q[token].clamp_min(1e-20))):
            return True, token
        resid = (p - q).clamp_min(0)
        resid = resid / resid.sum() if resid.sum() > 0 else p
        return False, int(torch.multinomial(resid, 1, generator=self.gen))


def token_of(index: int, ids: torch.Tensor | None) -> int:
    """The token id of entry `index` of logits over `ids` (or the whole vocabulary)."""
    return index if ids is None else int(ids[index])


def entropy(p: torch.Tensor) -> float:
    """Entropy in nats of a probability vector."""
    logp = p.clamp_min(1e-30).log()
    return float(-(p * logp).sum())
