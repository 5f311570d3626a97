"""Tiny random models the tests build (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sparkee import wrap_model

ARCHS = ("qwen2", "llama", "glm")

# Tiny models gain nothing from a second thread, and an OpenMP barrier waiting on a descheduled
# thread turns a 20 us product into milliseconds when the machine is busy: one thread keeps test
# times steady. Tests never measure decode costs unless they ask for it (SPARKEE_NO_CALIBRATE).
torch.set_num_threads(1)
os.environ.setdefault("SPARKEE_NO_CALIBRATE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Kernel choices and calibrations of test models go to a temporary directory, never the user's."""
    old = os.environ.get("SPARKEE_CACHE")
    os.environ["SPARKEE_CACHE"] = str(tmp_path_factory.mktemp("sparkee-cache"))
    yield
    if old is None:
        os.environ.pop("SPARKEE_CACHE", None)
    else:
        os.environ["SPARKEE_CACHE"] = old


def tiny_model(arch: str = "qwen2", layers: int = 6, hidden: int = 32, vocab: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "glm":
        cfg, cls = GlmConfig(**common, head_dim=hidden // 4, pad_token_id=0, eos_token_id=[1]), GlmForCausalLM
    else:
        raise ValueError(arch)
    cfg.architectures = [cls.__name__]
    model = cls(cfg).eval()
    # random init is too flat for argmax tests to be meaningful: sharpen the output distribution
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def qwen_bb():
    return wrap_model(tiny_model("qwen2"))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2-tiny")
    tiny_model("qwen2").save_pretrained(d)
    return d
