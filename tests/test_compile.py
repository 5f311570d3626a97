"""`--compile`: each step kind compiled once gives the eager engine's tokens (CPU, inductor)."""

from __future__ import annotations

import copy

import pytest

from conftest import tiny_model
from sparkee import GenerationConfig, Interleave, generate, generate_batch, wrap_model
from sparkee.compiled import enable_compile

PROMPT = [5, 7, 9, 11, 3]


@pytest.mark.slow
def test_compiled_step_kinds_equal_the_eager_engine():
    model = tiny_model("qwen2", layers=3)
    eager = wrap_model(model)
    compiled = wrap_model(copy.deepcopy(model))
    enable_compile(compiled)
    cfgs = [
        GenerationConfig(max_new_tokens=16, speech_policy="spar-k:even:2", interleave=Interleave(1, 4)),
        GenerationConfig(
            max_new_tokens=16, speech_policy="spar-k:FEE:1", interleave=Interleave(0, 1), verify=True
        ),
    ]
    for cfg in cfgs:
        a, b = generate(eager, PROMPT, cfg), generate(compiled, PROMPT, cfg)
        assert a.tokens == b.tokens and a.exit_layers == b.exit_layers
        assert b.cache.lens == a.cache.lens
    prompts = [PROMPT, PROMPT[:2], [9, 8, 7, 6, 5, 4]]
    ref = [r.tokens for r in generate_batch(eager, prompts, cfgs[0])]
    assert [r.tokens for r in generate_batch(compiled, prompts, cfgs[0])] == ref
    # each kind compiled once: the blocks seen are layer ranges, reused across calls
    assert set(compiled._blocks._fns) <= {(0, 3), (0, 2), (2, 3), (0, 1), (1, 3)}
