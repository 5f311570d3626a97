"""The one module that touches transformers and accelerate internals.

sparkee runs a transformers causal LM layer by layer with a KV cache of its own. That leans on
conventions that are not all public API and that have changed between releases (5.24.0 started
calling `cache.update(k, v, layer_idx, kwargs=...)` and renamed the decoder layer's
`past_key_values` keyword to `cache`). Every such convention is written here, once, and pinned by
`tests/test_hf_contract.py`, which names the transformers version in each failure:

- module layout: `model.model.{embed_tokens, layers, rotary_emb, norm}` and `model.lm_head`;
- the rotary call `rotary_emb(h, position_ids) -> (cos, sin)`;
- the decoder layer's call keywords and its tensor-or-tuple return (`call_layer`);
- the cache protocol the attention modules use (`CacheProtocol`);
- attention masks: a bool [R, 1, q, kv] mask (True = attend) or None, which the `sdpa` attention
  (forced at load) turns into `is_causal` for more than one query (`attention_mask`);
- `output_hidden_states`: entry L is the state after L layers, the last one is already normalised;
- the linear layers `kernels.py` swaps (`linear_slots`);
- accelerate's hooks for offloaded weights (`execution_device`, `weights_on_cpu`, `has_device_map`);
- config classes and field names the converter and the test models write (`make_config`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

# The transformers releases this version of sparkee was tested on (oldest: CI's compat stage;
# newest: the lock, constraints.txt). Outside it sparkee warns once and goes on.
TESTED_TRANSFORMERS = ("5.16.1", "5.24.0")


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "not installed"


def _release(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def tested(version: str) -> bool:
    """Whether `version` lies in the tested range (any patch release of the newest tested minor)."""
    lo, hi = _release(TESTED_TRANSFORMERS[0]), _release(TESTED_TRANSFORMERS[1])
    v = _release(version)
    return lo <= v and v[:2] <= hi[:2]


_warned = False


def warn_if_untested() -> None:
    """One line on stderr when the installed transformers is outside the tested range."""
    global _warned
    v = transformers_version()
    if _warned or v == "not installed" or tested(v):
        return
    _warned = True
    lo, hi = TESTED_TRANSFORMERS
    print(
        f"sparkee: warning: transformers {v} is outside the tested range {lo} .. {hi.rsplit('.', 1)[0]}.x; "
        "if decoding fails, install the lock (constraints.txt) or run `make test-latest`",
        file=sys.stderr,
    )


class ContractError(RuntimeError):
    """A transformers convention sparkee relies on does not hold in the installed release."""

    def __init__(self, what: str) -> None:
        super().__init__(f"transformers {transformers_version()}: {what}")


# -- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def load_causal_lm(path: str | Path, dtype: torch.dtype, device_map=None, **kwargs) -> torch.nn.Module:
    """A checkpoint directory as a transformers causal LM with the `sdpa` attention this module's
    masks are written for (eager attention reads masks the same way, flash attention does not)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in a CLI that loads once
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, attn_implementation="sdpa", **kwargs
    )


def make_config(architecture: str, **fields):
    """The transformers config of `architecture` (e.g. "Qwen2ForCausalLM") with `fields`.

    Field names are transformers' own (`rope_parameters` holds the rotary settings since 5.0);
    `architectures` is set so that `AutoModelForCausalLM` and sparkee's check pick the class."""
    import transformers

    name = architecture.removesuffix("ForCausalLM") + "Config"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ContractError(f"has no config class {name} for {architecture}")
    config = cls(**fields)
    config.architectures = [architecture]
    return config


def model_from_config(config, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A randomly initialised causal LM of `config` (tests, the reference SLM's training, the
    exported draft's skeleton), in `dtype` when given."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **kwargs)


def write_generation_config(dst: Path, values: dict) -> None:
    """generation_config.json through transformers' own class (it validates the values)."""
    from transformers import GenerationConfig

    GenerationConfig(**values).save_pretrained(dst)


# -- shape and layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """The modules sparkee calls, in the order a forward pass uses them."""

    embed_tokens: torch.nn.Module
    layers: torch.nn.ModuleList
    rotary_emb: torch.nn.Module
    norm: torch.nn.Module
    lm_head: torch.nn.Module


def parts(model: torch.nn.Module) -> Parts:
    """The decoder-only layout of Qwen2, Llama and Glm causal LMs: `model.model.*` and `lm_head`."""
    inner = getattr(model, "model", None)
    names = ("embed_tokens", "layers", "rotary_emb", "norm")
    missing = [n for n in names if not hasattr(inner, n)]
    if inner is None or missing or not hasattr(model, "lm_head"):
        raise ContractError(
            f"{type(model).__name__} lacks {', '.join(missing) or 'model or lm_head'}: sparkee expects "
            "model.model.{embed_tokens, layers, rotary_emb, norm} and model.lm_head"
        )
    return Parts(inner.embed_tokens, inner.layers, inner.rotary_emb, inner.norm, model.lm_head)


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int | None
    context: int | None  # positions the model was trained for, when the config says


def shape(config) -> Shape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)
    return Shape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=getattr(config, "intermediate_size", None),
        context=context,
    )


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention backend transformers dispatches to ("sdpa", "eager", ...)."""
    return model.config._attn_implementation


def architecture(model: torch.nn.Module) -> str:
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]


# -- calling the model's modules ----------------------------------------------------------------


def rotary(rotary_emb: torch.nn.Module, h: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin), each [R, r, rotary dim], for states h [R, r, H] at `position_ids` [R, r]."""
    return rotary_emb(h, position_ids)


_CACHE_KEYWORD: dict[type, str] = {}


def cache_keyword(layer_cls: type) -> str:
    """The decoder layer's keyword for the KV cache: `cache` since 5.24 (`past_key_values` still
    accepted there with a deprecation warning, until 5.40), `past_key_values` before."""
    kw = _CACHE_KEYWORD.get(layer_cls)
    if kw is None:
        params = inspect.signature(layer_cls.forward).parameters  # follows the deprecation wrapper
        if "cache" in params:
            kw = "cache"
        elif "past_key_values" in params:
            kw = "past_key_values"
        else:
            raise ContractError(f"{layer_cls.__name__}.forward takes neither cache= nor past_key_values=")
        _CACHE_KEYWORD[layer_cls] = kw
    return kw


def call_layer(layer, h, mask, position_ids, position_embeddings, cache) -> torch.Tensor:
    """One decoder layer over h [R, r, H]; its keys and values go to `cache.update`."""
    out = layer(
        h,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        position_embeddings=position_embeddings,
        **{cache_keyword(type(layer)): cache},
    )
    return out[0] if isinstance(out, tuple) else out  # a tuple before 5.x's tensor return


class CacheProtocol:
    """What transformers' attention modules ask of a KV cache passed to a decoder layer.

    They call `update(key_states, value_states, layer_idx)` (three arguments up to 5.23, plus
    `kwargs=` since 5.24): any further argument or keyword is accepted and ignored, so the next
    addition does not break sparkee. Subclasses implement `write`.
    """

    is_compileable = False  # read by transformers' generation utilities

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.write(key_states, value_states, layer_idx)

    def write(self, key_states, value_states, layer_idx: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


def attention_mask(
    lens: list[int], counts: list[int], r: int, device, memo: dict | None = None
) -> torch.Tensor | None:
    """The mask for r queries per row, row k's first query at slot lens[k] (its earlier slots
    cached): [R, 1, r, kv_len] bool, True = attend; query j of row k sees slots <= lens[k] + j.

    None where the attention needs none: one new position per row with every row as long (sdpa
    attends to everything), or one row prefilled from slot 0 (sdpa's is_causal)."""
    kv_len = max(n + c for n, c in zip(lens, counts, strict=True))
    if r == 1 and all(n + 1 == kv_len for n in lens):
        return None
    if len(lens) == 1 and lens[0] == 0:
        return None
    key = (tuple(lens), r, kv_len)
    m = memo.get(key) if memo is not None else None
    if m is None:
        q = torch.tensor(lens, device=device)[:, None] + torch.arange(r, device=device)  # [R, r]
        m = (torch.arange(kv_len, device=device)[None, None, :] <= q[:, :, None])[:, None]
        if memo is not None:
            _remember(memo, key, m)
    return m


def static_mask(
    lens: list[int], counts: list[int], r: int, capacity: int, device, memo: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For passes over a whole preallocated buffer of `capacity` slots (compiled step kinds): the
    [R, 1, r, capacity] mask and the [R, r] write slots, padding aimed at the last (scratch) slot."""
    key = ("static", tuple(lens), tuple(counts), r, capacity)
    hit = memo.get(key) if memo is not None else None
    if hit is None:
        t = torch.arange(r, device=device)
        q = torch.tensor(lens, device=device)[:, None] + t  # [R, r]
        mask = (torch.arange(capacity, device=device)[None, None, :] <= q[:, :, None])[:, None]
        real = t[None, :] < torch.tensor(counts, device=device)[:, None]
        slots = torch.where(real, q, torch.full_like(q, capacity - 1))
        hit = (mask, slots)
        if memo is not None:
            _remember(memo, key, hit)
    return hit


def _remember(memo: dict, key, value, limit: int = 64) -> None:
    memo[key] = value
    if len(memo) > limit:
        memo.pop(next(iter(memo)))


def all_hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One uncached forward over ids [1, T]: entry L is the state after L layers ([1, T, H]);
    the last entry is already normalised (transformers applies the final norm to it)."""
    out = model(ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def dynamic_cache_kv(past_key_values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers `DynamicCache` (a list of layer objects since
    the per-layer cache refactor), each [B, kv_heads, T, head_dim]."""
    return [(layer.keys, layer.values) for layer in past_key_values.layers]


def new_dynamic_cache(config=None):
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


# -- linear layers ------------------------------------------------------------------------------


def linear_slots(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Linear, bool]]:
    """(parent, attribute, linear, is_output_projection) for every nn.Linear of the decoder layers
    and the output projection: the modules kernels.py may replace by a same-parameter subclass."""
    p = parts(model)
    for layer in p.layers:
        for parent in layer.modules():
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    yield parent, name, child, False
    yield model, "lm_head", p.lm_head, True


def decoder_layer_like(model: torch.nn.Module, source: int, layer_idx: int) -> torch.nn.Module:
    """A new decoder layer of the model's own class and config, holding a copy of layer `source`'s
    weights, whose attention writes cache layer `layer_idx` (an adapter head's layer)."""
    src = parts(model).layers[source]
    block = type(src)(model.config, source)  # per-layer config (layer_types) as layer `source`
    block.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()})
    attn = getattr(block, "self_attn", None)
    if attn is None or not hasattr(attn, "layer_idx"):
        raise ContractError(
            f"{type(block).__name__} has no self_attn.layer_idx: sparkee sets it to aim the cache"
        )
    attn.layer_idx = layer_idx  # the index its cache.update() calls name
    return block


def replace_module(parent: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    setattr(parent, name, new)


# -- accelerate ---------------------------------------------------------------------------------


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: accelerate's hook device when weights are offloaded, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or [hook]  # a SequentialHook holds several (cpu_offload)
    dev = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), None)
    if dev is not None:
        return dev if isinstance(dev, torch.device) else torch.device(dev)
    return next(module.parameters()).device


def has_device_map(model: torch.nn.Module) -> bool:
    """Whether accelerate placed the model with a device map (layers on several devices or disk)."""
    return bool(getattr(model, "hf_device_map", None))


@contextlib.contextmanager
def weights_on_cpu(module: torch.nn.Module, whole: bool = False) -> Iterator[None]:
    """Inside: the weights accelerate keeps on disk or another device (its hooks hang on any
    submodule; those weights are `meta` tensors outside) readable on the CPU. `whole`: align the
    module itself too, hooked or not (moves all of its weights to the CPU for the duration)."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        subs = (
            [module] if whole else [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]
        )
        for sub in subs:
            stack.enter_context(align_module_device(sub, torch.device("cpu")))
        yield
