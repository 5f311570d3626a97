"""The shallow draft as a standard checkpoint: layers 1..L of the model plus its exit head for layer L.

`export_draft` writes a transformers checkpoint of the model's own architecture (safetensors,
`config.json` with `num_hidden_layers = L`, the tokenizer and generation config copied) whose
logits are sparkee's early step at layer L. Any engine that speculates with a draft model of the
same vocabulary can use it with no sparkee code: transformers' `generate(assistant_model=...)`,
vLLM's `speculative_config={"method": "draft_model", "model": DIR, ...}`.

What exports exactly: heads made of a norm and an output projection, which take the places of the
draft's final norm and `lm_head` — the logit lens (the model's own final norm and projection) and
the `full` head (a per-layer norm and vocabulary projection) — and the `adapter` head, whose
decoder layer (of the model's own class) becomes the draft's layer L+1, followed by its norm and
the model's output projection: a draft of L+1 layers. A tuned-lens translator (h + A h + b before the norm) has no
place in these architectures (every layer reads the residual stream through an RMSNorm, so a
linear map of the stream cannot be folded into the weights), and a head restricted to a token set
has no logits for the other ids: both are refused with one sentence.

Only public transformers API is used, through hf.py (configs, `AutoModelForCausalLM.from_config`,
`save_pretrained`), plus module identity to find the draft's final-norm and output-projection keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch

from . import hf
from .errors import SparkeeError

EXPORTABLE_KINDS = ("logit-lens", "full", "adapter")
# files copied beside the weights: the tokenizer (any of the usual layouts) and the generation config
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenization_*.py",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DRAFT_INFO = "sparkee_draft.json"


def draft_config(config, layer: int, untied: bool, extra_layers: int = 0):
    """The model's config with `layer + extra_layers` decoder layers (per-layer lists cut to match)."""
    cfg = copy.deepcopy(config)
    n = layer + extra_layers
    cfg.num_hidden_layers = n
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) >= n:
        # an extra layer (an adapter) is built as layer `layer` of the model: it takes that type
        cfg.layer_types = list(types[:layer]) + list(types[layer : layer + 1]) * extra_layers
    if hasattr(cfg, "max_window_layers") and isinstance(cfg.max_window_layers, int):
        cfg.max_window_layers = min(cfg.max_window_layers, n)
    if untied:
        cfg.tie_word_embeddings = False
    return cfg


def _module_name(model: torch.nn.Module, module: torch.nn.Module, what: str) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise SparkeeError(f"cannot find the model's {what} among its modules")  # pragma: no cover


def head_parts(heads, layer: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    """(final norm, output projection, extra decoder layer or None) that make up head `layer`."""
    if heads.kind not in EXPORTABLE_KINDS:
        raise SparkeeError(
            f"a {heads.kind} head does not fit the model's architecture, so it cannot be exported as "
            f"a draft: export-draft takes {', '.join(EXPORTABLE_KINDS[:-1])} or {EXPORTABLE_KINDS[-1]} "
            "heads (train one with `sparkee train-heads --head full` or `--head adapter`)"
        )
    if heads.token_ids is not None:
        raise SparkeeError(
            f"these heads are restricted to {heads.out_size} token ids, and a draft needs logits for all "
            f"{heads.vocab_size}: export full-vocabulary heads (`train-heads --token-set all`)"
        )
    if not heads.has(layer):
        raise SparkeeError(f"the heads have no head for layer {layer}: they cover layers {heads.layers}")
    bb = heads.backbone
    if heads.kind == "logit-lens":
        return bb.norm, bb.lm_head, None
    m = heads.per_layer[str(layer)]
    if heads.kind == "adapter":
        return m["norm"], bb.lm_head, m["layer"]
    return m["norm"], m["proj"], None


def build_draft(bb, heads, layer: int, extra_layer: torch.nn.Module | None = None) -> torch.nn.Module:
    """The draft as a transformers model sharing the backbone's tensors (no copy of the weights).

    `extra_layer`: a decoder layer of the model's own class run after layer `layer` (an adapter head);
    it becomes the draft's layer `layer + 1`.
    """
    n = bb.num_layers
    if not 1 <= layer < n:
        raise SparkeeError(f"--layer must be in 1..{n - 1} for this {n}-layer model, got {layer}")
    norm, proj, adapter = head_parts(heads, layer)
    adapter = extra_layer if extra_layer is not None else adapter
    model = bb.model
    untied = proj is not bb.lm_head
    cfg = draft_config(model.config, layer, untied, extra_layers=int(adapter is not None))
    norm_name = _module_name(model, bb.norm, "final norm")
    head_name = _module_name(model, bb.lm_head, "output projection")
    layers_name = _module_name(model, bb.layers, "decoder layers")
    source = model.state_dict(keep_vars=False)
    with torch.device("meta"):
        draft = hf.model_from_config(cfg, dtype=bb.dtype)
    state = {}
    for key in draft.state_dict():
        if key.startswith(norm_name + "."):
            state[key] = norm.state_dict()[key[len(norm_name) + 1 :]]
        elif key.startswith(head_name + "."):
            state[key] = proj.state_dict()[key[len(head_name) + 1 :]]
        elif adapter is not None and key.startswith(f"{layers_name}.{layer}."):
            state[key] = adapter.state_dict()[key[len(f"{layers_name}.{layer}.") :]]
        elif key in source:
            state[key] = source[key]
        else:  # pragma: no cover - a layout this function does not know
            raise SparkeeError(f"cannot map the draft's weight '{key}' onto the model's weights")
    state = {k: v.detach().to(bb.dtype) for k, v in state.items()}
    draft.load_state_dict(state, assign=True, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        draft.tie_weights()
    return draft


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def export_draft(
    model_dir: str | Path,
    heads_spec: str,
    layer: int,
    out: str | Path,
    dtype: str | None = None,
) -> Path:
    """Write the draft (layers 1..`layer` + the head for `layer`, an adapter's layer included) to
    `out`; return `out`.

    heads_spec: a heads file or 'logit-lens'. dtype: the checkpoint's own unless given.
    """
    from .backbone import DTYPES, load_model
    from .heads import resolve_heads

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a directory that is not empty"
        raise SparkeeError(f"--out '{out}' is {what}: give a new or empty directory")
    if out.resolve() == model_dir.resolve():
        raise SparkeeError("--out must differ from --model: the draft would overwrite the model")
    if dtype is None:
        try:
            saved = json.loads((model_dir / "config.json").read_text())
            saved = saved.get("dtype") or saved.get("torch_dtype")
        except (OSError, ValueError, AttributeError):
            saved = None  # load_model says what is wrong with the directory
        dtype = saved if saved in DTYPES else "float32"
    bb = load_model(model_dir, dtype=dtype, fast=False)
    heads = resolve_heads(heads_spec, bb)
    if not 1 <= layer < bb.num_layers:
        raise SparkeeError(f"--layer must be in 1..{bb.num_layers - 1} for this model, got {layer}")
    draft = build_draft(bb, heads, layer)
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out, safe_serialization=True)
    for pattern in COPIED:
        for f in model_dir.glob(pattern):
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, out / f.name)
    info = {
        "format": "sparkee-draft",
        "version": 1,
        "source_model": str(model_dir),
        "source_fingerprint": bb.fingerprint(),
        "source_num_layers": bb.num_layers,
        "layer": layer,
        "head_type": heads.kind,
        "heads": "logit-lens" if heads_spec in (None, "logit-lens") else str(heads_spec),
        "heads_sha256": None if heads_spec in (None, "logit-lens") else _digest(Path(heads_spec)),
        "dtype": dtype,
    }
    (out / DRAFT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out
