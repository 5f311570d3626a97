"""The transformers contract: every convention `sparkee.hf` relies on, asserted one by one.

When a transformers release changes one of them, exactly the test named after it fails, and its
message starts with the installed version (`make test-latest` runs this file against the newest
releases). Each architecture sparkee supports (Qwen2, Llama, Glm) is checked: one decoder layer
and a whole tiny model run through the adapter with sparkee's cache must equal transformers' own
forward with its `DynamicCache` (fp32, 1e-5) for a prefill, a 1-token step, a k-token step over an
offset, and a batch whose rows have different lengths.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import ARCHS, tiny_model
from sparkee import hf, wrap_model
from sparkee.cache import LayeredKVCache

V = hf.transformers_version()
TOL = dict(atol=1e-5, rtol=1e-5)


def check(ok: bool, what: str) -> None:
    assert ok, f"transformers {V}: {what}"


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"transformers {V}: {what}\n{m}")


MODELS = {a: tiny_model(a, layers=3) for a in ARCHS}


def new_cache(bb, batch: int = 1, max_len: int = 64) -> LayeredKVCache:
    return LayeredKVCache(
        bb.num_layers, max_len, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices, batch
    )


def ours(bb, cache: LayeredKVCache, rows: list[int], new: list[list[int]]) -> torch.Tensor:
    """Run every layer over `new` tokens of batch `rows` (row j's first token at its cached
    length), the way the decode loop does; last-layer logits [R, r, V] (padding rows included)."""
    R, r = len(rows), max(len(t) for t in new)
    ids = torch.zeros(R, r, dtype=torch.long)
    for j, t in enumerate(new):
        ids[j, : len(t)] = torch.tensor(t)
    lens = [cache.lens[0][b] for b in rows]
    counts = [len(t) for t in new]
    h = bb.embed(ids)
    pids = torch.tensor(lens)[:, None] + torch.arange(r)
    pe = bb.rope(h, pids)
    mask = hf.attention_mask(lens, counts, r, bb.device)
    cache.begin_pass(rows, counts, lens)
    h = bb.run_block(0, bb.num_layers, h, mask, pids, pe, cache)
    return bb.project(bb.final_norm(h)).float()


class Reference:
    """transformers' own forward of one sequence, growing a DynamicCache."""

    def __init__(self, model) -> None:
        self.model, self.cache = model, hf.new_dynamic_cache(model.config)

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        kw = hf.cache_keyword(type(self.model))  # the model's forward was renamed with the layers'
        out = self.model(torch.tensor([tokens]), use_cache=True, **{kw: self.cache})
        return out.logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_whole_model_matches_dynamic_cache_forward(arch):
    model = MODELS[arch]
    bb = wrap_model(model)
    cache, ref = new_cache(bb), Reference(model)
    steps = [("prefill", [5, 7, 9, 11, 3, 2]), ("1-token step", [4]), ("k-token step", [8, 1, 6])]
    for name, tokens in steps:
        close(ours(bb, cache, [0], [tokens])[0], ref(tokens), f"{arch} {name}: logits")
    for i, (k, v) in enumerate(hf.dynamic_cache_kv(ref.cache)):
        n = cache.lens[i][0]
        close(cache.keys[i][:1, :, :n], k, f"{arch} keys of layer {i}")
        close(cache.values[i][:1, :, :n], v, f"{arch} values of layer {i}")


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_batch_rows_of_different_lengths_match_each_alone(arch):
    model = MODELS[arch]
    bb = wrap_model(model)
    cache = new_cache(bb, batch=2)
    prompts = [[5, 7, 9, 11, 3, 2, 8], [4, 6, 1]]
    refs = [Reference(model) for _ in prompts]
    for b, p in enumerate(prompts):  # prompts are prefilled alone, as the engine does
        close(ours(bb, cache, [b], [p])[0], refs[b](p), f"{arch} prefill of row {b}")
    for name, new in (("1-token step", [[10], [12]]), ("k-token step", [[2, 3], [7, 5, 9]])):
        got = ours(bb, cache, [0, 1], new)
        for b, t in enumerate(new):
            close(got[b, : len(t)], refs[b](t), f"{arch} batched {name}, row {b}")
    got = ours(bb, cache, [1], [[3]])  # one row of the batch alone, the other row untouched
    close(got[0], refs[1]([3]), f"{arch} step of row 1 alone")


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_one_decoder_layer_with_our_cache_matches_dynamic_cache(arch):
    model = MODELS[arch]
    p = hf.parts(model)
    layer = p.layers[0]
    torch.manual_seed(1)
    H = model.config.hidden_size
    dyn = hf.new_dynamic_cache(model.config)
    bb = wrap_model(model)
    cache = new_cache(bb)
    at = 0
    for r in (5, 1, 3):
        h = torch.randn(1, r, H)
        pids = torch.arange(at, at + r)[None]
        pe = hf.rotary(p.rotary_emb, h, pids)
        mask = hf.attention_mask([at], [r], r, h.device)
        want = layer(
            h,
            attention_mask=mask,
            position_ids=pids,
            position_embeddings=pe,
            use_cache=True,
            **{hf.cache_keyword(type(layer)): dyn},
        )
        want = want[0] if isinstance(want, tuple) else want
        cache.begin_pass([0], [r], [at])
        got = hf.call_layer(layer, h, mask, pids, pe, cache)
        close(got, want, f"{arch} decoder layer 0 over {r} positions at offset {at}")
        at += r


# -- the conventions, one test each ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_module_layout(arch):
    model = MODELS[arch]
    p = hf.parts(model)
    check(len(p.layers) == model.config.num_hidden_layers, "model.model.layers holds every decoder layer")
    check(isinstance(p.embed_tokens, torch.nn.Embedding), "model.model.embed_tokens is an nn.Embedding")
    check(p.lm_head.weight.shape[0] == model.config.vocab_size, "model.lm_head projects onto the vocabulary")
    check(hf.architecture(model) == type(model).__name__, "config.architectures names the model class")


@pytest.mark.parametrize("arch", ARCHS)
def test_rotary_call_returns_cos_sin(arch):
    model = MODELS[arch]
    p = hf.parts(model)
    h = torch.zeros(2, 4, model.config.hidden_size)
    out = hf.rotary(p.rotary_emb, h, torch.arange(4)[None].expand(2, 4))
    check(isinstance(out, tuple) and len(out) == 2, "rotary_emb(h, position_ids) returns (cos, sin)")
    head_dim = hf.shape(model.config).head_dim
    rot = head_dim // 2 if arch == "glm" else head_dim  # Glm rotates half of each head
    check(out[0].shape == (2, 4, rot), f"cos is [batch, positions, {rot}], got {tuple(out[0].shape)}")


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layer_call_keywords_and_return(arch):
    layer = hf.parts(MODELS[arch]).layers[0]
    params = inspect.signature(type(layer).forward).parameters
    kw = hf.cache_keyword(type(layer))
    for name in ("attention_mask", "position_ids", "position_embeddings", "use_cache", kw):
        check(name in params, f"{type(layer).__name__}.forward takes {name}=")
    with torch.no_grad():
        h = torch.randn(1, 2, MODELS[arch].config.hidden_size)
        pe = hf.rotary(hf.parts(MODELS[arch]).rotary_emb, h, torch.arange(2)[None])
        out = layer(h, position_embeddings=pe, position_ids=torch.arange(2)[None])
    first = out[0] if isinstance(out, tuple) else out
    check(
        isinstance(first, torch.Tensor) and first.shape == h.shape, "a layer returns h (or a tuple led by h)"
    )


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_a_copied_decoder_layer_computes_as_its_source_and_writes_its_own_cache_index(arch):
    """Adapter heads: a new layer of the model's class with a copy of layer 1's weights, whose
    attention names cache layer 0 (`self_attn.layer_idx`)."""
    model = MODELS[arch]
    bb = wrap_model(model)
    block = hf.decoder_layer_like(model, 1, 0)
    src = hf.parts(model).layers[1]
    check(type(block) is type(src) and block is not src, "a new module of the source layer's class")
    h = torch.randn(1, 3, model.config.hidden_size)
    pids = torch.arange(3)[None]
    pe = hf.rotary(hf.parts(model).rotary_emb, h, pids)
    caches = [
        LayeredKVCache(bb.num_layers, 8, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices)
        for _ in "ab"
    ]
    outs = []
    for layer, cache in zip((block, src), caches, strict=True):
        cache.begin_pass([0], [3], [0])
        outs.append(hf.call_layer(layer, h, None, pids, pe, cache))
    close(outs[0], outs[1], "the copy's output")
    check(caches[0].lens[0] == [3] and caches[0].lens[1] == [0], "the copy writes cache layer 0")
    check(caches[1].lens[1] == [3], "the source still writes its own layer")
    block.self_attn.q_proj.weight.data.zero_()
    check(bool(src.self_attn.q_proj.weight.abs().sum() > 0), "the copy shares no weights with its source")


class Recorder(LayeredKVCache):
    def update(self, *args, **kwargs):
        self.calls.append((len(args), sorted(kwargs)))
        return super().update(*args, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_attention_calls_cache_update_with_key_value_layer_idx(arch):
    bb = wrap_model(MODELS[arch])
    cache = Recorder(bb.num_layers, 16, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices)
    cache.calls = []
    ours(bb, cache, [0], [[1, 2, 3]])
    check(len(cache.calls) == bb.num_layers, f"one cache.update per layer, got {len(cache.calls)}")
    nargs, kws = cache.calls[0]
    check(nargs >= 3, f"update(key_states, value_states, layer_idx, ...) positional, got {nargs} arguments")
    check(cache.lens == [[3]] * bb.num_layers, "each layer wrote its keys through update()")
    print(f"transformers {V} calls update with {nargs} positional arguments and keywords {kws}")


def test_cache_update_accepts_every_call_form():
    cache = LayeredKVCache(1, 8, 2, 4, torch.float32, [torch.device("cpu")])
    k = torch.randn(1, 2, 1, 4)
    forms = [
        ((k, k, 0), {}),  # up to 5.23
        ((k, k, 0, {"cache_position": None}), {}),  # the old cache_kwargs dict
        ((k, k, 0), {"kwargs": {}}),  # 5.24
        ((k, k, 0), {"cache_kwargs": None, "some_future_keyword": 1}),
    ]
    for n, (args, kwargs) in enumerate(forms):
        cache.begin_pass([0], [1], [n])
        keys, values = cache.update(*args, **kwargs)
        check(keys.shape == (1, 2, n + 1, 4), f"update form {n} returns the keys so far")
    check(cache.get_seq_length(0) == len(forms), "get_seq_length counts the written positions")
    check(cache.is_compileable is False, "the cache declares itself not compileable")


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_mask_conventions(arch):
    """bool masks with True = attend, and None meaning causal for several queries (sdpa)."""
    bb = wrap_model(MODELS[arch])
    h = bb.embed(torch.tensor([[5, 7, 9, 11]]))
    pids = torch.arange(4)[None]
    pe = bb.rope(h, pids)
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
    outs = {}
    for name, mask in (
        ("none", None),
        ("causal", causal),
        ("diag", torch.eye(4, dtype=torch.bool)[None, None]),
    ):
        cache = new_cache(bb, max_len=8)
        cache.begin_pass([0], [4], [0])
        outs[name] = bb.run_block(0, bb.num_layers, h, mask, pids, pe, cache)
    close(outs["none"], outs["causal"], f"{arch}: mask None over several queries is causal")
    check(not torch.allclose(outs["diag"], outs["causal"]), f"{arch}: a bool mask hides slots where False")
    check(hf.attention_mask([3], [1], 1, "cpu") is None, "one query over a full row needs no mask")
    m = hf.attention_mask([3, 1], [2, 2], 2, "cpu")
    check(m.dtype == torch.bool and m.shape == (2, 1, 2, 5), "offset causal masks are [R, 1, r, kv] bool")
    check(m[1, 0, 0].tolist() == [True, True, False, False, False], "row 1's first query sees slots <= 1")


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_hidden_states_last_entry_is_normalised(arch):
    model = MODELS[arch]
    bb = wrap_model(model)
    ids = torch.tensor([[5, 7, 9, 11]])
    hs = hf.all_hidden_states(model, ids)
    check(len(hs) == bb.num_layers + 1, "output_hidden_states has the embeddings and one entry per layer")
    h = bb.embed(ids)
    pids = torch.arange(4)[None]
    cache = new_cache(bb, max_len=8)
    cache.begin_pass([0], [4], [0])
    after = bb.run_block(0, bb.num_layers - 1, h, None, pids, bb.rope(h, pids), cache)
    close(hs[bb.num_layers - 1], after, f"{arch}: hidden_states[L] is the state after L layers")
    cache.begin_pass([0], [4], [0])
    last = bb.run_layer(bb.num_layers - 1, after, None, pids, bb.rope(h, pids), cache)
    close(hs[-1], bb.final_norm(last), f"{arch}: hidden_states[-1] is already normalised")


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_slots_cover_every_linear_layer(arch):
    model = tiny_model(arch, layers=2)
    slots = list(hf.linear_slots(model))
    want = {
        id(m) for layer in hf.parts(model).layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    }
    check(
        {id(c) for _, _, c, head in slots if not head} == want, "linear_slots finds every decoder nn.Linear"
    )
    check(
        [c for _, _, c, head in slots if head] == [model.lm_head],
        "linear_slots ends with the output projection",
    )
    parent, name, child, _ = slots[0]
    replacement = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
    hf.replace_module(parent, name, replacement)
    check(
        getattr(parent, name) is replacement, "a linear layer is replaced by setting its parent's attribute"
    )


def test_accelerate_hooks():
    """What a device map with offloaded layers leaves on each module (as `dispatch_model` does)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    lin = torch.nn.Linear(4, 3)
    w = lin.weight.detach().clone()
    weights = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    add_hook_to_module(
        lin, AlignDevicesHook(execution_device=torch.device("cpu"), offload=True, weights_map=weights)
    )
    check(hf.execution_device(lin) == torch.device("cpu"), "accelerate's hook carries execution_device")
    check(lin.weight.device.type == "meta", "offloaded weights are meta tensors outside a forward")
    with hf.weights_on_cpu(lin):
        check(torch.equal(lin.weight, w), "align_module_device brings offloaded weights back")
    check(not hf.has_device_map(MODELS["qwen2"]), "a model loaded without a device map has no hf_device_map")


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM", "GlmForCausalLM"])
def test_config_fields_the_converter_writes(arch):
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 12345.0},
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    if arch == "GlmForCausalLM":
        fields["head_dim"] = 8
        fields["rope_parameters"]["partial_rotary_factor"] = 0.5
    config = hf.make_config(arch, **fields)
    check(config.architectures == [arch], "make_config names the architecture")
    check(config.rope_parameters["rope_theta"] == 12345.0, "rope_parameters carries rope_theta")
    model = hf.model_from_config(config)
    check(type(model).__name__ == arch, f"AutoModelForCausalLM builds {arch} from its config")
    check(hf.attention_implementation(model) == "sdpa", "models are built with sdpa attention")
    s = hf.shape(config)
    check((s.num_layers, s.num_kv_heads, s.head_dim, s.context) == (2, 2, 8, 128), "shape fields")


def test_loaded_model_uses_sdpa(qwen_dir):
    model = hf.load_causal_lm(qwen_dir, torch.float32)
    check(hf.attention_implementation(model) == "sdpa", "load_causal_lm forces sdpa attention")


def test_version_range_check(capsys):
    check(hf.tested(hf.TESTED_TRANSFORMERS[0]) and hf.tested(hf.TESTED_TRANSFORMERS[1]), "the range's ends")
    newest = hf.TESTED_TRANSFORMERS[1].rsplit(".", 1)[0] + ".99"
    check(hf.tested(newest), "patch releases of the newest tested minor count as tested")
    check(not hf.tested("4.57.0") and not hf.tested("99.0.0"), "versions outside the range are untested")


def test_untested_version_warns_one_line(monkeypatch, capsys):
    monkeypatch.setattr(hf, "transformers_version", lambda: "99.0.0")
    monkeypatch.setattr(hf, "_warned", False)
    hf.warn_if_untested()
    hf.warn_if_untested()
    err = capsys.readouterr().err
    check(err.count("\n") == 1 and "99.0.0" in err and hf.TESTED_TRANSFORMERS[0] in err, f"one line: {err!r}")
