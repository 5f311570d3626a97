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

Nothing is guessed: a config that lacks the rotary base, the context length or another field
the layout needs is refused with one sentence naming the `set_config` key (`--set KEY=VALUE`)
that supplies it, and the EOS ids come from the config or the tokenizer files (Step-Audio-2:
`<|EOT|>`, not the base model's 151643) or `eos_ids`. Next to the weights and `config.json`
the output holds `generation_config.json` (EOS and, for Step-Audio-2, the official sampling),
the tokenizer files, the non-LM assets (sub-directories such as Step-Audio-2's `token2wav/`,
and other plain files) copied or symlinked, and a README.md naming each of them.

The output is written into a hidden temporary sibling of the destination and renamed into
place at the end; any failure (a truncated shard, a bad tensor, Ctrl-C) removes it, so a retry
starts clean. Shards are checked before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .. import hf
from ..errors import SparkeeError
from .tokens import find_token_ids

INDEX_NAME = "model.safetensors.index.json"
# the language model's weights in any of the usual names and formats (a download may hold the same
# weights twice, e.g. safetensors and .bin): never carried; other weight files (a vocoder's .pt) are assets
LM_WEIGHTS = re.compile(
    r"((model|pytorch_model|tf_model|flax_model|consolidated)([-.][^/]*)?\.(safetensors|bin|h5|msgpack|pt|pth)|.*\.gguf)$"
)
# the model's own configs, weight indexes and remote modelling code: replaced, not carried over
SKIP_FILES = re.compile(
    r"(.*\.index\.json|config\.json|generation_config\.json|configuration_.*\.py|modeling_.*\.py)$"
)
# tokenizer files (always copied: prompts and presets read them)
TOKENIZER_NAMES = re.compile(
    r"(tokenizer.*|vocab\.(json|txt)|merges\.txt|added_tokens\.json|special_tokens_map\.json|"
    r"chat_template\.(jinja|json)|tokenization_.*\.py|.*\.tiktoken)$"
)
ASSET_MODES = ("copy", "link")
# what we know of the assets the two models ship (for the output README)
KNOWN_ASSETS = {
    "token2wav": "Step-Audio-2's speech decoder (CosyVoice-2 flow + HiFT vocoder, speaker and speech "
    "tokenizer ONNX models), loaded by Step-Audio2's token2wav.py: `Token2wav('<this folder>/token2wav')`",
    "speech_tokenizer": "a speech tokenizer",
    "glm-4-voice-tokenizer": "GLM-4-Voice's whisper-VQ speech tokenizer (12.5 Hz)",
    "glm-4-voice-decoder": "GLM-4-Voice's speech decoder (flow + HiFT), loaded by GLM-4-Voice's flow_inference.py",
}

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# reading and writing shards


def check_shard(f: Path) -> None:
    """Refuse a truncated or corrupt shard before anything is written (safetensors: its header and
    size; torch zip files: the central directory at the end, which a cut-off download lacks)."""
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors alike
            raise SparkeeError(
                f"weight shard '{f}' is truncated or corrupt ({e}): download it again"
            ) from None
    elif f.suffix == ".bin":
        with open(f, "rb") as fh:
            head = fh.read(2)
        if head == b"PK" and not zipfile.is_zipfile(f):
            raise SparkeeError(
                f"weight shard '{f}' is truncated or corrupt (its zip directory is missing): download it again"
            )


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
                except (ValueError, KeyError, TypeError):
                    raise SparkeeError(f"weight index '{p}' is not valid JSON with a weight_map") from None
                files = sorted({src / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise SparkeeError(f"weight index '{p}' names shard '{missing[0]}', which is missing")
                for f in files:
                    check_shard(f)
                return files, sorted(weight_map)
        st = sorted(src.glob("*.safetensors"))
        if st:
            from safetensors import safe_open

            names: list[str] = []
            for f in st:
                check_shard(f)
                with safe_open(str(f), "pt") as h:
                    names.extend(h.keys())
            return st, sorted(names)
        bins = sorted(src.glob("pytorch_model*.bin"))
        if bins:
            for f in bins:
                check_shard(f)
            return bins, None  # names known only after loading
        raise SparkeeError(
            f"'{src}' holds no weights: expected model.safetensors(.index.json) or pytorch_model*.bin"
        )

    def shards(self) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
        for f in self.files:
            yield f, self.load(f)

    @staticmethod
    def load(f: Path) -> dict[str, torch.Tensor]:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(f))
            try:
                return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(f, map_location="cpu", weights_only=True)  # old (non-zip) serialisation
        except SparkeeError:
            raise
        except Exception as e:  # noqa: BLE001 - a shard that passed check_shard can still be cut inside
            raise SparkeeError(
                f"weight shard '{f}' is truncated or corrupt ({e}): download it again"
            ) from None


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


def check_dst(src: Path, dst: Path) -> None:
    """The destination must be new or an empty directory (nothing of a user's is overwritten)."""
    if dst.resolve() == src.resolve():
        raise SparkeeError("the destination must differ from the source directory")
    if dst.exists() and not dst.is_dir():
        raise SparkeeError(f"destination '{dst}' exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        what = "already holds weights" if any(dst.glob("*.safetensors")) else "is not empty"
        raise SparkeeError(f"destination '{dst}' {what}: choose a new or empty directory")
    if src.resolve() in dst.resolve().parents:
        raise SparkeeError("the destination must not lie inside the source directory")


def _staging_dir(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))


def _publish(tmp: Path, dst: Path) -> None:
    if dst.is_dir():
        dst.rmdir()  # empty (checked before): rename cannot replace a directory on every platform
    os.replace(tmp, dst)


def carry_files(
    src: Path, dst: Path, assets: str = "copy", converted: frozenset[str] = frozenset()
) -> dict[str, list[str]]:
    """Copy the tokenizer files; copy or symlink (`assets`) everything else that is not LM weights,
    configs or remote code: sub-directories (e.g. `token2wav/`) and other plain files. The source's
    own README.md is kept as SOURCE_README.md (ours takes its name). Hidden entries are skipped.
    LM weight files other than the `converted` ones (a second copy in another format) are listed
    under "unused_weights"; remote modelling code under "not_carried"."""
    if assets not in ASSET_MODES:
        raise SparkeeError(f"unknown asset mode '{assets}': use copy or link")
    out: dict[str, list[str]] = {"tokenizer": [], "assets": [], "not_carried": [], "unused_weights": []}
    for f in sorted(src.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            target = dst / f.name
            if assets == "link":
                os.symlink(f.resolve(), target, target_is_directory=True)
            else:
                shutil.copytree(f, target, symlinks=True)
            out["assets"].append(f.name + "/")
        elif LM_WEIGHTS.fullmatch(f.name) or SKIP_FILES.fullmatch(f.name):
            if f.name.startswith(("modeling_", "configuration_")):
                out["not_carried"].append(f.name)
            elif LM_WEIGHTS.fullmatch(f.name) and f.name not in converted:
                out["unused_weights"].append(f.name)
            continue
        elif TOKENIZER_NAMES.fullmatch(f.name):
            shutil.copy2(f, dst / f.name)
            out["tokenizer"].append(f.name)
        else:
            name = "SOURCE_README.md" if f.name == "README.md" else f.name
            if assets == "link":
                os.symlink(f.resolve(), dst / name)
            else:
                shutil.copy2(f, dst / name)
            out["assets"].append(name)
    return out


def write_generation_config(dst: Path, values: dict) -> None:
    """generation_config.json through transformers' own class (it validates the values)."""
    hf.write_generation_config(dst, values)


def write_readme(dst: Path, report: dict) -> None:
    lines = [
        f"# {report['model']} language model for sparkee",
        "",
        f"Converted by `sparkee convert` from `{report['src']}` to `{report['architecture']}` "
        f"({report['num_layers']} layers, vocabulary {report['vocab_size']}, {report['tensors_out']} tensors "
        f"in {report['shards']} shards). Load it with `sparkee.load_model(dir)` or transformers' "
        "`AutoModelForCausalLM.from_pretrained(dir)`; no remote code is needed.",
        "",
        "## Files",
        "",
        "- `config.json`, `model-*.safetensors`, `model.safetensors.index.json`: the language model.",
        f"- `generation_config.json`: EOS {report['eos_token_id']}"
        + (f", {report['sampling']}" if report.get("sampling") else "")
        + ".",
    ]
    if report["copied_files"]:
        lines.append(
            "- tokenizer files (copied): " + ", ".join(f"`{n}`" for n in report["copied_files"]) + "."
        )
    verb = "symlinked to the source" if report["assets_mode"] == "link" else "copied"
    for name in report["assets"]:
        role = KNOWN_ASSETS.get(name.rstrip("/"), "not part of the language model; carried as is")
        lines.append(f"- `{name}` ({verb}): {role}.")
    if report["not_carried"]:
        lines.append(
            "- not carried: "
            + ", ".join(f"`{n}`" for n in report["not_carried"])
            + " (the source's remote modelling code; the converted model is a plain transformers class)."
        )
    if report["unused_weights"]:
        lines.append(
            "- not carried: "
            + ", ".join(f"`{n}`" for n in report["unused_weights"])
            + " (another copy of the language model's weights; the converted shards came from the others)."
        )
    if report["dropped"]:
        groups: dict[str, int] = {}
        for n in report["dropped"]:
            groups[n.split(".", 1)[0]] = groups.get(n.split(".", 1)[0], 0) + 1
        lines.append(
            f"- dropped {len(report['dropped'])} tensors ("
            + ", ".join(f"`{k}.*`: {v}" for k, v in sorted(groups.items()))
            + "): not used by the language model (audio encoder and adapter, stored rotary tables)."
        )
    lines += [
        "",
        "Nothing here has run on the real weights inside sparkee's tests (tiny synthetic checkpoints only).",
        "",
    ]
    (dst / "README.md").write_text("\n".join(lines))


def _require(cfg: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise SparkeeError(f"the {what} config lacks {', '.join(missing)}, so it is not a {what} checkpoint")


def _checked_eos_and_pad(eos: list[int], pad, vocab: int) -> int:
    """Refuse EOS ids outside the vocabulary; the pad id: the config's when it is in range, else
    the first EOS id (the converted config needs one)."""
    bad = [e for e in eos if not 0 <= e < vocab]
    if bad:
        raise SparkeeError(f"EOS id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    return int(pad) if pad is not None and 0 <= int(pad) < vocab else eos[0]


def _eos_list(value) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def parse_set(items: list[str] | None) -> dict:
    """`KEY=VALUE` strings (VALUE read as JSON when it parses, else as a string) -> dict."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SparkeeError(f"--set takes KEY=VALUE, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


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
    generation: dict,
    assets: str,
) -> dict:
    """Shared loop: validate, map shard by shard into a staging directory, add config, generation
    config, tokenizer files, assets and README, then rename the staging directory to `dst`."""
    if assets not in ASSET_MODES:
        raise SparkeeError(f"unknown asset mode '{assets}': use copy or link")
    check_dst(src, dst)
    reader = ShardReader(src)
    if reader.key_names is not None:
        _check_names(reader.key_names, expected_in, {k for k in reader.key_names if is_dropped(k)}, model)
    tmp = _staging_dir(dst)
    try:
        writer = ShardWriter(tmp, len(reader.files))
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
        config.save_pretrained(tmp)
        write_generation_config(tmp, generation)
        carried = carry_files(src, tmp, assets, frozenset(f.name for f in reader.files))
        sampling = {
            k: generation[k]
            for k in ("do_sample", "temperature", "top_p", "repetition_penalty")
            if k in generation
        }
        report = {
            "model": model,
            "src": str(src),
            "dst": str(dst),
            "architecture": config.architectures[0],
            "shards": len(reader.files),
            "tensors_in": len(seen),
            "tensors_out": n_out,
            "dropped": dropped,
            "copied_files": carried["tokenizer"],
            "assets": carried["assets"],
            "assets_mode": assets,
            "not_carried": carried["not_carried"],
            "unused_weights": carried["unused_weights"],
            "num_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "eos_token_id": list(generation["eos_token_id"]),
            "sampling": ", ".join(f"{k} {v}" for k, v in sampling.items()),
        }
        write_readme(tmp, report)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


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
GLM_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # GLM-4's EOS list, in order


def _missing_field(what: str, key: str, why: str, hint: str) -> SparkeeError:
    return SparkeeError(
        f"the {what} config lacks {key}, so {why} is unknown: pass --set {key}=VALUE ({hint})"
    )


def glm_config_from_chatglm(cfg: dict, eos_ids: list[int] | None = None):
    """A transformers `GlmConfig` equivalent to a ChatGLM config.json (GLM-4 family).

    `eos_ids` stands in for a config without `eos_token_id` (else the tokenizer files are read by
    the caller); the rotary base (`rope_ratio`) and context length (`seq_length`) are never guessed."""
    _require(cfg, GLM_CONFIG_KEYS, "ChatGLM")
    if "rope_ratio" not in cfg:
        raise _missing_field(
            "ChatGLM",
            "rope_ratio",
            "the rotary base (10000 x rope_ratio)",
            "ChatGLM's configuration code defaults it to 1",
        )
    if "seq_length" not in cfg:
        raise _missing_field(
            "ChatGLM",
            "seq_length",
            "the context length",
            "ChatGLM's configuration code defaults it to 2048: check the model card",
        )
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
    eos = eos_ids if eos_ids is not None else _eos_list(cfg.get("eos_token_id"))
    if not eos:
        raise SparkeeError(
            "the ChatGLM config lacks eos_token_id and the tokenizer files do not list "
            f"{', '.join(GLM_EOS_TOKENS)}: pass --eos-ids with the model's EOS ids"
        )
    pad = _checked_eos_and_pad(eos, cfg.get("pad_token_id"), vocab)
    c = hf.make_config(
        "GlmForCausalLM",
        vocab_size=vocab,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["ffn_hidden_size"]),
        num_hidden_layers=int(cfg["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=int(cfg["kv_channels"]),
        rms_norm_eps=float(cfg["layernorm_epsilon"]),
        max_position_embeddings=int(cfg["seq_length"]),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * float(cfg["rope_ratio"]),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(cfg.get("add_qkv_bias", True)),
        pad_token_id=int(pad),
        eos_token_id=list(eos),
        tie_word_embeddings=False,
    )
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


def _with_set(cfg: dict, set_config: dict | None) -> dict:
    """The source config with `set_config` (the CLI's --set KEY=VALUE) filled in or overriding."""
    return {**cfg, **(set_config or {})}


def convert_glm4_voice(
    src: str | Path,
    dst: str | Path,
    log: Log = print,
    *,
    assets: str = "copy",
    set_config: dict | None = None,
    eos_ids: list[int] | None = None,
) -> dict:
    """Convert a GLM-4-Voice (ChatGLM-layout) checkpoint to a `GlmForCausalLM` directory.

    EOS ids: `eos_ids`, else the config's `eos_token_id`, else `<|endoftext|>`, `<|user|>` and
    `<|observation|>` from the tokenizer files. `generation_config.json` keeps the source's own
    values (if any) with that EOS list; decoding stays greedy unless the source says otherwise.
    Returns a report: shards, tensors in/out, dropped tensors (the stored rotary `inv_freq`,
    which transformers recomputes), tokenizer files, assets and files not carried.
    """
    src, dst = Path(src), Path(dst)
    raw = _with_set(read_config(src), set_config)
    if eos_ids is None and raw.get("eos_token_id") is None:
        found = find_token_ids(src, GLM_EOS_TOKENS)
        if all(t in found for t in GLM_EOS_TOKENS):
            eos_ids = [found[t] for t in GLM_EOS_TOKENS]
    config = glm_config_from_chatglm(raw, eos_ids)
    expected = glm_expected_names(config.num_hidden_layers, config.attention_bias)

    def is_dropped(name: str) -> bool:
        return name.endswith("rotary_pos_emb.inv_freq")

    gen = _source_generation(src)
    gen.update(eos_token_id=list(config.eos_token_id), pad_token_id=config.pad_token_id)
    report = _convert(
        src, dst, "GLM-4-Voice", config, glm_tensor_map(config), expected, is_dropped, log, gen, assets
    )
    report["rope_theta"] = config.rope_parameters["rope_theta"]
    return report


def _source_generation(src: Path) -> dict:
    """The sampling fields of the source's generation_config.json (ids are set by the caller)."""
    try:
        g = json.loads((src / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    keep = (
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "max_new_tokens",
        "max_length",
    )
    return {k: g[k] for k in keep if isinstance(g, dict) and k in g}


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


def qwen2_config_from_step(cfg: dict, eos_ids: list[int], set_config: dict | None = None):
    """A transformers `Qwen2Config` for Step-Audio-2's language model, EOS `eos_ids` (its `<|EOT|>`).

    `set_config` (the CLI's --set) fills or overrides language-model fields; the rotary base, the
    context length, the norm epsilon and the KV head count are never guessed."""
    llm = {**step_llm_config(cfg), **(set_config or {})}
    what = "Step-Audio-2 language-model"
    _require(llm, STEP_LLM_KEYS, what)
    heads = int(llm["num_attention_heads"])
    kv = llm.get("num_key_value_heads") or llm.get("num_attention_groups")
    if not kv:
        raise _missing_field(what, "num_key_value_heads", "the number of KV heads", "Step-Audio-2-mini has 4")
    theta = llm.get("rope_theta")
    if theta is None and isinstance(llm.get("rope_parameters"), dict):
        theta = llm["rope_parameters"].get("rope_theta")
    if theta is None:
        raise _missing_field(what, "rope_theta", "the rotary base", "Qwen2.5-7B, its backbone, uses 1000000")
    context = llm.get("max_position_embeddings") or llm.get("max_seq_len")
    if not context:
        raise _missing_field(what, "max_seq_len", "the context length", "see the model card")
    if "rms_norm_eps" not in llm:
        raise _missing_field(what, "rms_norm_eps", "the norm epsilon", "Qwen2.5-7B uses 1e-06")
    vocab = int(llm["vocab_size"])
    pad = _checked_eos_and_pad(eos_ids, llm.get("pad_token_id"), vocab)
    c = hf.make_config(
        "Qwen2ForCausalLM",
        vocab_size=vocab,
        hidden_size=int(llm["hidden_size"]),
        intermediate_size=int(llm["intermediate_size"]),
        num_hidden_layers=int(llm["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(kv),
        hidden_act=llm.get("hidden_act", "silu"),
        max_position_embeddings=int(context),
        rms_norm_eps=float(llm["rms_norm_eps"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
        tie_word_embeddings=False,
        use_sliding_window=False,
        eos_token_id=list(eos_ids),
        pad_token_id=int(pad),
    )
    dtype = llm.get("torch_dtype")
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


# Step-Audio-2's official sampling (stepfun-ai/Step-Audio2, stepaudio2.py, its speech examples)
STEP_SAMPLING = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "repetition_penalty": 1.05,
    "max_new_tokens": 4096,
}


def convert_step_audio2(
    src: str | Path,
    dst: str | Path,
    log: Log = print,
    *,
    assets: str = "copy",
    set_config: dict | None = None,
    eos_ids: list[int] | None = None,
) -> dict:
    """Convert Step-Audio-2-mini's language model to a `Qwen2ForCausalLM` directory.

    The audio encoder (`encoder.*`) and adapter (`adapter.*`) are dropped: the report lists
    their names under `dropped` (count under `dropped_count`), and one line says how many.
    EOS is `<|EOT|>` read from the tokenizer files (or `eos_ids`), in config.json and in
    generation_config.json, which also carries the official sampling (`STEP_SAMPLING`), so
    transformers' own `generate` on the output stops and samples as Step-Audio-2's code does.
    `token2wav/` (the vocoder) and other non-LM files are copied or symlinked (`assets`).
    """
    src, dst = Path(src), Path(dst)
    raw = read_config(src)
    # a config that is not Step-Audio-2's is named before its tokenizer files are looked at
    _require({**step_llm_config(raw), **(set_config or {})}, STEP_LLM_KEYS, "Step-Audio-2 language-model")
    if eos_ids is None:
        eot = find_token_ids(src, ["<|EOT|>"]).get("<|EOT|>")
        if eot is None:
            raise SparkeeError(
                f"the tokenizer files in '{src}' do not list <|EOT|>, Step-Audio-2's end-of-turn token: "
                "put the model's tokenizer files there or pass --eos-ids with its id"
            )
        eos_ids = [eot]
    config = qwen2_config_from_step(raw, eos_ids, set_config)
    expected = qwen2_expected_names(config.num_hidden_layers)

    def mapping(name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return {name: t} if name in expected else None

    def is_dropped(name: str) -> bool:
        return name.startswith(AUDIO_PREFIXES) or name.endswith("rotary_emb.inv_freq")

    gen = {**_source_generation(src), **STEP_SAMPLING}
    gen.update(eos_token_id=list(eos_ids), pad_token_id=config.pad_token_id)
    report = _convert(src, dst, "Step-Audio-2", config, mapping, expected, is_dropped, log, gen, assets)
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
