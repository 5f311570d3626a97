"""Train layer-specific exit heads by distillation from the frozen backbone (METHOD.md section 2).

1. Pseudo-labels: full-depth generation on each prompt with the model's default decoding, then one
   teacher-forced pass over the generated sequence keeps, for every generated step, the hidden
   state at each requested layer and the last layer's (normalised) state, from which the teacher
   distribution is recomputed on the fly (storing [steps, vocab] targets would not fit).
2. Distillation: every requested layer's head is trained with soft-target cross-entropy against the
   last layer's distribution (= KL up to a constant), all layers in one run, backbone frozen.

Runs the same under `accelerate launch`: prompts are sharded across processes for labelling and
the heads are trained data-parallel (gradients averaged by DDP). Both stages resume after an
interruption from files in the work directory (safetensors only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .backbone import Backbone
from .errors import SparkeeError
from .generate import GenerationConfig, generate
from .heads import ExitHeads
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
        )

    def layer(self, layer: int) -> torch.Tensor:
        return self.hidden[self.layers.index(layer)]

    def save(self, path: Path, meta: dict[str, str]) -> None:
        t = {k: getattr(self, k).contiguous() for k in ("hidden", "final", "speech", "tokens", "example")}
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
        )


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'all' -> 1..N-1; '12,14,16' or '4:12' (half-open) -> those layers, checked against the model."""
    t = text.strip().lower()
    if t == "all":
        return list(range(1, num_layers))
    try:
        if ":" in t:
            a, b = (int(x) for x in t.split(":"))
            layers = list(range(a, b))
        else:
            layers = [int(x) for x in t.split(",") if x.strip()]
    except ValueError:
        raise SparkeeError(
            f"--layers must be 'all', a list like 12,14,16 or a range like 4:12, got '{text}'"
        ) from None
    bad = [x for x in layers if not 1 <= x < num_layers]
    if not layers or bad:
        raise SparkeeError(
            f"layer {bad[0] if bad else text} is out of range: this model has {num_layers} layers, so use 1..{num_layers - 1}"
        )
    return sorted(set(layers))


def collect_labels(
    bb: Backbone,
    prompts: list[PromptItem],
    cfg_for: Callable[[PromptItem], GenerationConfig],
    layers: list[int],
    indices: list[int] | None = None,
    desc: str = "labels",
) -> Labels:
    """Full-depth generation, then one teacher-forced pass per prompt keeping the requested layers.

    `cfg_for(item)` gives each prompt its decoding (a prompt may fix its own interleave format);
    `indices` are the prompt numbers recorded in `Labels.example` (default 0..n-1).
    """
    parts = []
    indices = indices if indices is not None else list(range(len(prompts)))
    for n, item in zip(indices, tqdm(prompts, desc=desc, leave=False), strict=True):
        res = generate(bb, item.ids, cfg_for(item))
        seq = item.ids + res.tokens[:-1]  # step k fed position len(prompt) - 1 + k
        with torch.inference_mode():
            out = bb.model(torch.tensor([seq], device=bb.device), output_hidden_states=True, use_cache=False)
        rows = slice(len(item.ids) - 1, len(seq))
        hs = out.hidden_states  # hs[L] = state after L layers; hs[-1] is already normalised
        parts.append(
            Labels(
                layers,
                torch.stack([hs[layer][0, rows].float().cpu() for layer in layers]),
                hs[-1][0, rows].float().cpu(),
                torch.tensor([m == "speech" for m in res.modalities]),
                torch.tensor(res.tokens),
                torch.full((len(res.tokens),), n),
            )
        )
    return Labels.cat(parts)


def teacher_logits(bb: Backbone, final: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return bb.project(final.to(bb.dtype), token_ids).float()


def layer_metrics(bb: Backbone, heads: ExitHeads, labels: Labels, batch: int = 512) -> dict[int, dict]:
    """Per layer: KL(last || head) in nats and top-1 agreement, over all rows and split by modality."""
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
            acc = sums[L]
            for name, mask in (("all", torch.ones_like(sp)), ("speech", sp), ("text", ~sp)):
                acc[f"kl_{name}"] = acc.get(f"kl_{name}", 0.0) + float(kl[mask].sum())
                acc[f"agree_{name}"] = acc.get(f"agree_{name}", 0.0) + float(agree[mask].sum())
                acc[f"n_{name}"] = acc.get(f"n_{name}", 0.0) + float(mask.sum())
    out = {}
    for L, acc in sums.items():
        row = {}
        for name in ("all", "speech", "text"):
            n = acc[f"n_{name}"]
            row[f"kl_{name}"] = acc[f"kl_{name}"] / n if n else None
            row[f"agree_{name}"] = acc[f"agree_{name}"] / n if n else None
            row[f"n_{name}"] = int(n)
        out[L] = row
    return out


class DistillLoss(torch.nn.Module):
    """All layers' soft-target cross-entropy in one forward, so DDP sees every parameter used."""

    def __init__(self, heads: ExitHeads):
        super().__init__()
        self.heads = heads

    def forward(self, hidden: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
        # hidden: [layers, B, H]; target_logp: [B, V'] teacher log-probabilities
        p = target_logp.exp()
        loss = 0.0
        for j, L in enumerate(self.heads.layers):
            loss = loss + -(p * self.heads(L, hidden[j]).float().log_softmax(-1)).sum(-1).mean()
        return loss / len(self.heads.layers)


def _save_state(path: Path, heads: ExitHeads, opt: torch.optim.Optimizer, step: int) -> None:
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.per_layer.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, val in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(val).cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "param_groups": json.dumps(sd["param_groups"])})
    tmp.replace(path)  # atomic: an interruption never leaves half a checkpoint


def _load_state(path: Path, heads: ExitHeads, opt: torch.optim.Optimizer) -> int:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    heads.per_layer.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("heads.")})
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


def distill(
    bb: Backbone,
    heads: ExitHeads,
    train: Labels,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    state_path: Path | None = None,
    checkpoint_every: int = 100,
    accelerator=None,
    stop_after: int | None = None,
) -> bool:
    """Train `heads` in place. Rows are drawn in a seeded order that a resumed run reproduces.

    `stop_after`: run at most that many steps now, checkpoint, and return False (for time-boxed or
    preemptible jobs; rerun to continue). Returns True once all `steps` are done.
    """
    if heads.kind == "logit-lens":
        raise SparkeeError("a logit lens has no weights to train: use --head tuned-lens or --head full")
    if len(train) == 0:
        raise SparkeeError("no training rows: the prompts produced no steps of the chosen token set")
    bb.model.requires_grad_(False)
    heads.train()
    module = DistillLoss(heads)
    opt = torch.optim.AdamW(heads.per_layer.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(
        step: int,
    ) -> float:  # short warm-up, then cosine to zero; a function of the step, so resumes match
        return lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))

    if accelerator is not None:
        module, opt = accelerator.prepare(module, opt)
    start = 0
    if state_path is not None and state_path.is_file():
        start = _load_state(state_path, heads, opt.optimizer if hasattr(opt, "optimizer") else opt)
    is_main = accelerator is None or accelerator.is_main_process
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(train) // batch_size)
    order = None
    end = steps if stop_after is None else min(steps, start + stop_after)
    bar = tqdm(range(start, end), desc="train heads", initial=start, total=steps, disable=not is_main)
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if order is None or k == 0 or step == start:
            gen.manual_seed(seed * 100003 + epoch)
            order = torch.randperm(len(train), generator=gen)
        rows = order[k * batch_size : (k + 1) * batch_size]
        hidden = train.hidden[:, rows].to(bb.dtype)
        target = teacher_logits(bb, train.final[rows], heads.token_ids).log_softmax(-1)
        loss = module(hidden, target)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        opt.step()
        if is_main:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if state_path is not None and is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
            _save_state(state_path, heads, opt.optimizer if hasattr(opt, "optimizer") else opt, step + 1)
    heads.eval()
    return end == steps


def _labels_cached(path: Path, meta: dict[str, str], make) -> Labels:
    """Reuse labels saved by an interrupted run when they were made from the same inputs."""
    if path.is_file():
        labels, saved = Labels.load(path)
        if all(saved.get(k) == v for k, v in meta.items()):
            return labels
    labels = make()
    tmp = path.with_suffix(".tmp")
    labels.save(tmp, meta)
    tmp.replace(path)
    return labels


def run_training(
    bb: Backbone,
    prompts: list[PromptItem],
    gen_cfg: GenerationConfig,
    layers: list[int],
    kind: str,
    token_ids: torch.Tensor | None,
    out: Path,
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    val_fraction: float = 0.1,
    work_dir: Path | None = None,
    source_name: str = "",
    cfg_for=None,
    stop_after: int | None = None,
) -> dict:
    """Label, distill, validate, save. Returns the validation metrics (also saved beside the heads)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=bb.device.type == "cpu")
    rank, world = acc.process_index, acc.num_processes
    work = work_dir or out.with_name(out.stem + ".work")
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(prompts), generator=g).tolist()
    n_val = max(1, round(val_fraction * len(prompts))) if len(prompts) > 1 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    cfg_for = cfg_for or (lambda item: gen_cfg)

    def label(idx: list[int], desc: str) -> Labels:
        if not idx:
            raise SparkeeError(
                f"too few prompts ({len(prompts)}) for a validation split and {world} process(es)"
            )
        return collect_labels(bb, [prompts[i] for i in idx], cfg_for, layers, indices=idx, desc=desc)

    meta = {
        "fingerprint": bb.fingerprint(),
        "source": source_name,
        "layers": json.dumps(layers),
        "seed": str(seed),
    }
    mine = train_idx[rank::world]  # prompts are sharded across processes
    train = _labels_cached(
        work / f"labels-train-{rank}of{world}.safetensors",
        meta | {"n": str(len(mine))},
        lambda: label(mine, f"labels[{rank}]"),
    )
    if token_ids is not None:
        train = train.select(train.speech.nonzero().squeeze(1))
    heads = ExitHeads(bb, kind, layers, token_ids)
    # labels are shared by every head trained from the same prompts; training state is not
    state = work / f"train-state-{kind}-{'speech' if token_ids is not None else 'all'}.safetensors"
    done = distill(
        bb,
        heads,
        train,
        steps,
        batch_size,
        lr,
        seed,
        state_path=state,
        accelerator=acc,
        stop_after=stop_after,
    )
    acc.wait_for_everyone()
    if not done:
        return {}
    metrics: dict = {}
    if acc.is_main_process:
        val = _labels_cached(
            work / "labels-val.safetensors",
            meta | {"n": str(len(val_idx))},
            lambda: label(val_idx, "val labels"),
        )
        if token_ids is not None:
            val = val.select(val.speech.nonzero().squeeze(1))
        lens = ExitHeads(bb, "logit-lens", layers, token_ids)
        metrics = {
            "heads": {str(k): v for k, v in layer_metrics(bb, heads, val).items()},
            "logit_lens": {str(k): v for k, v in layer_metrics(bb, lens, val).items()},
            "train_rows": len(train) * world,
            "val_rows": len(val),
            "val_prompts": len(val_idx),
            "train_prompts": len(train_idx),
        }
        heads.save(out, {"source": source_name, "steps": str(steps)})
        out.with_name(out.stem + ".metrics.json").write_text(json.dumps(metrics, indent=1))
    acc.wait_for_everyone()
    return metrics
