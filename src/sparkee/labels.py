"""Teacher-forced labels and per-layer metrics, shared by head training and the layer report.

`collect_labels` runs full-depth generation on each prompt, then one teacher-forced pass over the
generated sequence, keeping for every generated step the hidden state after each requested layer
and the last layer's normalised state (the teacher distribution is recomputed from it on the fly:
storing [steps, vocab] targets would not fit). `layer_metrics` scores heads against that teacher.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import hf
from .backbone import Backbone
from .config import GenerationConfig
from .generate import generate
from .heads import ExitHeads
from .progress import Progress
from .sources import PromptItem


@dataclass
class Labels:
    """Teacher-forced states of generated steps. M rows, one per generated step."""

    layers: list[int]
    hidden: torch.Tensor  # [len(layers), M, H] state after each requested layer
    final: torch.Tensor  # [M, H] last layer, after the final norm
    speech: torch.Tensor  # [M] bool: the step was a speech step
    tokens: torch.Tensor  # [M] token the full model produced
    example: torch.Tensor  # [M] index of the prompt the row came from
    # [M] bool: the row is a generated step (with context=True the prompt's positions come too,
    # as the context an adapter head attends over; they are never targets). None: every row
    target: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.final.shape[0]

    def select(self, rows: torch.Tensor) -> Labels:
        return Labels(
            self.layers,
            self.hidden[:, rows],
            self.final[rows],
            self.speech[rows],
            self.tokens[rows],
            self.example[rows],
            None if self.target is None else self.target[rows],
        )

    def only_layers(self, layers: list[int]) -> Labels:
        idx = [self.layers.index(L) for L in layers]
        return Labels(
            list(layers), self.hidden[idx], self.final, self.speech, self.tokens, self.example, self.target
        )

    def targets(self) -> torch.Tensor:
        return torch.ones_like(self.speech) if self.target is None else self.target

    def speech_rows(self) -> Labels:
        return self.select((self.speech & self.targets()).nonzero().squeeze(1))

    def target_rows(self) -> Labels:
        return self if self.target is None else self.select(self.target.nonzero().squeeze(1))

    def sequences(self) -> list[slice]:
        """The rows of each example, in order (labels made with context=True: whole sequences)."""
        ex = self.example.tolist()
        cuts = [0] + [i for i in range(1, len(ex)) if ex[i] != ex[i - 1]] + [len(ex)]
        return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]

    def layer(self, layer: int) -> torch.Tensor:
        return self.hidden[self.layers.index(layer)]

    def save(self, path: Path, meta: dict[str, str]) -> None:
        t = {k: getattr(self, k).contiguous() for k in ("hidden", "final", "speech", "tokens", "example")}
        if self.target is not None:
            t["target"] = self.target.contiguous()
        save_file(t, str(path), metadata={**meta, "layers": json.dumps(self.layers)})

    @classmethod
    def load(cls, path: Path) -> tuple[Labels, dict]:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(json.loads(meta["layers"]), **t), meta

    @classmethod
    def cat(cls, parts: list[Labels]) -> Labels:
        return cls(
            parts[0].layers,
            torch.cat([p.hidden for p in parts], 1),
            torch.cat([p.final for p in parts]),
            torch.cat([p.speech for p in parts]),
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.example for p in parts]),
            None if parts[0].target is None else torch.cat([p.target for p in parts]),
        )


def collect_labels(
    bb: Backbone,
    prompts: list[PromptItem],
    cfg_for: Callable[[PromptItem], GenerationConfig],
    layers: list[int],
    indices: list[int] | None = None,
    desc: str = "labels",
    batch_size: int = 1,
    context: bool = False,
) -> Labels:
    """Full-depth generation, then one teacher-forced pass per prompt keeping the requested layers.

    `cfg_for(item)` gives each prompt its decoding (a prompt may fix its own interleave format);
    `indices` are the prompt numbers recorded in `Labels.example` (default 0..n-1). Generation
    decodes `batch_size` prompts together (generate_batch: the same tokens as one by one).
    `context`: keep the prompt's positions too (not targets), for heads that attend (adapters).
    """
    parts = []
    indices = indices if indices is not None else list(range(len(prompts)))
    results = _generate_all(bb, prompts, cfg_for, batch_size, desc)
    for n, item, res in zip(indices, prompts, results, strict=True):
        seq = item.ids + res.tokens[:-1]  # step k fed position len(prompt) - 1 + k
        with torch.inference_mode():
            hs = hf.all_hidden_states(bb.model, torch.tensor([seq], device=bb.device))
        P = len(item.ids)
        first = 0 if context else P - 1  # hs[L]: after L layers; hs[-1] already normalised
        rows = slice(first, len(seq))
        pad = P - 1 - first  # prompt positions kept as context
        speech = [False] * pad + [m == "speech" for m in res.modalities]
        parts.append(
            Labels(
                layers,
                torch.stack([hs[layer][0, rows].float().cpu() for layer in layers]),
                hs[-1][0, rows].float().cpu(),
                torch.tensor(speech),
                torch.tensor(seq[first + 1 : P] + res.tokens),
                torch.full((len(seq) - first,), n),
                torch.tensor([False] * pad + [True] * len(res.tokens)) if context else None,
            )
        )
    return Labels.cat(parts)


class _Generated(NamedTuple):
    tokens: list[int]
    modalities: list[str]


def _generate_all(bb: Backbone, prompts: list[PromptItem], cfg_for, batch_size: int, desc: str) -> list:
    """Every prompt's generation, `batch_size` at a time; prompts with another config decode apart."""
    from .generate import generate_batch

    results: list = [None] * len(prompts)
    with Progress(total=len(prompts), desc=desc, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            groups: dict[str, list[int]] = {}
            for k in range(start, min(start + batch_size, len(prompts))):
                groups.setdefault(repr(cfg_for(prompts[k])), []).append(k)
            for members in groups.values():
                cfg = cfg_for(prompts[members[0]])
                if len(members) == 1:
                    out = [generate(bb, prompts[members[0]].ids, cfg)]
                else:
                    out = generate_batch(bb, [prompts[k].ids for k in members], cfg)
                for k, res in zip(members, out, strict=True):
                    # only what labelling reads: a result holds its batch's whole KV cache
                    results[k] = _Generated(res.tokens, res.modalities)
                bar.update(len(members))
    return results


def teacher_logits(bb: Backbone, final: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return bb.project(final.to(bb.dtype), token_ids).float()


def layer_metrics(bb: Backbone, heads: ExitHeads, labels: Labels, batch: int = 512) -> dict[int, dict]:
    """Per layer: KL(last || head) in nats and top-1 agreement, over all rows and split by modality.

    A head restricted to a token set is scored within that set (the teacher too). An adapter is
    run over whole sequences (labels made with context=True) and scored on their target rows."""
    if heads.attends:
        return _attending_metrics(bb, heads, labels)
    sums: dict[int, dict[str, float]] = {L: {} for L in labels.layers}
    for i in range(0, len(labels), batch):
        sl = slice(i, i + batch)
        t = teacher_logits(bb, labels.final[sl], heads.token_ids)
        logp_t = t.log_softmax(-1)
        top_t = t.argmax(-1)
        sp = labels.speech[sl]
        for L in labels.layers:
            with torch.no_grad():
                s = heads(L, labels.layer(L)[sl].to(bb.dtype)).float()
            logq = s.log_softmax(-1)
            kl = (logp_t.exp() * (logp_t - logq)).sum(-1)
            agree = (s.argmax(-1) == top_t).float()
            _accumulate(sums[L], kl, agree, sp)
    return _rows(sums)


def adapter_logits_of(bb: Backbone, heads: ExitHeads, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Adapter logits over sequences: hidden [B, T, H] (right-padded) -> [B, T, out] (causal, so
    padding after a sequence never reaches its rows)."""
    B, T = hidden.shape[:2]
    pids = torch.arange(T, device=hidden.device)[None].expand(B, T)
    out = heads.adapter_layer(layer, hidden, None, pids, bb.rope(hidden, pids), None)
    return heads.adapter_logits(layer, out)


def pad_sequences(x: torch.Tensor, spans: list[slice]) -> torch.Tensor:
    """Rows of `x` ([M, ...]) grouped by span, right-padded with zeros: [len(spans), T, ...]."""
    T = max(s.stop - s.start for s in spans)
    out = x.new_zeros(len(spans), T, *x.shape[1:])
    for i, s in enumerate(spans):
        out[i, : s.stop - s.start] = x[s]
    return out


def _attending_metrics(bb: Backbone, heads: ExitHeads, labels: Labels, batch: int = 16) -> dict[int, dict]:
    sums: dict[int, dict[str, float]] = {L: {} for L in labels.layers}
    spans = labels.sequences()
    tgt = labels.targets()
    for i in range(0, len(spans), batch):
        group = spans[i : i + batch]
        valid = pad_sequences(tgt, group)  # [B, T]
        t = teacher_logits(bb, pad_sequences(labels.final, group)[valid], heads.token_ids)
        logp_t = t.log_softmax(-1)
        sp = pad_sequences(labels.speech, group)[valid]
        for L in labels.layers:
            with torch.no_grad():
                h = pad_sequences(labels.layer(L), group).to(bb.dtype)
                s = adapter_logits_of(bb, heads, L, h).float()[valid]
            logq = s.log_softmax(-1)
            kl = (logp_t.exp() * (logp_t - logq)).sum(-1)
            agree = (s.argmax(-1) == t.argmax(-1)).float()
            _accumulate(sums[L], kl, agree, sp)
    return _rows(sums)


def _accumulate(acc: dict[str, float], kl: torch.Tensor, agree: torch.Tensor, sp: torch.Tensor) -> None:
    for name, mask in (("all", torch.ones_like(sp)), ("speech", sp), ("text", ~sp)):
        acc[f"kl_{name}"] = acc.get(f"kl_{name}", 0.0) + float(kl[mask].sum())
        acc[f"agree_{name}"] = acc.get(f"agree_{name}", 0.0) + float(agree[mask].sum())
        acc[f"n_{name}"] = acc.get(f"n_{name}", 0.0) + float(mask.sum())


def _rows(sums: dict[int, dict[str, float]]) -> dict[int, dict]:
    out = {}
    for L, acc in sums.items():
        row = {}
        for name in ("all", "speech", "text"):
            n = acc.get(f"n_{name}", 0.0)
            row[f"kl_{name}"] = acc[f"kl_{name}"] / n if n else None
            row[f"agree_{name}"] = acc[f"agree_{name}"] / n if n else None
            row[f"n_{name}"] = int(n)
        out[L] = row
    return out
