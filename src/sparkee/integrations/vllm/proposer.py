"""A vLLM `custom_class` proposer that drafts with the target's own first L layers and sparkee's exit
head: self-speculation with no second copy of the layers' weights.

    LLM(model=DIR, speculative_config={"method": "custom_class",
        "model": "sparkee.integrations.vllm.proposer.ShallowProposer", "num_speculative_tokens": 3})
    with SPARKEE_VLLM_LAYER=L and SPARKEE_VLLM_HEADS=heads.safetensors|logit-lens in the environment.

What vLLM 0.32's interface gives a custom proposer: `load_model(target_model)` (the loaded target
module, so its layers can be called) and `propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu, slot_mappings=)` after each verification step — token ids only, no hidden states
and no attention metadata for a pass of its own. So the proposer cannot reuse the target's layer
1..L KV cache (which holds exactly what a shallow draft needs) nor its layer-L hidden states; it
keeps a draft KV cache of its own for layers 1..L per batch row (K/V of every fed token, cropped
to the common prefix with the row's tokens at each call, so rejected drafts and a new request in
the row are handled), and runs the target's own modules (norms, qkv/o projections, rotary
embedding, MLP) with its own causal attention. Weights are shared; the draft KV and the layer
1..L compute of the accepted tokens are not (they are done twice, once by the proposer and once
by the target's verification). Greedy drafts (argmax); vLLM verifies them with its rejection
sampler, so greedy output equals plain greedy decoding.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

LAYER_ENV = "SPARKEE_VLLM_LAYER"
HEADS_ENV = "SPARKEE_VLLM_HEADS"


def read_settings() -> tuple[int, str]:
    """(layer, heads) from the environment, or one sentence saying what is missing."""
    layer = os.environ.get(LAYER_ENV)
    if not layer or not layer.isdigit() or int(layer) < 1:
        raise ValueError(
            f"set {LAYER_ENV} to the exit layer L (a whole number >= 1) for the sparkee proposer"
        )
    return int(layer), os.environ.get(HEADS_ENV, "logit-lens")


def load_head(spec: str, layer: int, hidden: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm weight, projection) of a full sparkee head for `layer`; None for the logit lens."""
    if spec == "logit-lens":
        return None
    from safetensors import safe_open

    with safe_open(spec, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "sparkee-exit-heads":
            raise ValueError(f"'{spec}' is not a sparkee heads file")
        kind = meta.get("head_type")
        if kind != "full" or "token_ids" in f.keys():
            raise ValueError(
                f"the sparkee proposer takes a full-vocabulary full head or logit-lens, not a {kind} head"
            )
        if int(meta["hidden_size"]) != hidden or int(meta["vocab_size"]) != vocab:
            raise ValueError(f"'{spec}' was made for another model (hidden/vocab size differ)")
        if layer not in json.loads(meta["layers"]):
            raise ValueError(f"'{spec}' has no head for layer {layer}")
        return f.get_tensor(f"{layer}.norm.weight"), f.get_tensor(f"{layer}.proj.weight")


class _Row:
    __slots__ = ("tokens", "k", "v")

    def __init__(self, n_layers: int) -> None:
        self.tokens: list[int] = []
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def crop(self, m: int) -> None:
        self.tokens = self.tokens[:m]
        self.k = [None if t is None else t[:, :m] for t in self.k]
        self.v = [None if t is None else t[:, :m] for t in self.v]


class ShallowProposer:
    """vLLM custom proposer: layers 1..L of the target plus sparkee's head, greedy drafts."""

    def __init__(self, vllm_config) -> None:
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        hf = vllm_config.model_config.hf_config
        self.layer, self.heads_spec = read_settings()
        if not 1 <= self.layer < hf.num_hidden_layers:
            raise ValueError(
                f"{LAYER_ENV}={self.layer} must be in 1..{hf.num_hidden_layers - 1} for this model"
            )
        self.eps = hf.rms_norm_eps
        self.vocab = hf.vocab_size
        self.hidden = hf.hidden_size
        self.rows: dict[int, _Row] = {}
        self.target = None
        self.head = None
        self.calls = 0  # propose calls (verification steps), for tests and logs

    # -- vLLM's interface ---------------------------------------------------------------------
    def load_model(self, target_model, *args, **kwargs) -> None:
        self.target = target_model
        inner = target_model.model
        self.layers = list(inner.layers)[: self.layer]
        head = load_head(self.heads_spec, self.layer, self.hidden, self.vocab)
        if head is not None:
            dt = next(target_model.parameters()).dtype
            self.head = (head[0].to(dt), head[1].to(dt))

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **kw):
        self.calls += 1
        out: list[list[int]] = []
        with torch.inference_mode():
            for i, sampled in enumerate(sampled_token_ids):
                n = int(num_tokens_no_spec[i])
                if not len(sampled) or n + self.k >= self.max_model_len:
                    out.append([])
                    continue
                out.append(self._draft(i, [int(t) for t in token_ids_cpu[i, :n]]))
        return out

    # -- the draft ----------------------------------------------------------------------------
    def _draft(self, row: int, context: list[int]) -> list[int]:
        st = self.rows.get(row)
        if st is None:
            st = self.rows[row] = _Row(len(self.layers))
        m = 0
        limit = min(len(st.tokens), len(context) - 1)  # feed at least the last token
        while m < limit and st.tokens[m] == context[m]:
            m += 1
        st.crop(m)
        feed = context[m:]
        drafts: list[int] = []
        for _ in range(self.k):
            logits = self._forward(st, feed)
            tok = int(torch.argmax(logits[-1]))
            drafts.append(tok)
            feed = [tok]
        return drafts

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.target
        for name in ("embed_input_ids", "get_input_embeddings"):
            fn = getattr(t, name, None)
            if callable(fn):
                try:
                    return fn(ids)
                except TypeError:
                    continue
        return t.model.embed_tokens(ids)

    def _forward(self, st: _Row, feed: list[int]) -> torch.Tensor:
        dev = next(self.target.parameters()).device
        start = len(st.tokens)
        ids = torch.tensor(feed, dtype=torch.long, device=dev)
        pos = torch.arange(start, start + len(feed), device=dev)
        h = self._embed(ids)
        for j, layer in enumerate(self.layers):
            h = self._layer(j, layer, h, pos, st)
        st.tokens.extend(feed)
        if self.head is None:
            return self.target.compute_logits(self.target.model.norm(h))
        w_norm, proj = self.head
        x = h.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype) * w_norm
        return F.linear(x, proj)

    def _layer(self, j: int, layer, h: torch.Tensor, pos: torch.Tensor, st: _Row) -> torch.Tensor:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(pos, q.contiguous(), k.contiguous())
        T, d = h.shape[0], attn.head_dim
        nh, nkv = attn.num_heads, attn.num_kv_heads
        k = k.reshape(T, nkv, d).transpose(0, 1)
        v = v.reshape(T, nkv, d).transpose(0, 1)
        if st.k[j] is not None:
            k = torch.cat([st.k[j], k], dim=1)
            v = torch.cat([st.v[j], v], dim=1)
        st.k[j], st.v[j] = k, v
        S = k.shape[1]
        qh = q.reshape(T, nh, d).transpose(0, 1)
        rep = nh // nkv
        kk = k.repeat_interleave(rep, dim=0) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=0) if rep > 1 else v
        # query t (absolute position S - T + t) sees keys 0..S - T + t
        mask = (
            torch.arange(S, device=h.device)[None, :] <= (S - T + torch.arange(T, device=h.device))[:, None]
        )
        o = F.scaled_dot_product_attention(qh, kk, vv, attn_mask=mask, scale=attn.scaling)
        o, _ = attn.o_proj(o.transpose(0, 1).reshape(T, nh * d))
        h = h + o
        return h + layer.mlp(layer.post_attention_layernorm(h))
