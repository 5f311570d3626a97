"""A thin view of a transformers decoder-only causal LM: embed, run layers i..j, norm, project.

This is the only module that touches transformers internals. The model's own modules do the maths
(embeddings, decoder layers, rotary embedding, final norm, output projection); sparkee owns the
loop around them and the KV cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SparkeeError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "GlmForCausalLM")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    model: torch.nn.Module  # the *ForCausalLM
    name: str = ""
    _restricted: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        inner = self.model.model
        self.config = self.model.config
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = self.model.lm_head
        self.num_layers = len(self.layers)
        self.hidden_size = self.config.hidden_size
        self.vocab_size = self.lm_head.weight.shape[0]
        self.num_kv_heads = self.config.num_key_value_heads
        self.head_dim = (
            getattr(self.config, "head_dim", None) or self.hidden_size // self.config.num_attention_heads
        )
        self.layer_devices = [execution_device(layer) for layer in self.layers]
        self.dtype = self.lm_head.weight.dtype
        self.layer_params = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def architecture(self) -> str:
        return (self.config.architectures or [type(self.model).__name__])[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)  # [B, T] -> [B, T, H]

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(h, position_ids)

    def run_layer(self, i: int, h, mask, position_ids, position_embeddings, cache) -> torch.Tensor:
        dev = self.layer_devices[i]
        if h.device != dev:  # layers spread over devices (accelerate device_map)
            h = h.to(dev)
            position_embeddings = tuple(t.to(dev) for t in position_embeddings)
            mask = mask.to(dev) if mask is not None else None
        out = self.layers[i](
            h,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.to(self.norm.weight.device))

    def project(self, h_normed: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Output projection, optionally onto the rows of `token_ids` only ([.., H] -> [.., V or |ids|])."""
        h_normed = h_normed.to(self.lm_head.weight.device)
        if token_ids is None:
            return self.lm_head(h_normed)
        return torch.nn.functional.linear(h_normed, self.restricted_weight(token_ids))

    def restricted_weight(self, token_ids: torch.Tensor) -> torch.Tensor:
        hit = self._restricted.get(id(token_ids))
        if hit is None:  # gathered once: copying |ids| rows every step would cost what it saves
            w = self.lm_head.weight.detach()[token_ids.to(self.lm_head.weight.device)].contiguous()
            hit = self._restricted[id(token_ids)] = (token_ids, w)  # holding ids keeps id() unique
        return hit[1]

    def fingerprint(self) -> str:
        """Identifies the backbone's weights, independent of the dtype it was loaded in."""
        cfg = {
            "arch": self.architecture,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "vocab": self.vocab_size,
            "heads": self.config.num_attention_heads,
            "kv_heads": self.num_kv_heads,
        }
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        from accelerate.utils import align_module_device

        # bf16 rounding is idempotent, so fp32 and bf16 loads of one checkpoint agree; the modules
        # are aligned so that weights accelerate keeps on disk (meta tensors here) are read too
        for mod, rows in ((self.norm, None), (self.lm_head, 16), (self.layers[-1].input_layernorm, None)):
            with align_module_device(mod, torch.device("cpu")):
                t = mod.weight if rows is None else mod.weight[:rows]
                h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: accelerate's hook device when weights are offloaded, else its weights'."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return dev if isinstance(dev, torch.device) else torch.device(dev)
    return next(module.parameters()).device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SparkeeError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_architecture(config) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise SparkeeError(
            f"architecture {', '.join(archs) or config.model_type} is not supported: "
            f"sparkee runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: dict | str | None = None,
    **kwargs,
) -> Backbone:
    """Load a Hugging Face checkpoint directory of a supported decoder-only architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in a CLI that loads once

    p = Path(path)
    if not p.is_dir():
        raise SparkeeError(f"model directory '{path}' does not exist")
    if not (p / "config.json").is_file():
        raise SparkeeError(
            f"model directory '{path}' has no config.json, so it is not a Hugging Face checkpoint"
        )
    try:
        config = AutoConfig.from_pretrained(p)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise SparkeeError(f"cannot read the config in '{path}': {str(e).splitlines()[0]}") from None
    check_architecture(config)
    torch_dtype = resolve_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=torch_dtype, device_map=device_map, attn_implementation="sdpa", **kwargs
        )
    except Exception as e:  # noqa: BLE001
        raise SparkeeError(f"cannot load the weights in '{path}': {str(e).splitlines()[0]}") from None
    if device_map is None:
        model = model.to(device)
    model.eval()
    return Backbone(model, name=str(p))


def wrap_model(model: torch.nn.Module) -> Backbone:
    """Use an already-loaded transformers causal LM (tests, notebooks)."""
    check_architecture(model.config)
    model.eval()
    return Backbone(model, name=type(model).__name__)
