"""Exit heads: kinds, token sets, safetensors round trip, backbone fingerprints."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from sparkee import ExitHeads, SparkeeError, load_heads, wrap_model

BB = wrap_model(tiny_model("qwen2"))
OTHER = wrap_model(tiny_model("qwen2", seed=1))


def h():
    torch.manual_seed(0)
    return torch.randn(1, 3, BB.hidden_size)


def logit_lens(x):
    return BB.project(BB.final_norm(x))


@pytest.mark.parametrize("kind", ["logit-lens", "tuned-lens", "full"])
def test_untrained_heads_are_the_logit_lens(kind):
    heads = ExitHeads(BB, kind, layers=[2, 4])
    torch.testing.assert_close(heads(2, h()), logit_lens(h()))


def test_token_set_restricts_columns_in_order():
    ids = [50, 3, 17]
    for kind in ("logit-lens", "tuned-lens", "full"):
        heads = ExitHeads(BB, kind, layers=[3], token_ids=ids)
        out = heads(3, h())
        assert out.shape[-1] == 3
        torch.testing.assert_close(out, logit_lens(h())[..., [3, 17, 50]])


@pytest.mark.parametrize("kind", ["logit-lens", "tuned-lens", "full"])
def test_save_load_round_trip_keeps_weights_and_metadata(tmp_path, kind):
    heads = ExitHeads(BB, kind, layers=[1, 3], token_ids=list(range(40, 60)))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = heads.save(tmp_path / "heads.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (
        meta["head_type"] == kind
        and meta["layers"] == "[1, 3]"
        and meta["hidden_size"] == str(BB.hidden_size)
    )
    assert meta["fingerprint"] == BB.fingerprint() and meta["token_set_size"] == "20"
    back = load_heads(path, BB)
    assert back.kind == kind and back.layers == [1, 3]
    torch.testing.assert_close(back(3, h()), heads(3, h()))
    assert torch.equal(back.token_ids, heads.token_ids)


def test_heads_of_another_model_are_refused(tmp_path):
    path = ExitHeads(BB, "tuned-lens", layers=[2]).save(tmp_path / "h.safetensors")
    with pytest.raises(SparkeeError, match="made for another model"):
        load_heads(path, OTHER)


def test_fingerprint_ignores_dtype_but_not_weights():
    m = tiny_model("qwen2")
    assert wrap_model(m.to(torch.bfloat16)).fingerprint() == BB.fingerprint()
    assert OTHER.fingerprint() != BB.fingerprint()


def test_bad_head_inputs(tmp_path):
    with pytest.raises(SparkeeError, match="unknown head type"):
        ExitHeads(BB, "medusa")
    with pytest.raises(SparkeeError, match="out of range"):
        ExitHeads(BB, "tuned-lens", layers=[6])
    with pytest.raises(SparkeeError, match="does not exist"):
        load_heads(tmp_path / "missing.safetensors", BB)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SparkeeError, match="not a safetensors file"):
        load_heads(junk, BB)
