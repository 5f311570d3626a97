"""A thin view of a transformers decoder-only causal LM: embed, run layers i..j, norm, project.

The model's own modules do the maths (embeddings, decoder layers, rotary embedding, final norm,
output projection); sparkee owns the loop around them and the KV cache. Every contact with
transformers and accelerate goes through `hf.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hf
from .errors import SparkeeError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "GlmForCausalLM")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


FINGERPRINT_VERSION = 2
RESTRICTED_CACHE = 4  # restricted output projections kept (one per distinct speech token set)


@dataclass
class Backbone:
    model: torch.nn.Module  # the *ForCausalLM
    name: str = ""
    _restricted: dict = field(default_factory=dict, repr=False)
    kernel_choice: dict = field(default_factory=dict, repr=False)  # kernels.optimize's measured choice
    _fingerprints: dict = field(default_factory=dict, repr=False)
    _blocks: dict | None = field(default=None, repr=False)  # compiled step kinds (--compile)

    def __post_init__(self) -> None:
        self.refresh_modules()
        self.config = self.model.config
        self.shape = hf.shape(self.config)
        self.num_layers = len(self.layers)
        self.hidden_size = self.shape.hidden_size
        self.vocab_size = self.lm_head.weight.shape[0]
        self.num_kv_heads = self.shape.num_kv_heads
        self.head_dim = self.shape.head_dim
        self.layer_devices = [hf.execution_device(layer) for layer in self.layers]
        self.layer_params = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]

    def refresh_modules(self) -> None:
        """(Re)read the model's modules, after kernels.optimize replaced some or the dtype changed."""
        p = hf.parts(self.model)
        self.embed_tokens, self.layers, self.rotary_emb = p.embed_tokens, p.layers, p.rotary_emb
        self.norm, self.lm_head = p.norm, p.lm_head
        self.dtype = self.lm_head.weight.dtype
        self._restricted.clear()

    def kernel_signature(self) -> str:
        """What the model's own linear layers run (part of a calibration's key). Shapes measured
        later for heads and restricted projections do not change it."""
        return getattr(self, "_kernel_signature", None) or "plain"

    def set_kernel_choice(self, choice: dict, version: int = 0) -> None:
        """`version`: kernels.py's KERNELS_VERSION, so that a change in what a kernel's name
        runs also gives calibrations a new key."""
        self.kernel_choice = dict(choice)
        text = json.dumps({"version": version, "choice": choice}, sort_keys=True)
        self._kernel_signature = hashlib.sha256(text.encode()).hexdigest()[:12] if choice else None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def architecture(self) -> str:
        return hf.architecture(self.model)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)  # [B, T] -> [B, T, H]

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hf.rotary(self.rotary_emb, h, position_ids)

    def run_layer(self, i: int, h, mask, position_ids, position_embeddings, cache) -> torch.Tensor:
        dev = self.layer_devices[i]
        if h.device != dev:  # layers spread over devices (accelerate device_map)
            h = h.to(dev)
            position_embeddings = tuple(t.to(dev) for t in position_embeddings)
            mask = mask.to(dev) if mask is not None else None
        return hf.call_layer(self.layers[i], h, mask, position_ids, position_embeddings, cache)

    @property
    def compiled(self) -> bool:
        return self._blocks is not None

    def run_block(
        self, a: int, b: int, h, mask, position_ids, position_embeddings, cache, compiled: bool = False
    ) -> torch.Tensor:
        """Layers a..b-1 over h ([R, r, H]); `compiled`: one compiled call per step kind (--compile)."""
        if compiled and self._blocks is not None:
            return self._blocks.get(a, b)(h, mask, position_ids, position_embeddings, cache)
        for i in range(a, b):
            h = self.run_layer(i, h, mask, position_ids, position_embeddings, cache)
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.to(self.norm.weight.device))

    def project(self, h_normed: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Output projection, optionally onto the rows of `token_ids` only ([.., H] -> [.., V or |ids|])."""
        h_normed = h_normed.to(self.lm_head.weight.device)
        if token_ids is None:
            return self.lm_head(h_normed)
        return self.restricted_head(token_ids)(h_normed)

    def restricted_weight(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.restricted_head(token_ids).weight

    def restricted_head(self, token_ids: torch.Tensor) -> torch.nn.Module:
        """The output projection onto `token_ids` only, gathered once per distinct set (copying |ids|
        rows every step would cost what it saves); keyed by the ids' content, at most a few kept."""
        key = hashlib.sha256(token_ids.detach().cpu().numpy().tobytes()).hexdigest()
        hit = self._restricted.pop(key, None)
        if hit is None:
            from .kernels import fast_linear

            w = self.lm_head.weight.detach()[token_ids.to(self.lm_head.weight.device)].contiguous()
            lin = torch.nn.Linear(1, 1, bias=False)
            hit = fast_linear(lin, self, w)
        self._restricted[key] = hit  # most recently used last
        while len(self._restricted) > RESTRICTED_CACHE:
            self._restricted.pop(next(iter(self._restricted)))
        return hit

    def fingerprint(self, version: int = FINGERPRINT_VERSION) -> str:
        """Identifies the backbone's weights, independent of the dtype it was loaded in.

        Version 2 hashes a strided sample of every weight of every layer (a fine-tune that froze
        the head and the norms still changes it); version 1, of heads files written before, hashed
        the final norm, 16 output rows and the last layer's input norm only.
        """
        hit = self._fingerprints.get(version)
        if hit is None:
            hit = self._fingerprints[version] = self._fingerprint(version)
        return hit

    def _fingerprint(self, version: int) -> str:
        cfg = {
            "arch": self.architecture,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "vocab": self.vocab_size,
            "heads": self.shape.num_heads,
            "kv_heads": self.num_kv_heads,
        }
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        # bf16 rounding is idempotent, so fp32 and bf16 loads of one checkpoint agree; the modules
        # are aligned so that weights accelerate keeps on disk (meta tensors here) are read too
        if version == 1:
            for mod, rows in ((self.norm, None), (self.lm_head, 16), (self.layers[-1].input_layernorm, None)):
                with hf.weights_on_cpu(mod, whole=True):
                    t = mod.weight if rows is None else mod.weight[:rows]
                    h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
            return h.hexdigest()[:16]
        mods = [self.embed_tokens, *self.layers, self.norm, self.lm_head]
        for mod in mods:
            with hf.weights_on_cpu(mod):
                for name, p in sorted(mod.named_parameters()):
                    flat = p.detach().reshape(-1)
                    step = max(1, flat.numel() // 4096)
                    h.update(name.encode())
                    h.update(flat[::step].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]


execution_device = hf.execution_device  # re-exported: tests and callers used it from here


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


def check_device(device: str) -> torch.device:
    """A device string this torch can use, or one sentence saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SparkeeError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SparkeeError(
                f"device '{device}' needs a CUDA build of torch and a GPU; this torch "
                f"({torch.__version__}) sees none: use --device cpu or install the CUDA build (docs/install.md)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SparkeeError(
                f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPUs"
            )
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise SparkeeError(f"unknown device '{device}': use cpu, cuda or cuda:N")
    return dev


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: dict | str | None = None,
    fast: bool = True,
    compile: bool = False,
    **kwargs,
) -> Backbone:
    """Load a Hugging Face checkpoint directory of a supported decoder-only architecture.

    fast: give the linear layers the kernels measured fastest on this CPU (kernels.py; no effect
    on GPUs). compile: torch.compile each step kind once (compiled.py).
    """
    p = Path(path)
    if not p.is_dir():
        raise SparkeeError(f"model directory '{path}' does not exist")
    if not (p / "config.json").is_file():
        raise SparkeeError(
            f"model directory '{path}' has no config.json, so it is not a Hugging Face checkpoint"
        )
    try:
        config = hf.load_config(p)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise SparkeeError(f"cannot read the config in '{path}': {str(e).splitlines()[0]}") from None
    check_architecture(config)
    torch_dtype = resolve_dtype(dtype)
    if device_map is None:
        check_device(device)
    try:
        model = hf.load_causal_lm(p, torch_dtype, device_map, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise SparkeeError(f"cannot load the weights in '{path}': {str(e).splitlines()[0]}") from None
    if device_map is None:
        model = model.to(device)
    model.eval()
    bb = Backbone(model, name=str(p))
    if fast:
        from .kernels import optimize

        optimize(bb)
    if compile:
        from .compiled import enable_compile

        enable_compile(bb)
    return bb


def wrap_model(model: torch.nn.Module) -> Backbone:
    """Use an already-loaded transformers causal LM (tests, notebooks)."""
    check_architecture(model.config)
    model.eval()
    return Backbone(model, name=type(model).__name__)
