"""Checkpoint converters on tiny synthetic checkpoints written in each model's own key layout.

The expected logits come from forwards written here from the published equations (ChatGLM:
RMSNorm, rotary on interleaved pairs of the first half of each head with base 10000 x rope_ratio,
grouped KV attention, SwiGLU; Qwen2: the same with rotate-half rotary over the whole head), not
from transformers, so a wrong split, chunk order or rotary convention in the converter fails here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sparkee import GenerationConfig, SparkeeError, generate, load_model
from sparkee.models.cli import app as convert_app
from sparkee.models.convert import convert_glm4_voice, convert_step_audio2, parse_set

IDS = [3, 17, 42, 8, 25, 61, 9]
QUIET = lambda m: None  # noqa: E731


# ---------------------------------------------------------------------------------------------
# independent reference forwards


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attention(q, k, v, nh, ng, hd):
    """q: [T, nh, hd], k/v: [T, ng, hd]; head h uses KV group h // (nh // ng); causal."""
    T = q.shape[0]
    k = k.repeat_interleave(nh // ng, dim=1)
    v = v.repeat_interleave(nh // ng, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, nh * hd)


def rope_chatglm(x, base):
    """ChatGLM: rotate pairs (x[2i], x[2i+1]) of the first half of the head dim."""
    T, _, hd = x.shape
    rot = hd // 2
    theta = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * theta[None]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xr, xp = x[..., :rot], x[..., rot:]
    x0, x1 = xr[..., 0::2], xr[..., 1::2]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
    return torch.cat([out, xp], dim=-1)


def rope_neox(x, base):
    """Qwen2 / Llama: rotate (x[i], x[i + hd/2]) over the whole head."""
    T, _, hd = x.shape
    theta = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * theta[None]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x0, x1 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)


def chatglm_logits(w, cfg, ids):
    nh, ng, hd = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, base = cfg["layernorm_epsilon"], 10000.0 * cfg["rope_ratio"]
    x = w["transformer.embedding.word_embeddings.weight"][ids]
    T = len(ids)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        qkv = (
            h @ w[p + "self_attention.query_key_value.weight"].T
            + w[p + "self_attention.query_key_value.bias"]
        )
        q, k, v = qkv.split([nh * hd, ng * hd, ng * hd], dim=-1)
        q = rope_chatglm(q.view(T, nh, hd), base)
        k = rope_chatglm(k.view(T, ng, hd), base)
        x = x + attention(q, k, v.view(T, ng, hd), nh, ng, hd) @ w[p + "self_attention.dense.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        a0, a1 = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(a0) * a1) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, w["transformer.encoder.final_layernorm.weight"], eps)
    return x @ w["transformer.output_layer.weight"].T


def qwen2_logits(w, llm, ids):
    nh, ng = llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = llm["hidden_size"] // nh
    eps, base = 1e-6, 1e6
    x = w["model.embed_tokens.weight"][ids]
    T = len(ids)
    for i in range(llm["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def lin(name, h, p=p):
            out = h @ w[p + name + ".weight"].T
            return out + w[p + name + ".bias"] if p + name + ".bias" in w else out

        h = rms(x, w[p + "input_layernorm.weight"], eps)
        q = rope_neox(lin("self_attn.q_proj", h).view(T, nh, hd), base)
        k = rope_neox(lin("self_attn.k_proj", h).view(T, ng, hd), base)
        v = lin("self_attn.v_proj", h).view(T, ng, hd)
        x = x + lin("self_attn.o_proj", attention(q, k, v, nh, ng, hd))
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + lin(
            "mlp.down_proj", torch.nn.functional.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h)
        )
    x = rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


# ---------------------------------------------------------------------------------------------
# tiny checkpoints in the models' own layouts

GLM_CFG = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMForConditionalGeneration"],
    "num_layers": 3,
    "padded_vocab_size": 64,
    "hidden_size": 32,
    "ffn_hidden_size": 40,
    "kv_channels": 12,  # heads x kv_channels != hidden, as the config allows
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "layernorm_epsilon": 1e-5,
    "rope_ratio": 2.5,
    "seq_length": 128,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
    "eos_token_id": [1, 2],
    "pad_token_id": 1,
    "torch_dtype": "float32",
}


def glm_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, F, V = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * cfg["kv_channels"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {"transformer.embedding.word_embeddings.weight": r(V, H, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + r(H, scale=0.1)
        w[p + "self_attention.query_key_value.weight"] = r(qkv, H)
        w[p + "self_attention.query_key_value.bias"] = r(qkv)
        w[p + "self_attention.dense.weight"] = r(H, cfg["num_attention_heads"] * cfg["kv_channels"])
        w[p + "post_attention_layernorm.weight"] = 1 + r(H, scale=0.1)
        w[p + "mlp.dense_h_to_4h.weight"] = r(2 * F, H)
        w[p + "mlp.dense_4h_to_h.weight"] = r(H, F)
    w["transformer.encoder.final_layernorm.weight"] = 1 + r(H, scale=0.1)
    w["transformer.output_layer.weight"] = r(V, H, scale=1.0)
    return w


def split_two(w):
    names = sorted(w)
    half = len(names) // 2
    return [{k: w[k] for k in names[:half]}, {k: w[k] for k in names[half:]}]


def write_shards(d, w, fmt="safetensors", cfg=None, extra=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    parts = split_two(w)
    if fmt == "safetensors":
        names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for n, part in zip(names, parts, strict=True):
            save_file(part, str(d / n))
        index = "model.safetensors.index.json"
    elif fmt == "bin":
        names = [f"pytorch_model-0000{i + 1}-of-00002.bin" for i in range(2)]
        for n, part in zip(names, parts, strict=True):
            torch.save(part, d / n)
        index = "pytorch_model.bin.index.json"
    else:  # a single .bin file, no index
        torch.save(w, d / "pytorch_model.bin")
        index = None
    if index:
        wm = {k: n for n, part in zip(names, parts, strict=True) for k in part}
        (d / index).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for name, text in (extra or {}).items():
        (d / name).write_text(text)
    return d


GLM_EXTRA = {
    "tokenizer_config.json": json.dumps({"added_tokens_decoder": {"40": {"content": "<|audio_0|>"}}}),
    "tokenizer.model": "not a real tiktoken file",
    "modeling_chatglm.py": "# remote code: not copied",
}


@pytest.fixture(scope="module")
def glm_src(tmp_path_factory):
    w = glm_weights(GLM_CFG)
    w["transformer.rotary_pos_emb.inv_freq"] = torch.ones(3)  # stored by some ChatGLM checkpoints
    return write_shards(tmp_path_factory.mktemp("glm-src"), w, cfg=GLM_CFG, extra=GLM_EXTRA), w


@pytest.fixture(scope="module")
def glm_dst(glm_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("glm-dst") / "out"
    report = convert_glm4_voice(glm_src[0], dst, log=QUIET)
    return dst, report


def hf_load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------------------------------------
# GLM-4-Voice


def test_glm_logits_match_the_chatglm_equations(glm_src, glm_dst):
    _, w = glm_src
    dst, report = glm_dst
    model = hf_load(dst)
    assert type(model).__name__ == "GlmForCausalLM"
    c = model.config
    assert (c.head_dim, c.num_key_value_heads, c.vocab_size, c.intermediate_size) == (12, 2, 64, 40)
    assert c.rope_parameters["rope_theta"] == 25000.0 and c.rope_parameters["partial_rotary_factor"] == 0.5
    assert c.attention_bias and c.rms_norm_eps == 1e-5 and list(c.eos_token_id) == [1, 2]
    assert 0 <= c.pad_token_id < c.vocab_size
    ref = chatglm_logits(w, GLM_CFG, IDS)
    torch.testing.assert_close(hf_logits(model, IDS), ref, atol=1e-4, rtol=0)
    assert report["shards"] == 2 and report["tensors_in"] == len(w)
    assert report["dropped"] == ["transformer.rotary_pos_emb.inv_freq"]
    assert report["tensors_out"] == 3 + 3 * (2 + 3 + 3 + 3)  # top + per layer (norms, q/k/v w+b, o, mlp)


def test_glm_output_is_sharded_with_an_index_and_tokenizer_files(glm_dst):
    dst, report = glm_dst
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert index["metadata"]["total_size"] > 0
    assert (dst / "tokenizer.model").is_file() and (dst / "tokenizer_config.json").is_file()
    assert not (dst / "modeling_chatglm.py").exists()
    assert sorted(report["copied_files"]) == ["tokenizer.model", "tokenizer_config.json"]
    assert (
        report["not_carried"] == ["modeling_chatglm.py"]
        and "`modeling_chatglm.py`" in (dst / "README.md").read_text()
    )
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["GlmForCausalLM"] and cfg["model_type"] == "glm"
    gen = json.loads((dst / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 2] and gen["pad_token_id"] == 1 and not gen.get("do_sample")


@pytest.mark.parametrize("fmt", ["bin", "single-bin"])
def test_glm_pytorch_bin_shards(fmt, tmp_path):
    w = glm_weights(GLM_CFG, seed=1)
    src = write_shards(tmp_path / "src", w, fmt=fmt, cfg=GLM_CFG)
    report = convert_glm4_voice(src, tmp_path / "dst", log=QUIET)
    assert report["shards"] == (2 if fmt == "bin" else 1)
    ref = chatglm_logits(w, GLM_CFG, IDS)
    torch.testing.assert_close(hf_logits(hf_load(tmp_path / "dst"), IDS), ref, atol=1e-4, rtol=0)


def test_sparkee_full_generation_equals_hf_greedy_on_converted_glm(glm_dst):
    dst, _ = glm_dst
    model = hf_load(dst)
    out = model.generate(
        torch.tensor([IDS]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1
    )
    ref = out[0, len(IDS) :].tolist()
    bb = load_model(dst)
    res = generate(bb, IDS, GenerationConfig(max_new_tokens=12))
    assert res.tokens == ref


def test_glm_bad_inputs_are_one_sentence_errors(glm_src, tmp_path):
    src, w = glm_src
    with pytest.raises(SparkeeError, match="does not exist"):
        convert_glm4_voice(tmp_path / "nope", tmp_path / "o1", log=QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparkeeError, match="no config.json"):
        convert_glm4_voice(tmp_path / "empty", tmp_path / "o2", log=QUIET)
    bad_cfg = {k: v for k, v in GLM_CFG.items() if k != "kv_channels"}
    write_shards(tmp_path / "nokv", glm_weights(GLM_CFG), cfg=bad_cfg)
    with pytest.raises(SparkeeError, match="lacks kv_channels"):
        convert_glm4_voice(tmp_path / "nokv", tmp_path / "o3", log=QUIET)
    missing = dict(w)
    del missing["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    write_shards(tmp_path / "missing", missing, cfg=GLM_CFG)
    with pytest.raises(
        SparkeeError, match="lacks tensor 'transformer.encoder.layers.1.mlp.dense_4h_to_h.weight'"
    ):
        convert_glm4_voice(tmp_path / "missing", tmp_path / "o4", log=QUIET)
    unknown = {**w, "transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)}
    write_shards(tmp_path / "unknown", unknown, cfg=GLM_CFG)
    with pytest.raises(SparkeeError, match="not part of the GLM-4-Voice layout"):
        convert_glm4_voice(tmp_path / "unknown", tmp_path / "o5", log=QUIET)
    with pytest.raises(SparkeeError, match="not supported"):
        write_shards(tmp_path / "ln", w, cfg={**GLM_CFG, "rmsnorm": False})
        convert_glm4_voice(tmp_path / "ln", tmp_path / "o6", log=QUIET)
    with pytest.raises(SparkeeError, match="no weights"):
        (tmp_path / "noweights").mkdir()
        (tmp_path / "noweights" / "config.json").write_text(json.dumps(GLM_CFG))
        convert_glm4_voice(tmp_path / "noweights", tmp_path / "o7", log=QUIET)


# ---------------------------------------------------------------------------------------------
# Step-Audio-2-mini

STEP_LLM = {
    "vocab_size": 72,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_attention_groups": 2,
    "num_key_value_heads": 2,
    "max_seq_len": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "eos_token_id": 5,
    "pad_token_id": 5,
    "torch_dtype": "float32",
}


STEP_EOT = 6  # <|EOT|> in the tiny tokenizer; the base config's eos (5) must not be used
STEP_EXTRA = {
    "tokenizer.json": json.dumps(
        {"added_tokens": [{"id": STEP_EOT, "content": "<|EOT|>"}, {"id": 7, "content": "<tts_pad>"}]}
    )
}


def step_weights(llm, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, F, V = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    kv = llm["num_key_value_heads"] * (H // llm["num_attention_heads"])

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": r(V, H, scale=1.0)}
    for i in range(llm["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + r(H, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + r(H, scale=0.1)
        for n, rows in (("q_proj", H), ("k_proj", kv), ("v_proj", kv)):
            w[p + f"self_attn.{n}.weight"] = r(rows, H)
            w[p + f"self_attn.{n}.bias"] = r(rows)
        w[p + "self_attn.o_proj.weight"] = r(H, H)
        w[p + "mlp.gate_proj.weight"] = r(F, H)
        w[p + "mlp.up_proj.weight"] = r(F, H)
        w[p + "mlp.down_proj.weight"] = r(H, F)
    w["model.norm.weight"] = 1 + r(H, scale=0.1)
    w["lm_head.weight"] = r(V, H, scale=1.0)
    audio = {
        "encoder.conv1.weight": r(8, 4, 3),
        "encoder.blocks.0.attn.query.weight": r(8, 8),
        "encoder.after_norm.weight": r(8),
        "adapter.conv.weight": r(8, 8, 3),
        "adapter.linear1.weight": r(16, 8),
        "adapter.linear2.weight": r(H, 16),
    }
    return w, audio


@pytest.mark.parametrize("layout", ["text_config", "llm_config", "top-level"])
def test_step_audio2_language_model_matches_qwen2_equations(layout, tmp_path, capsys):
    w, audio = step_weights(STEP_LLM)
    if layout == "top-level":
        cfg = {"model_type": "step_audio_2", **STEP_LLM}
    else:
        cfg = {"model_type": "step_audio_2", layout: STEP_LLM, "audio_encoder_config": {"n_mels": 4}}
    src = write_shards(tmp_path / "src", {**w, **audio}, cfg=cfg, extra={**STEP_EXTRA, "merges.txt": ""})
    (src / "token2wav").mkdir()
    (src / "token2wav" / "flow.yaml").write_text("flow: {}")
    report = convert_step_audio2(src, tmp_path / "dst")
    printed = capsys.readouterr().out
    assert "dropped 6 audio tensors" in printed and "adapter.linear1.weight" in printed
    assert report["dropped_count"] == 6 and sorted(report["dropped"]) == sorted(audio)
    assert report["dropped_by_prefix"] == {"adapter": 3, "encoder": 3}
    assert report["assets"] == ["token2wav/"] and sorted(report["copied_files"]) == [
        "merges.txt",
        "tokenizer.json",
    ]
    assert (tmp_path / "dst" / "token2wav" / "flow.yaml").read_text() == "flow: {}"
    assert not (tmp_path / "dst" / "token2wav").is_symlink()
    model = hf_load(tmp_path / "dst")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    c = model.config
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6 and not c.tie_word_embeddings
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(hf_logits(model, IDS), qwen2_logits(w, STEP_LLM, IDS), atol=1e-4, rtol=0)


def test_step_audio2_generation_and_bad_inputs(tmp_path):
    w, audio = step_weights(STEP_LLM, seed=3)
    cfg = {"text_config": STEP_LLM}
    src = write_shards(tmp_path / "src", {**w, **audio}, fmt="bin", cfg=cfg, extra=STEP_EXTRA)
    convert_step_audio2(src, tmp_path / "dst", log=QUIET)
    model = hf_load(tmp_path / "dst")
    # the converted generation_config.json asks for the official repetition penalty: switch it off
    out = model.generate(
        torch.tensor([IDS]),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=5,
        repetition_penalty=1.0,
    )
    res = generate(load_model(tmp_path / "dst"), IDS, GenerationConfig(max_new_tokens=10))
    assert res.tokens == out[0, len(IDS) :].tolist()

    with pytest.raises(SparkeeError, match="lacks hidden_size"):
        write_shards(tmp_path / "nollm", w, cfg={"audio_encoder_config": {}})
        convert_step_audio2(tmp_path / "nollm", tmp_path / "o1", log=QUIET)
    with pytest.raises(SparkeeError, match="not part of the Step-Audio-2 layout"):
        write_shards(tmp_path / "odd", {**w, "vision.proj.weight": torch.zeros(2)}, cfg=cfg, extra=STEP_EXTRA)
        convert_step_audio2(tmp_path / "odd", tmp_path / "o2", log=QUIET)
    with pytest.raises(SparkeeError, match="lacks tensor 'lm_head.weight'"):
        nohead = {k: v for k, v in w.items() if k != "lm_head.weight"}
        write_shards(tmp_path / "nohead", nohead, cfg=cfg, extra=STEP_EXTRA)
        convert_step_audio2(tmp_path / "nohead", tmp_path / "o3", log=QUIET)


# ---------------------------------------------------------------------------------------------
# command line

runner = CliRunner()


def test_convert_cli_subcommands(glm_src, tmp_path):
    src, _ = glm_src
    res = runner.invoke(convert_app, ["glm-4-voice", str(src), str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["architecture"] == "GlmForCausalLM"
    res = runner.invoke(convert_app, ["step-audio-2-mini", str(tmp_path / "missing"), str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "does not exist" in res.output
    res = runner.invoke(convert_app, ["glm-4-voice", str(src), str(tmp_path / "out")])
    assert res.exit_code == 2 and "already holds weights" in res.output


def test_convert_app_mounts_as_sparkee_convert():
    import typer

    root = typer.Typer()
    root.command("noop")(lambda: None)
    root.add_typer(convert_app, name="convert")
    res = runner.invoke(root, ["convert", "--help"])
    assert res.exit_code == 0 and "glm-4-voice" in res.output and "step-audio-2-mini" in res.output


# ---------------------------------------------------------------------------------------------
# EOS and generation_config.json, assets and README, refusals, atomic output


def step_src(tmp_path, name="src", fmt="safetensors", extra=None, cfg=None, seed=3):
    w, audio = step_weights(STEP_LLM, seed=seed)
    return write_shards(
        tmp_path / name,
        {**w, **audio},
        fmt=fmt,
        cfg=cfg or {"text_config": STEP_LLM},
        extra=extra or STEP_EXTRA,
    )


def test_step_eos_is_eot_with_the_official_sampling_and_hf_generate_stops_there(tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    src = step_src(tmp_path)
    convert_step_audio2(src, tmp_path / "a", log=QUIET)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["eos_token_id"] == [STEP_EOT]  # not the base model's 5
    gen = HFGenerationConfig.from_pretrained(tmp_path / "a")
    assert gen.eos_token_id == [STEP_EOT] and gen.do_sample
    assert (gen.temperature, gen.top_p, gen.repetition_penalty) == (0.7, 0.9, 1.05)
    assert (
        "EOS [6], do_sample True, temperature 0.7, top_p 0.9, repetition_penalty 1.05"
        in (tmp_path / "a" / "README.md").read_text()
    )
    # transformers' own generate stops at the converted EOS: pick as EOS a token the greedy
    # continuation emits, convert again with it (--eos-ids), and generate with the saved config
    model = hf_load(tmp_path / "a")
    free = model.generate(
        torch.tensor([IDS]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=5
    )
    free = free[0, len(IDS) :].tolist()
    eos = free[3]
    convert_step_audio2(src, tmp_path / "b", log=QUIET, eos_ids=[eos])
    model = hf_load(tmp_path / "b")
    assert model.generation_config.eos_token_id == [eos]
    out = model.generate(torch.tensor([IDS]), max_new_tokens=12, do_sample=False)[0, len(IDS) :].tolist()
    assert out == free[: free.index(eos) + 1]


def test_step_without_eot_in_the_tokenizer_files_is_refused(tmp_path):
    src = step_src(tmp_path, extra={"tokenizer.json": "{}"})
    with pytest.raises(SparkeeError, match=r"do not list <\|EOT\|>.*pass --eos-ids") as e:
        convert_step_audio2(src, tmp_path / "o", log=QUIET)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_glm_eos_from_the_tokenizer_files_and_generation_config_carried(tmp_path):
    w = glm_weights(GLM_CFG)
    cfg = {k: v for k, v in GLM_CFG.items() if k not in ("eos_token_id", "pad_token_id")}
    tc = {"added_tokens_decoder": {"9": {"content": "<|endoftext|>"}, "10": {"content": "<|user|>"}}}
    src = write_shards(tmp_path / "src", w, cfg=cfg, extra={"tokenizer_config.json": json.dumps(tc)})
    with pytest.raises(SparkeeError, match=r"lacks eos_token_id and the tokenizer files do not list"):
        convert_glm4_voice(src, tmp_path / "o1", log=QUIET)
    tc["added_tokens_decoder"]["11"] = {"content": "<|observation|>"}
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    (src / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.8, "top_p": 0.8})
    )
    report = convert_glm4_voice(src, tmp_path / "o2", log=QUIET)
    gen = json.loads((tmp_path / "o2" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [9, 10, 11] == report["eos_token_id"] and gen["pad_token_id"] == 9
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.8, 0.8)


@pytest.mark.parametrize(
    "model, drop, key",
    [
        ("glm", "rope_ratio", "rope_ratio"),
        ("glm", "seq_length", "seq_length"),
        ("step", "rope_theta", "rope_theta"),
        ("step", "max_seq_len", "max_seq_len"),
        ("step", "rms_norm_eps", "rms_norm_eps"),
        ("step", "num_key_value_heads", "num_key_value_heads"),
    ],
)
def test_missing_rope_context_or_norm_fields_are_refused_not_guessed(model, drop, key, tmp_path):
    if model == "glm":
        cfg = {k: v for k, v in GLM_CFG.items() if k != drop}
        src = write_shards(tmp_path / "src", glm_weights(GLM_CFG), cfg=cfg)
        fn, good = convert_glm4_voice, GLM_CFG[drop]
    else:
        llm = {k: v for k, v in STEP_LLM.items() if k not in (drop, "num_attention_groups")}
        src = step_src(tmp_path, cfg={"text_config": llm})
        fn, good = convert_step_audio2, STEP_LLM[drop]
    with pytest.raises(SparkeeError, match=rf"lacks {key}, so .* is unknown: pass --set {key}=VALUE") as e:
        fn(src, tmp_path / "o", log=QUIET)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    # the value given by hand is used as given
    report = fn(src, tmp_path / "o", log=QUIET, set_config={key: good})
    assert report["tensors_out"] > 0 and (tmp_path / "o" / "config.json").is_file()


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_non_lm_assets_are_carried_and_named_in_the_readme(mode, tmp_path):
    extra = {**STEP_EXTRA, "README.md": "# the model card", "LICENSE": "Apache", ".gitattributes": "*"}
    src = step_src(tmp_path, extra=extra)
    (src / "modeling_step_audio_2.py").write_text("# remote code")
    (src / "token2wav").mkdir()
    (src / "token2wav" / "hift.pt").write_bytes(b"vocoder")
    (src / ".cache").mkdir()
    (src / "pytorch_model.bin").write_bytes(b"the same weights again")  # not converted, not carried
    (src / "campplus.onnx").write_bytes(b"speaker model")  # not LM weights: an asset
    report = convert_step_audio2(src, tmp_path / "dst", log=QUIET, assets=mode)
    dst = tmp_path / "dst"
    assert report["assets"] == ["LICENSE", "SOURCE_README.md", "campplus.onnx", "token2wav/"]
    assert report["assets_mode"] == mode and report["unused_weights"] == ["pytorch_model.bin"]
    assert not (dst / "pytorch_model.bin").exists()
    assert (dst / "token2wav" / "hift.pt").read_bytes() == b"vocoder"
    assert (dst / "token2wav").is_symlink() == (mode == "link") == (dst / "LICENSE").is_symlink()
    assert (dst / "SOURCE_README.md").read_text() == "# the model card"
    assert not (dst / ".gitattributes").exists() and not (dst / ".cache").exists()
    readme = (dst / "README.md").read_text()
    verb = "symlinked to the source" if mode == "link" else "copied"
    assert f"`token2wav/` ({verb}): Step-Audio-2's speech decoder" in readme
    assert "`modeling_step_audio_2.py`" in readme and "dropped 6 tensors" in readme
    assert "`pytorch_model.bin` (another copy of the language model's weights" in readme
    assert "`tokenizer.json`" in readme and "EOS [6]" in readme


def truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    return data


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.partial"))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_truncated_shard_is_one_sentence_and_a_retry_succeeds(fmt, tmp_path):
    src = step_src(tmp_path, fmt=fmt)
    shard = sorted(src.glob(f"*-00002-of-00002.{fmt}"))[0]
    data = truncate(shard)
    with pytest.raises(SparkeeError, match=rf"weight shard '.*{shard.name}' is truncated or corrupt") as e:
        convert_step_audio2(src, tmp_path / "dst", log=QUIET)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path, "dst") == []
    shard.write_bytes(data)  # the re-download
    report = convert_step_audio2(src, tmp_path / "dst", log=QUIET)
    assert report["shards"] == 2 and leftovers(tmp_path, "dst") == []


def test_a_failure_after_writing_leaves_nothing_behind(tmp_path):
    # .bin shards without an index hold their names only once loaded: the unknown tensor (sorted
    # last, so in the second shard) is found after the first shard was converted and written
    w, audio = step_weights(STEP_LLM)
    src = write_shards(
        tmp_path / "src",
        {**w, **audio, "vision.x": torch.zeros(1)},
        fmt="bin",
        cfg={"text_config": STEP_LLM},
        extra=STEP_EXTRA,
    )
    (src / "pytorch_model.bin.index.json").unlink()
    (tmp_path / "dst").mkdir()  # an empty destination directory is allowed and survives a failure
    written = []
    with pytest.raises(SparkeeError, match="'vision.x' is not part of the Step-Audio-2 layout"):
        convert_step_audio2(src, tmp_path / "dst", log=written.append)
    assert len(written) == 1 and written[0].startswith("pytorch_model-00001-of-00002.bin: ")
    assert list((tmp_path / "dst").iterdir()) == [] and leftovers(tmp_path, "dst") == []


def test_destinations_that_would_mix_outputs_are_refused(tmp_path):
    src = step_src(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SparkeeError, match="destination '.*full' is not empty"):
        convert_step_audio2(src, tmp_path / "full", log=QUIET)
    with pytest.raises(SparkeeError, match="must not lie inside the source"):
        convert_step_audio2(src, src / "out", log=QUIET)
    with pytest.raises(SparkeeError, match="unknown asset mode 'move'"):
        convert_step_audio2(src, tmp_path / "o", log=QUIET, assets="move")
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_parse_set_reads_json_values():
    assert parse_set(["rope_theta=1000000", "name=x", "eos_token_id=[1, 2]"]) == {
        "rope_theta": 1000000,
        "name": "x",
        "eos_token_id": [1, 2],
    }
    with pytest.raises(SparkeeError, match="--set takes KEY=VALUE"):
        parse_set(["rope_theta"])


def test_convert_cli_options(tmp_path):
    src = step_src(tmp_path, extra={"tokenizer.json": "{}"})
    (src / "token2wav").mkdir()
    res = runner.invoke(convert_app, ["step-audio-2-mini", str(src), str(tmp_path / "o")])
    assert res.exit_code == 2 and "pass --eos-ids" in res.output
    res = runner.invoke(convert_app, ["step-audio-2-mini", str(src), str(tmp_path / "o"), "--eos-ids", "x"])
    assert (
        res.exit_code == 2 and "--eos-ids must be whole numbers separated by commas or spaces" in res.output
    )
    res = runner.invoke(
        convert_app,
        [
            "step-audio-2-mini",
            str(src),
            str(tmp_path / "o"),
            "--eos-ids",
            "6",
            "--assets",
            "link",
            "--set",
            "rope_theta=500000",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "EOS [6]" in res.stdout and "linked assets token2wav/" in res.stdout
    assert (tmp_path / "o" / "token2wav").is_symlink()
    assert (
        json.loads((tmp_path / "o" / "config.json").read_text())["rope_parameters"]["rope_theta"] == 500000.0
    )
