"""The engine's sampling filter against transformers' own logits warpers, on random logits."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sparkee.config import GenerationConfig
from sparkee.engine import _filter_logits
from sparkee.train_heads import lr_factor


def reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' order in `generate`: temperature, then top-k, then top-p."""
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.6])
@pytest.mark.parametrize("top_k", [0, 1, 5, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.8, 0.3, 0.01])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(hash((temperature, top_k, top_p)) % 2**31)
    for _ in range(5):
        logits = torch.randn(100, generator=gen) * 3
        cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        ours, theirs = _filter_logits(logits, cfg), reference(logits, temperature, top_k, top_p)
        kept = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(ours), kept), (int(torch.isfinite(ours).sum()), int(kept.sum()))
        torch.testing.assert_close(ours[kept], theirs[kept])
        torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))


def test_head_training_schedule_is_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    f = lr_factor(20, 200)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, 20, 200)
    for k in range(200):
        assert opt.param_groups[0]["lr"] == pytest.approx(f(k), abs=1e-12), k
        opt.step()
        sched.step()
    assert f(0) == 0.0 and f(20) == 1.0 and f(200) == pytest.approx(0.0, abs=1e-12)
