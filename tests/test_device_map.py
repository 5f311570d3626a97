"""sparkee's layer-by-layer loop under accelerate device maps: explicit placement and disk offload.

Layers kept on disk hold `meta` weights; sparkee takes each layer's device from accelerate's hook
(`backbone.execution_device`) and reads fingerprint weights through `align_module_device`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from sparkee import GenerationConfig, Interleave, generate, load_model

PROMPT = [5, 7, 9, 11]
N_LAYERS = 6


def configs():
    return [
        GenerationConfig(max_new_tokens=14),
        GenerationConfig(max_new_tokens=14, speech_policy="spar-k:even:3", interleave=Interleave(2, 4)),
        GenerationConfig(
            max_new_tokens=14, speech_policy="spar-k:triple:2", interleave=Interleave(1, 5), verify=True
        ),
    ]


def device_map(**overrides):
    dm = {"model.embed_tokens": "cpu"}
    dm.update({f"model.layers.{i}": "cpu" for i in range(N_LAYERS)})
    dm.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    for i, where in overrides.items():
        dm[f"model.layers.{int(i.lstrip('L'))}"] = where
    return dm


@pytest.fixture(scope="module", params=["qwen2", "glm"])
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"{request.param}-dm")
    tiny_model(request.param, layers=N_LAYERS).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    bb = load_model(model_dir)
    return [generate(bb, PROMPT, c) for c in configs()]


def assert_same(bb, reference):
    for cfg, ref in zip(configs(), reference, strict=True):
        res = generate(bb, PROMPT, cfg)
        assert res.tokens == ref.tokens
        assert res.exit_layers == ref.exit_layers
        for i in range(bb.num_layers):
            k, v = res.cache.layer_kv(i)
            rk, rv = ref.cache.layer_kv(i)
            torch.testing.assert_close(k.cpu(), rk, atol=1e-5, rtol=0)
            torch.testing.assert_close(v.cpu(), rv, atol=1e-5, rtol=0)


def test_explicit_device_map_matches_plain_load(model_dir, reference):
    dm = device_map()
    bb = load_model(model_dir, device_map=dm)
    assert bb.layer_devices == [torch.device("cpu")] * N_LAYERS
    assert_same(bb, reference)


@pytest.mark.parametrize("where", ["middle", "last"])
def test_disk_offload_matches_plain_load(where, model_dir, reference, tmp_path):
    dm = device_map(L2="disk", L4="disk") if where == "middle" else device_map(L5="disk")
    bb = load_model(model_dir, device_map=dm, offload_folder=str(tmp_path / "offload"))
    offloaded = bb.layers[2 if where == "middle" else 5]
    assert offloaded.self_attn.q_proj.weight.device.type == "meta"  # really kept on disk
    assert bb.layer_devices == [torch.device("cpu")] * N_LAYERS  # where accelerate runs them
    assert bb.fingerprint() == load_model(model_dir).fingerprint()
    assert_same(bb, reference)
