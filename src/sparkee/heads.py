"""Exit heads: map the hidden state after layer L to next-token logits.

Four kinds, all saved as safetensors with JSON metadata:
- logit-lens: the model's final norm and output projection applied to layer L's state (no weights);
- tuned-lens: a per-layer translator h + A h + b (zero-initialised, so untrained it *is* the logit
  lens), then the model's frozen final norm and output projection;
- full: a per-layer norm and vocabulary projection (initialised from the model's own);
- adapter: one decoder layer of the model's own class (initialised from layer L's weights) over
  layer L's states, with a KV cache of its own, then a per-layer norm and the model's frozen output
  projection (Kangaroo's shallow-network adapter). It attends over earlier positions, so it is
  called through `adapter_layer` / `adapter_logits` by the decode loop, which keeps its cache.
Any head may be restricted to a token-id set (speech ids plus control tokens): its logits then
cover only those ids, in the order of `token_ids`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import hf
from .backbone import FINGERPRINT_VERSION, Backbone
from .errors import SparkeeError

HEAD_KINDS = ("logit-lens", "tuned-lens", "full", "adapter")
FORMAT_NAME = "sparkee-exit-heads"
FORMAT_VERSION = "1"


class ExitHeads(torch.nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        kind: str,
        layers: list[int] | None = None,
        token_ids: list[int] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise SparkeeError(f"unknown head type '{kind}': use one of {', '.join(HEAD_KINDS)}")
        n = backbone.num_layers
        layers = sorted(set(layers if layers is not None else range(1, n)))
        for layer in layers:
            if not 1 <= layer < n:
                raise SparkeeError(
                    f"head layer {layer} is out of range: this model has {n} layers, so use 1..{n - 1}"
                )
        self.kind = kind
        self.layers = layers
        self.num_layers = n
        self.hidden_size = backbone.hidden_size
        self.vocab_size = backbone.vocab_size
        self.fingerprint = backbone.fingerprint()
        self.backbone = backbone  # not a submodule: its weights stay frozen and are not saved
        if token_ids is not None:
            ids = torch.as_tensor(token_ids, dtype=torch.long).unique(sorted=True)
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
                raise SparkeeError(f"head token set must hold ids in 0..{self.vocab_size - 1}")
            self.token_ids = ids.to(backbone.lm_head.weight.device)
        else:
            self.token_ids = None
        self.per_layer = torch.nn.ModuleDict()
        H, dev, dt = backbone.hidden_size, backbone.lm_head.weight.device, backbone.dtype
        for layer in layers if kind != "logit-lens" else []:
            if kind == "adapter":  # cache layer k of the decode loop's adapter cache
                block = hf.decoder_layer_like(backbone.model, layer, layers.index(layer)).to(dev, dt)
                self.per_layer[str(layer)] = torch.nn.ModuleDict(
                    {"layer": block, "norm": copy.deepcopy(backbone.norm).to(dev)}
                )
            elif kind == "tuned-lens":
                tr = torch.nn.Linear(H, H, bias=True, device=dev, dtype=dt)
                torch.nn.init.zeros_(tr.weight)
                torch.nn.init.zeros_(tr.bias)
                self.per_layer[str(layer)] = tr
            else:
                proj = torch.nn.Linear(H, self.out_size, bias=False, device=dev, dtype=dt)
                with torch.no_grad():
                    w = backbone.lm_head.weight
                    proj.weight.copy_(w if self.token_ids is None else w[self.token_ids])
                self.per_layer[str(layer)] = torch.nn.ModuleDict(
                    {"norm": copy.deepcopy(backbone.norm).to(dev), "proj": proj}
                )

    @property
    def out_size(self) -> int:
        return self.vocab_size if self.token_ids is None else int(self.token_ids.numel())

    def has(self, layer: int) -> bool:
        return self.kind == "logit-lens" and 1 <= layer < self.num_layers or layer in self.layers

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Logits at exit layer `layer` from the hidden state after that many layers ([.., H] -> [.., out_size])."""
        bb = self.backbone
        if self.kind == "adapter":
            raise SparkeeError(
                "adapter heads attend over earlier positions: the decode loop calls adapter_layer and "
                "adapter_logits with its cache (they have no per-state forward)"
            )
        if self.kind == "full":
            m = self.per_layer[str(layer)]
            return m["proj"](m["norm"](h))
        if self.kind == "tuned-lens":
            h = h + self.per_layer[str(layer)](h)
        return bb.project(bb.final_norm(h), self.token_ids)

    @property
    def attends(self) -> bool:
        """The head reads earlier positions (an adapter): the decode loop keeps a cache for it."""
        return self.kind == "adapter"

    def adapter_layer(self, layer: int, h, mask, position_ids, position_embeddings, cache) -> torch.Tensor:
        """The adapter's decoder layer over layer `layer`'s states h [R, r, H]; KV go to `cache`
        (cache layer = index of `layer` in self.layers; None while training, causal over r)."""
        return hf.call_layer(
            self.per_layer[str(layer)]["layer"], h, mask, position_ids, position_embeddings, cache
        )

    def adapter_logits(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Logits from adapter outputs ([.., H] -> [.., out_size])."""
        return self.backbone.project(self.per_layer[str(layer)]["norm"](out), self.token_ids)

    def use_fast_kernels(self) -> None:
        """Run the heads' own linear layers with the backbone's measured kernels (inference only:
        the packed copies are made from the current weights)."""
        from .kernels import fast_linear

        for k, m in self.per_layer.items():
            if isinstance(m, torch.nn.Linear):
                self.per_layer[k] = fast_linear(m, self.backbone)
            elif isinstance(m, torch.nn.ModuleDict) and "proj" in m:
                m["proj"] = fast_linear(m["proj"], self.backbone)
            elif isinstance(m, torch.nn.ModuleDict):  # an adapter's decoder layer
                for parent in list(m["layer"].modules()):
                    for name, child in list(parent.named_children()):
                        if type(child) is torch.nn.Linear:
                            hf.replace_module(parent, name, fast_linear(child, self.backbone))

    def cost(self, layer: int) -> int:
        """Weight elements read (= multiply-adds per row) to evaluate the head once."""
        H = self.hidden_size  # an adapter's decoder layer is metered as a layer pass, apart
        return H * self.out_size + (H * H + H if self.kind == "tuned-lens" else 0)

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "head_type": self.kind,
            "layers": json.dumps(self.layers),
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "vocab_size": str(self.vocab_size),
            "token_set_size": str(self.out_size if self.token_ids is not None else 0),
            "fingerprint": self.fingerprint,
            "fingerprint_version": str(FINGERPRINT_VERSION),
        }

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.per_layer.state_dict().items()}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids.cpu()
        if not tensors:  # safetensors needs one tensor; a logit lens has none of its own
            tensors["layers"] = torch.tensor(self.layers, dtype=torch.long)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={**self.metadata(), **(extra_metadata or {})})
        return path


def read_metadata(path: str | Path) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise SparkeeError(f"heads file '{path}' does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise SparkeeError(f"heads file '{path}' is not a safetensors file") from None
    if meta.get("format") != FORMAT_NAME:
        raise SparkeeError(
            f"'{path}' is a safetensors file but not a sparkee heads file (no '{FORMAT_NAME}' metadata)"
        )
    return meta


def load_heads(path: str | Path, backbone: Backbone) -> ExitHeads:
    """Load heads saved by `ExitHeads.save`; heads made for another backbone are refused."""
    meta = read_metadata(path)
    version = int(meta.get("fingerprint_version", "1"))  # files written before version 2 lack the field
    if version not in (1, FINGERPRINT_VERSION) or meta["fingerprint"] != backbone.fingerprint(version):
        raise SparkeeError(
            f"heads file '{path}' was made for another model (fingerprint {meta['fingerprint']}, "
            f"this model is {backbone.fingerprint()}); train heads for this model with `sparkee train-heads`"
        )
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    token_ids = tensors.pop("token_ids", None)
    tensors.pop("layers", None)
    heads = ExitHeads(backbone, meta["head_type"], json.loads(meta["layers"]), token_ids)
    dev, dt = backbone.lm_head.weight.device, backbone.dtype
    heads.per_layer.load_state_dict({k: v.to(dev, dt) for k, v in tensors.items()})
    heads.eval()
    heads.use_fast_kernels()
    return heads


def resolve_heads(spec: str | None, backbone: Backbone, token_ids=None) -> ExitHeads:
    """`--heads` value: 'logit-lens' (the default) or a path to a heads file."""
    if spec is None or spec == "logit-lens":
        return ExitHeads(backbone, "logit-lens", token_ids=token_ids)
    return load_heads(spec, backbone)
