"""Checkpoint converters: GLM-4-Voice (ChatGLM layout) and Step-Audio-2-mini to transformers layouts.

Both work shard by shard: read one input shard, rename / split its tensors, write one output
shard, and finally write a new `model.safetensors.index.json`. Only one input shard and its
converted copy are in memory at a time, so GLM-4-Voice-9B (about 19 GB in bf16, 10 shards)
converts well within 24 GiB of RAM. Tensors keep their stored dtype.

- GLM-4-Voice -> `GlmForCausalLM` (transformers' `GlmConfig`, not Glm4). The maths match:
  ChatGLM's fused `query_key_value` rows are [q (heads x kv_channels), k (groups x kv_channels),
  v (groups x kv_channels)], split into q/k/v_proj (weight and bias); ChatGLM's
  `dense_h_to_4h` rows are [gate; up] with `silu(x[0]) * x[1]`, which is exactly GlmMLP's
  `gate_up_proj` followed by `gate, up = chunk(2)` and `up * silu(gate)`, so it is copied as is;
  ChatGLM's rotary rotates interleaved pairs (x[2i], x[2i+1]) of the first half of each head
  with inv_freq = 1 / base^(2i / (kv_channels / 2)), base = 10000 x rope_ratio, and so does
  transformers' Glm (`partial_rotary_factor` 0.5, `repeat_interleave` cos/sin, pairwise
  `rotate_half`). tests/test_convert.py checks this against an independent forward.
- Step-Audio-2-mini -> `Qwen2ForCausalLM`: `model.*` and `lm_head.*` are kept, the audio
  `encoder.*` and `adapter.*` tensors are dropped (their names are in the report).

Files that are not weights, weight indexes or model configs (the tokenizer files) are copied.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import SparkeeError

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# not copied: weights, indexes, the model's own configs and remote modelling code
SKIP_FILES = re.compile(
    r"(.*\.index\.json|config\.json|generation_config\.json|configuration_.*\.py|modeling_.*\.py)$"
)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# reading and writing shards


class ShardReader:
    """The weight shards of a checkpoint directory, in order, one at a time.

    Understands `model.safetensors.index.json` + shards, a single `model.safetensors` (or any
    single `*.safetensors`), `pytorch_model.bin.index.json` + shards and a single
    `pytorch_model.bin`; `.bin` files are read with `torch.load(weights_only=True)`.
    """

    def __init__(self, src: Path) -> None:
        self.src = src
        self.files, self.key_names = self._find()

    def _find(self) -> tuple[list[Path], list[str] | None]:
        src = self.src
        for index in (INDEX_NAME, "pytorch_model.bin.index.json"):
            p = src / index
            if p.is_file():
                try:
                    weight_map = json.loads(p.read_text())["weight_map"]
                except (ValueError, KeyError):
                    raise SparkeeError(f"weight index '{p}' is not valid JSON with a weight_map") from None
                files = sorted({src / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise SparkeeError(f"weight index '{p}' names shard '{missing[0]}', which is missing")
                return files, sorted(weight_map)
        st = sorted(src.glob("*.safetensors"))
        if st:
            from safetensors import safe_open

            names: list[str] = []
            for f in st:
                with safe_open(str(f), "pt") as h:
                    names.extend(h.keys())
            return st, sorted(names)
        bins = sorted(src.glob("pytorch_model*.bin"))
        if bins:
            return bins, None  # names known only after loading
        raise SparkeeError(
            f"'{src}' holds no weights: expected model.safetensors(.index.json) or pytorch_model*.bin"
        )

    def shards(self) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
        for f in self.files:
            yield f, self.load(f)

    @staticmethod
    def load(f: Path) -> dict[str, torch.Tensor]:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            return torch.load(f, map_location="cpu", weights_only=True)


class ShardWriter:
    """Writes `model-0000i-of-0000n.safetensors` shards and, on `close`, the index."""

    def __init__(self, dst: Path, num_shards: int) -> None:
        self.dst = dst
        self.n = num_shards
        self.i = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.i += 1
        name = f"model-{self.i:05d}-of-{self.n:05d}.safetensors"
        if tensors:
            out = {k: v.contiguous() for k, v in tensors.items()}
            save_file(out, str(self.dst / name), metadata={"format": "pt"})
            for k, v in out.items():
                self.weight_map[k] = name
                self.total_size += v.numel() * v.element_size()

    def close(self) -> None:
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def read_config(src: Path) -> dict:
    if not src.is_dir():
        raise SparkeeError(f"source checkpoint directory '{src}' does not exist")
    p = src / "config.json"
    if not p.is_file():
        raise SparkeeError(f"source checkpoint '{src}' has no config.json")
    try:
        cfg = json.loads(p.read_text())
    except ValueError:
        raise SparkeeError(f"config.json in '{src}' is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise SparkeeError(f"config.json in '{src}' is not a JSON object")
    return cfg


def prepare_dst(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise SparkeeError("the destination must differ from the source directory")
    if dst.exists() and not dst.is_dir():
        raise SparkeeError(f"destination '{dst}' exists and is not a directory")
    if dst.is_dir() and any(dst.glob("*.safetensors")):
        raise SparkeeError(f"destination '{dst}' already holds weights: choose an empty directory")
    dst.mkdir(parents=True, exist_ok=True)


def copy_tokenizer_files(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """Copy every plain file that is not a weight, index or model config; return (copied, skipped)."""
    copied, skipped = [], []
    for f in sorted(src.iterdir()):
        if f.is_dir():
            skipped.append(f.name + "/")  # e.g. Step-Audio-2's token2wav/ vocoder
        elif f.suffix in WEIGHT_SUFFIXES or SKIP_FILES.fullmatch(f.name):
            continue
        else:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied, skipped


def _require(cfg: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise SparkeeError(f"the {what} config lacks {', '.join(missing)}, so it is not a {what} checkpoint")


def _eos_list(value, default: list[int]) -> list[int]:
    if value is None:
        return list(default)
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _check_names(names, expected: set[str], dropped: set[str], model: str) -> None:
    names = set(names)
    unknown = sorted(names - expected - dropped)
    if unknown:
        raise SparkeeError(f"tensor '{unknown[0]}' is not part of the {model} layout this converter knows")
    missing = sorted(expected - names)
    if missing:
        raise SparkeeError(
            f"the {model} checkpoint lacks tensor '{missing[0]}' ({len(missing)} missing in all)"
        )


def _convert(
    src: Path,
    dst: Path,
    model: str,
    config,
    mapping: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None],
    expected_in: set[str],
    is_dropped: Callable[[str], bool],
    log: Log,
) -> dict:
    """Shared loop: validate names, map shard by shard, write config, index and tokenizer files."""
    reader = ShardReader(src)
    if reader.key_names is not None:
        _check_names(reader.key_names, expected_in, {k for k in reader.key_names if is_dropped(k)}, model)
    prepare_dst(src, dst)
    writer = ShardWriter(dst, len(reader.files))
    seen: list[str] = []
    dropped: list[str] = []
    n_out = 0
    for f, tensors in reader.shards():
        out: dict[str, torch.Tensor] = {}
        for name in list(tensors):
            t = tensors.pop(name)
            seen.append(name)
            mapped = mapping(name, t)
            if mapped is None:
                if not is_dropped(name):
                    raise SparkeeError(
                        f"tensor '{name}' is not part of the {model} layout this converter knows"
                    )
                dropped.append(name)
                continue
            out.update(mapped)
        writer.write(out)
        n_out += len(out)
        log(f"{f.name}: {len(out)} tensors written")
        del out, tensors
    if reader.key_names is None:  # .bin without index: names known only now
        _check_names(seen, expected_in, set(dropped), model)
    writer.close()
    config.save_pretrained(dst)
    copied, skipped = copy_tokenizer_files(src, dst)
    return {
        "model": model,
        "src": str(src),
        "dst": str(dst),
        "architecture": config.architectures[0],
        "shards": len(reader.files),
        "tensors_in": len(seen),
        "tensors_out": n_out,
        "dropped": dropped,
        "copied_files": copied,
        "skipped": skipped,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    }


# ---------------------------------------------------------------------------------------------
# GLM-4-Voice (ChatGLM layout) -> GlmForCausalLM

GLM_CONFIG_KEYS = (
    "num_layers",
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "layernorm_epsilon",
)
GLM_DEFAULT_EOS = [151329, 151336, 151338]  # <|endoftext|>, <|user|>, <|observation|>


def glm_config_from_chatglm(cfg: dict):
    """A transformers `GlmConfig` equivalent to a ChatGLM config.json (GLM-4 family)."""
    from transformers import GlmConfig

    _require(cfg, GLM_CONFIG_KEYS, "ChatGLM")
    unsupported = [
        ("rmsnorm", False),
        ("add_bias_linear", True),
        ("apply_residual_connection_post_layernorm", True),
        ("post_layer_norm", False),
        ("original_rope", False),
    ]
    for key, bad in unsupported:
        if key in cfg and bool(cfg[key]) == bad:
            raise SparkeeError(
                f"ChatGLM option {key}={cfg[key]} is not supported: GlmForCausalLM has no such variant"
            )
    heads = int(cfg["num_attention_heads"])
    if cfg.get("multi_query_attention", True):
        _require(cfg, ("multi_query_group_num",), "ChatGLM")
        groups = int(cfg["multi_query_group_num"])
    else:
        groups = heads
    vocab = int(cfg["padded_vocab_size"])
    eos = _eos_list(cfg.get("eos_token_id"), GLM_DEFAULT_EOS)
    pad = cfg.get("pad_token_id")
    if pad is None or not 0 <= int(pad) < vocab:
        pad = eos[0] if eos and eos[0] < vocab else 0
    c = GlmConfig(
        vocab_size=vocab,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["ffn_hidden_size"]),
        num_hidden_layers=int(cfg["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=int(cfg["kv_channels"]),
        rms_norm_eps=float(cfg["layernorm_epsilon"]),
        max_position_embeddings=int(cfg.get("seq_length", 8192)),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * float(cfg.get("rope_ratio", 1.0)),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(cfg.get("add_qkv_bias", True)),
        pad_token_id=int(pad),
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    c.architectures = ["GlmForCausalLM"]
    if cfg.get("torch_dtype"):
        c.dtype = cfg["torch_dtype"]
    return c


_GLM_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_GLM_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up] in both layouts
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLM_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def glm_expected_names(num_layers: int, qkv_bias: bool) -> set[str]:
    names = set(_GLM_TOP)
    per = [*_GLM_LAYER_MAP, "self_attention.query_key_value.weight"]
    if qkv_bias:
        per.append("self_attention.query_key_value.bias")
    for i in range(num_layers):
        names.update(f"transformer.encoder.layers.{i}.{p}" for p in per)
    return names


def glm_tensor_map(config) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    def mapping(name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if name in _GLM_TOP:
            return {_GLM_TOP[name]: t}
        m = _GLM_LAYER.fullmatch(name)
        if not m:
            return None
        i, rest = m.groups()
        pre = f"model.layers.{i}."
        if rest in _GLM_LAYER_MAP:
            return {pre + _GLM_LAYER_MAP[rest]: t}
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if t.shape[0] != q + 2 * kv:
                raise SparkeeError(
                    f"tensor '{name}' has {t.shape[0]} rows, but the config implies {q} + 2 x {kv}"
                )
            qt, kt, vt = torch.split(t, [q, kv, kv], dim=0)
            return {
                pre + f"self_attn.q_proj.{kind}": qt.clone(),
                pre + f"self_attn.k_proj.{kind}": kt.clone(),
                pre + f"self_attn.v_proj.{kind}": vt.clone(),
            }
        return None

    return mapping


def convert_glm4_voice(src: str | Path, dst: str | Path, log: Log = print) -> dict:
    """Convert a GLM-4-Voice (ChatGLM-layout) checkpoint to a `GlmForCausalLM` directory.

    Returns a report: shards, tensors in/out, dropped tensors (the stored rotary `inv_freq`,
    which transformers recomputes), copied tokenizer files and skipped sub-directories.
    """
    src, dst = Path(src), Path(dst)
    raw = read_config(src)
    config = glm_config_from_chatglm(raw)
    expected = glm_expected_names(config.num_hidden_layers, config.attention_bias)

    def is_dropped(name: str) -> bool:
        return name.endswith("rotary_pos_emb.inv_freq")

    report = _convert(src, dst, "GLM-4-Voice", config, glm_tensor_map(config), expected, is_dropped, log)
    report["rope_theta"] = config.rope_parameters["rope_theta"]
    return report


# ---------------------------------------------------------------------------------------------
# Step-Audio-2-mini -> Qwen2ForCausalLM

STEP_LLM_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def step_llm_config(cfg: dict) -> dict:
    """The language-model fields: under `text_config` / `llm_config` (top-level values fill gaps), or at top level."""
    for key in ("text_config", "llm_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and sub:
            return {**{k: v for k, v in cfg.items() if not isinstance(v, dict)}, **sub}
    return cfg


def qwen2_config_from_step(cfg: dict):
    from transformers import Qwen2Config

    llm = step_llm_config(cfg)
    _require(llm, STEP_LLM_KEYS, "Step-Audio-2 language-model")
    heads = int(llm["num_attention_heads"])
    kv = int(llm.get("num_key_value_heads") or llm.get("num_attention_groups") or heads)
    theta = llm.get("rope_theta")
    if theta is None and isinstance(llm.get("rope_parameters"), dict):
        theta = llm["rope_parameters"].get("rope_theta")
    vocab = int(llm["vocab_size"])
    eos = _eos_list(llm.get("eos_token_id", cfg.get("eos_token_id")), [151643])
    pad = llm.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None or not 0 <= int(pad) < vocab:
        pad = eos[0]
    c = Qwen2Config(
        vocab_size=vocab,
        hidden_size=int(llm["hidden_size"]),
        intermediate_size=int(llm["intermediate_size"]),
        num_hidden_layers=int(llm["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        hidden_act=llm.get("hidden_act", "silu"),
        max_position_embeddings=int(llm.get("max_position_embeddings") or llm.get("max_seq_len") or 16384),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(theta if theta is not None else 1e6)},
        tie_word_embeddings=False,
        use_sliding_window=False,
        eos_token_id=eos,
        pad_token_id=int(pad),
    )
    c.architectures = ["Qwen2ForCausalLM"]
    dtype = llm.get("torch_dtype") or cfg.get("torch_dtype")
    if dtype:
        c.dtype = dtype
    return c


def qwen2_expected_names(num_layers: int) -> set[str]:
    per = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(num_layers):
        names.update(f"model.layers.{i}.{p}" for p in per)
    return names


AUDIO_PREFIXES = ("encoder.", "adapter.")


def convert_step_audio2(src: str | Path, dst: str | Path, log: Log = print) -> dict:
    """Convert Step-Audio-2-mini's language model to a `Qwen2ForCausalLM` directory.

    The audio encoder (`encoder.*`) and adapter (`adapter.*`) are dropped: the report lists
    their names under `dropped` (count under `dropped_count`), and one line says how many.
    """
    src, dst = Path(src), Path(dst)
    raw = read_config(src)
    config = qwen2_config_from_step(raw)
    expected = qwen2_expected_names(config.num_hidden_layers)

    def mapping(name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return {name: t} if name in expected else None

    def is_dropped(name: str) -> bool:
        return name.startswith(AUDIO_PREFIXES) or name.endswith("rotary_emb.inv_freq")

    report = _convert(src, dst, "Step-Audio-2", config, mapping, expected, is_dropped, log)
    report["dropped_count"] = len(report["dropped"])
    groups: dict[str, int] = {}
    for name in report["dropped"]:
        groups[name.split(".", 1)[0]] = groups.get(name.split(".", 1)[0], 0) + 1
    report["dropped_by_prefix"] = groups
    log(
        f"dropped {report['dropped_count']} audio tensors "
        f"({', '.join(f'{k}.*: {v}' for k, v in sorted(groups.items())) or 'none'}): "
        + ", ".join(report["dropped"])
    )
    return report


# ---------------------------------------------------------------------------------------------
# token ids from tokenizer files (no tokenizer library needed)


def read_json(p: Path) -> dict | list | None:
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def find_token_ids(model_dir: Path, tokens: list[str]) -> dict[str, int]:
    """Ids of `tokens` as listed by `tokenizer_config.json` ("added_tokens_decoder"),
    `tokenizer.json` ("added_tokens" and the model vocab) or `added_tokens.json`; absent ones are left out."""
    want = set(tokens)
    found: dict[str, int] = {}
    tc = read_json(model_dir / "tokenizer_config.json")
    if isinstance(tc, dict) and isinstance(tc.get("added_tokens_decoder"), dict):
        for i, entry in tc["added_tokens_decoder"].items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content in want:
                found.setdefault(content, int(i))
    tj = read_json(model_dir / "tokenizer.json")
    if isinstance(tj, dict):
        for entry in tj.get("added_tokens") or []:
            if isinstance(entry, dict) and entry.get("content") in want:
                found.setdefault(entry["content"], int(entry["id"]))
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            for t in want - set(found):
                if t in vocab:
                    found[t] = int(vocab[t])
    at = read_json(model_dir / "added_tokens.json")
    if isinstance(at, dict):
        for t in want - set(found):
            if t in at:
                found[t] = int(at[t])
    return found


def tokenizer_id(tokenizer, token: str, default: int) -> int:
    """The tokenizer's id for a special token when it knows it, else `default`."""
    conv = getattr(tokenizer, "convert_tokens_to_ids", None)
    if conv is not None:
        try:
            i = conv(token)
        except (KeyError, ValueError, TypeError):
            i = None
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(i, int) and i >= 0 and i != unk:
            return i
    return default
