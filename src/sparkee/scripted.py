"""A tiny transformers LM that emits a given script of tokens, for tests and the interleave benchmark.

A bigram model written into a Llama checkpoint: the embedding of token t is the one-hot vector of
t, every decoder layer adds nothing (its attention and MLP output projections are zero), and the
output projection maps t to a large logit for the token that follows t in the script. Greedy
decoding from the script's first token then reproduces the script, at every exit layer alike. The
script must not repeat a token with two different successors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import hf
from .errors import SparkeeError


def scripted_model(script: Sequence[int], vocab_size: int, layers: int = 4):
    """A LlamaForCausalLM over `vocab_size` tokens whose greedy continuation of script[0] is script[1:]."""
    nxt: dict[int, int] = {}
    for a, b in zip(script, script[1:], strict=False):
        if nxt.setdefault(a, b) != b:
            raise SparkeeError(f"the script repeats token {a} with two different successors")
    cfg = hf.make_config(
        "LlamaForCausalLM",
        vocab_size=vocab_size,
        hidden_size=vocab_size,
        intermediate_size=8,
        num_hidden_layers=layers,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=max(512, 2 * len(script)),
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    model = hf.model_from_config(cfg).eval()
    p = hf.parts(model)
    with torch.no_grad():
        p.embed_tokens.weight.copy_(torch.eye(vocab_size))
        for layer in p.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        p.norm.weight.fill_(1.0)
        head = torch.zeros(vocab_size, vocab_size)
        for a, b in nxt.items():
            head[b, a] = 50.0  # logit of b given a; the RMS norm scales one-hots by sqrt(vocab)
        p.lm_head.weight.copy_(head)
    return model
