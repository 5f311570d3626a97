"""export-draft: the shallow draft as a standard checkpoint; its logits are sparkee's early step, and
transformers' assisted generation with it equals plain greedy decoding token for token."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from sparkee import ExitHeads, SparkeeError, load_model
from sparkee.export import export_draft
from sparkee.heads import load_heads
from sparkee.labels import adapter_logits_of
from sparkee.refslm import bundled_model_dir


def _early_logits(bb, heads, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """sparkee's early step at `layer` for every position: layers 1..layer, then the exit head."""
    with torch.no_grad():
        hs = bb.model(ids, output_hidden_states=True).hidden_states
        if heads.attends:  # an adapter attends over the sequence's layer-L states
            return adapter_logits_of(bb, heads, layer, hs[layer])
        return heads(layer, hs[layer])


def _full_heads(bb, layers, seed=1, kind="full") -> ExitHeads:
    heads = ExitHeads(bb, kind, layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move them away from the model's own norm and projection
        for p in heads.per_layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return heads


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["qwen2", "llama", "glm"])
@pytest.mark.parametrize("kind", ["logit-lens", "full", "adapter"])
def test_draft_logits_equal_early_step(tmp_path, arch, kind):
    src = _save(tiny_model(arch, layers=6), tmp_path / "model")
    bb = load_model(src, fast=False)
    layer = 3
    if kind != "logit-lens":
        spec = str(_full_heads(bb, [2, 3], kind=kind).save(tmp_path / "heads.safetensors"))
    else:
        spec = "logit-lens"
    out = export_draft(src, spec, layer, tmp_path / "draft")
    cfg = json.loads((out / "config.json").read_text())
    depth = layer + (kind == "adapter")  # an adapter's layer is the draft's layer L + 1
    assert cfg["num_hidden_layers"] == depth and cfg["architectures"] == bb.config.architectures
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    info = json.loads((out / "sparkee_draft.json").read_text())
    assert info["layer"] == layer and info["head_type"] == kind
    draft = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert len(draft.model.layers) == depth
    heads = load_heads(spec, bb) if kind != "logit-lens" else ExitHeads(bb, "logit-lens")
    ids = torch.randint(0, bb.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = draft(ids).logits
    want = _early_logits(bb, heads, layer, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_bundled_reference_slm_draft(tmp_path):
    """The bundled reference SLM (tied embeddings, its own tokenizer): the logit-lens draft at layer 12
    is exact, keeps the tokenizer, and stays tied (no second copy of the embedding)."""
    src = bundled_model_dir()
    out = export_draft(src, "logit-lens", 12, tmp_path / "draft")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            assert (out / name).read_bytes() == (src / name).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and len(cfg["layer_types"]) == 12
    bb = load_model(src, fast=False)
    draft = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 40, 120, 200, 7, 8]])
    with torch.no_grad():
        got = draft(ids).logits
    want = _early_logits(bb, ExitHeads(bb, "logit-lens"), 12, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_extra_decoder_layer_plumbing(tmp_path):
    """An adapter head made of a decoder layer becomes the draft's layer L+1: here the model's own
    layer 4 on top of layers 1..3 with the logit lens, which must equal the model cut at 4 layers."""
    from sparkee.export import build_draft

    model = tiny_model("qwen2", layers=6)
    bb = load_model(_save(model, tmp_path / "model"), fast=False)
    draft = build_draft(bb, ExitHeads(bb, "logit-lens"), 3, extra_layer=bb.layers[3])
    draft.save_pretrained(tmp_path / "draft")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert draft.config.num_hidden_layers == 4
    ids = torch.randint(0, bb.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = draft(ids).logits
    want = _early_logits(bb, ExitHeads(bb, "logit-lens"), 4, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_refusals(tmp_path):
    src = _save(tiny_model("qwen2", layers=6), tmp_path / "model")
    bb = load_model(src, fast=False)
    tuned = ExitHeads(bb, "tuned-lens", [3]).save(tmp_path / "tuned.safetensors")
    with pytest.raises(SparkeeError, match="logit-lens, full or adapter"):
        export_draft(src, str(tuned), 3, tmp_path / "d1")
    restricted = ExitHeads(bb, "full", [3], token_ids=list(range(10, 40))).save(tmp_path / "r.safetensors")
    with pytest.raises(SparkeeError, match="restricted to 30 token ids"):
        export_draft(src, str(restricted), 3, tmp_path / "d2")
    with pytest.raises(SparkeeError, match="no head for layer 2"):
        export_draft(src, str(_full_heads(bb, [3]).save(tmp_path / "f.safetensors")), 2, tmp_path / "d3")
    with pytest.raises(SparkeeError, match="1..5"):
        export_draft(src, "logit-lens", 6, tmp_path / "d4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SparkeeError, match="not empty"):
        export_draft(src, "logit-lens", 3, tmp_path / "full")


@pytest.mark.parametrize("kind", ["logit-lens", "full"])
def test_assisted_generation_equals_plain_greedy(tmp_path, kind):
    """transformers' own speculative decoding (assistant_model=draft) is lossless with our draft."""
    src = _save(tiny_model("qwen2", layers=6, vocab=96), tmp_path / "model")
    bb = load_model(src, fast=False)
    spec = str(_full_heads(bb, [4], seed=2).save(tmp_path / "h.safetensors")) if kind == "full" else kind
    out = export_draft(src, spec, 4, tmp_path / "draft")
    target = AutoModelForCausalLM.from_pretrained(src).eval()
    draft = AutoModelForCausalLM.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(5)
    for prompt_len in (3, 11):
        ids = torch.randint(0, 96, (1, prompt_len), generator=g)
        kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None)
        plain = target.generate(ids, **kw)
        assisted = target.generate(ids, assistant_model=draft, **kw)
        assert plain.tolist() == assisted.tolist()


def test_cli_export_draft(tmp_path):
    from typer.testing import CliRunner

    from sparkee.cli import app

    src = _save(tiny_model("qwen2", layers=6), tmp_path / "model")
    r = CliRunner().invoke(
        app,
        [
            "export-draft",
            "--model",
            str(src),
            "--heads",
            "logit-lens",
            "--layer",
            "2",
            "--out",
            str(tmp_path / "d"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_hidden_layers"] == 2
    bb = load_model(src, fast=False)
    tuned = ExitHeads(bb, "tuned-lens", [2]).save(tmp_path / "t.safetensors")
    r = CliRunner().invoke(
        app,
        [
            "export-draft",
            "--model",
            str(src),
            "--heads",
            str(tuned),
            "--layer",
            "2",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 2
    assert "logit-lens, full or adapter" in r.output and "Traceback" not in r.output
