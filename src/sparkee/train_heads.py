"""Train layer-specific exit heads by distillation from the frozen backbone (METHOD.md section 2).

1. Pseudo-labels (labels.py): full-depth generation on each prompt with the model's default decoding, then one
   teacher-forced pass over the generated sequence keeps, for every generated step, the hidden
   state at each requested layer and the last layer's (normalised) state, from which the teacher
   distribution is recomputed on the fly (storing [steps, vocab] targets would not fit).
2. Distillation: every requested layer's head is trained with soft-target cross-entropy against the
   last layer's distribution (= KL up to a constant), all layers in one run, backbone frozen.

Runs the same under `accelerate launch`: prompts are sharded across processes for labelling and
the heads are trained data-parallel (gradients averaged by DDP). Both stages resume after an
interruption from files in the work directory (safetensors only), keyed on every setting that
made them. The learning rate follows transformers' cosine schedule with linear warm-up.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .backbone import Backbone
from .config import GenerationConfig
from .errors import SparkeeError
from .heads import ExitHeads
from .labels import Labels, adapter_logits_of, collect_labels, layer_metrics, pad_sequences, teacher_logits
from .progress import Progress
from .sources import PromptItem, prompts_digest

WARMUP_STEPS = 20


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


def check_training(
    steps: int, batch_size: int, lr: float, val_fraction: float, stop_after: int | None = None
) -> None:
    """Refuse numbers that cannot describe a training run, before any labelling is paid for."""
    if steps < 1:
        raise SparkeeError(f"--steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise SparkeeError(f"--train-batch-size must be at least 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise SparkeeError(f"--lr must be a positive number, got {lr}")
    if not 0 < val_fraction < 1:
        raise SparkeeError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if stop_after is not None and stop_after < 1:
        raise SparkeeError(f"--stop-after must be at least 1, got {stop_after}")


def lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' linear warm-up then cosine decay to zero, as a pure function of the step.

    Taken from a scheduler on a throwaway optimizer: the real optimizer's learning rate is set
    from the step at every step, so a resumed run follows exactly the schedule of a straight one.
    """
    from transformers import get_cosine_schedule_with_warmup

    scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_cosine_schedule_with_warmup(scratch, warmup, total).lr_lambdas[0]


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


class AdapterLoss(torch.nn.Module):
    """Adapter heads over whole sequences: soft-target cross-entropy on the target rows."""

    def __init__(self, bb: Backbone, heads: ExitHeads):
        super().__init__()
        self.heads = heads
        self.bb = bb  # not a submodule: frozen

    def forward(self, hidden: torch.Tensor, target_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # hidden: [layers, B, T, H] right-padded; target_logp: [n, V'] for the n True cells of valid [B, T]
        p = target_logp.exp()
        loss = 0.0
        for j, L in enumerate(self.heads.layers):
            logq = adapter_logits_of(self.bb, self.heads, L, hidden[j]).float()[valid].log_softmax(-1)
            loss = loss + -(p * logq).sum(-1).mean()
        return loss / len(self.heads.layers)


def _save_state(path: Path, heads: ExitHeads, opt: torch.optim.Optimizer, step: int, key: str) -> None:
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.per_layer.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, val in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(val).cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    meta = {"step": str(step), "key": key, "param_groups": json.dumps(sd["param_groups"])}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: an interruption never leaves half a checkpoint


def _load_state(path: Path, heads: ExitHeads, opt: torch.optim.Optimizer, key: str) -> int:
    """The step a saved run reached (0 when the file holds a run with other settings)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("key") != key:
            _note(f"{path.name} holds training with other settings; training afresh")
            return 0
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
    state_key: str = "",
) -> bool:
    """Train `heads` in place. Rows are drawn in a seeded order that a resumed run reproduces
    (for adapter heads, whole sequences: `batch_size` of them per step, loss on target rows).

    `stop_after`: run at most that many steps now, checkpoint, and return False (for time-boxed or
    preemptible jobs; rerun to continue). Returns True once all `steps` are done.
    """
    if heads.kind == "logit-lens":
        raise SparkeeError("a logit lens has no weights to train: use --head tuned-lens or --head full")
    if len(train) == 0:
        raise SparkeeError("no training rows: the prompts produced no steps of the chosen token set")
    bb.model.requires_grad_(False)
    heads.train()
    module = AdapterLoss(bb, heads) if heads.attends else DistillLoss(heads)
    spans = train.sequences() if heads.attends else None
    n_units = len(spans) if spans is not None else len(train)
    # an adapter learns from speech rows only when its heads are restricted to the speech set
    learn = train.targets() & (train.speech if heads.token_ids is not None else True)
    opt = torch.optim.AdamW(heads.per_layer.parameters(), lr=lr, weight_decay=0.0)

    factor = lr_factor(min(WARMUP_STEPS, max(1, steps // 10)), steps)
    if accelerator is not None:
        module, opt = accelerator.prepare(module, opt)
    raw_opt = opt.optimizer if hasattr(opt, "optimizer") else opt  # accelerate wraps it
    start = 0
    if state_path is not None and state_path.is_file():
        start = _load_state(state_path, heads, raw_opt, state_key)
    is_main = accelerator is None or accelerator.is_main_process
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n_units // batch_size)
    order = None
    end = steps if stop_after is None else min(steps, start + stop_after)
    bar = Progress(range(start, end), desc="train heads", initial=start, total=steps, enabled=is_main)
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if order is None or k == 0 or step == start:
            gen.manual_seed(seed * 100003 + epoch)
            order = torch.randperm(n_units, generator=gen)
        rows = order[k * batch_size : (k + 1) * batch_size]
        if spans is None:
            hidden = train.hidden[:, rows].to(bb.dtype)
            target = teacher_logits(bb, train.final[rows], heads.token_ids).log_softmax(-1)
            loss = module(hidden, target)
        else:
            group = [spans[i] for i in rows.tolist()]
            valid = pad_sequences(learn, group)
            hidden = torch.stack([pad_sequences(train.layer(L), group) for L in train.layers]).to(bb.dtype)
            final = pad_sequences(train.final, group)[valid]
            target = teacher_logits(bb, final, heads.token_ids).log_softmax(-1)
            loss = module(hidden, target, valid)
        for group in opt.param_groups:
            group["lr"] = lr * factor(step)
        opt.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        opt.step()
        if is_main:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if state_path is not None and is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
            _save_state(state_path, heads, raw_opt, step + 1, state_key)
    heads.eval()
    return end == steps


def _labels_cached(path: Path, key: str, make: Callable[[], Labels]) -> Labels:
    """Reuse labels saved by an interrupted run only when they were made from the same inputs."""
    if path.is_file():
        labels, saved = Labels.load(path)
        if saved.get("key") == key:
            return labels
        _note(f"{path.name} was made with other settings; labelling afresh")
    labels = make()
    tmp = path.with_suffix(".tmp")
    labels.save(tmp, {"key": key})
    tmp.replace(path)
    return labels


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    cfg_for: Callable[[PromptItem], GenerationConfig] | None = None,
    stop_after: int | None = None,
    label_batch_size: int = 1,
) -> dict:
    """Label, distill, validate, save. Returns the validation metrics (also saved beside the heads).

    The work directory is keyed on everything that makes the labels (model, prompts, decoding,
    layers, split) and the heads (those plus head kind, token set, steps, batch size, learning
    rate): files made with other settings are never reused, they are made afresh.
    """
    from accelerate import Accelerator

    from .profiles import config_json

    check_training(steps, batch_size, lr, val_fraction, stop_after)
    acc = Accelerator(cpu=bb.device.type == "cpu")
    rank, world = acc.process_index, acc.num_processes
    work = work_dir or out.with_name(out.stem + ".work")
    if work.exists() and not work.is_dir():
        raise SparkeeError(f"work directory '{work}' is a file; give --work-dir a directory")
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(prompts), generator=g).tolist()
    n_val = max(1, round(val_fraction * len(prompts))) if len(prompts) > 1 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    cfg_for = cfg_for or (lambda item: gen_cfg)
    attends = kind == "adapter"  # adapters learn over whole sequences, prompts included

    def label(idx: list[int], desc: str) -> Labels:
        if not idx:
            raise SparkeeError(
                f"too few prompts ({len(prompts)}) for a validation split and {world} process(es)"
            )
        return collect_labels(
            bb,
            [prompts[i] for i in idx],
            cfg_for,
            layers,
            indices=idx,
            desc=desc,
            batch_size=label_batch_size,
            context=attends,
        )

    # per-item configs derive from gen_cfg and the item's metadata, which the digest covers
    made_from = (bb.fingerprint(), prompts_digest(prompts), config_json(gen_cfg), layers, seed, val_fraction)
    made_from += ("context",) if attends else ()  # labels with the prompt's positions
    mine = train_idx[rank::world]  # prompts are sharded across processes
    train = _labels_cached(
        work / f"labels-train-{rank}of{world}.safetensors",
        _key(*made_from, "train", rank, world),
        lambda: label(mine, f"labels[{rank}]"),
    )
    if token_ids is not None and not attends:
        train = train.speech_rows()
    if attends and not bool(train.targets().any()):
        raise SparkeeError("no training rows: the prompts produced no generated steps")
    heads = ExitHeads(bb, kind, layers, token_ids)
    token_set = None if token_ids is None else heads.token_ids.tolist()
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
        state_key=_key(*made_from, rank, world, kind, token_set, steps, batch_size, lr),
    )
    acc.wait_for_everyone()
    if not done:
        return {}
    metrics: dict = {}
    if acc.is_main_process:
        val = _labels_cached(
            work / "labels-val.safetensors", _key(*made_from, "val"), lambda: label(val_idx, "val labels")
        )
        if attends:  # scored on every generated step, or the speech ones for a speech token set
            val_rows = val.speech_rows() if token_ids is not None else val.target_rows()
            if token_ids is not None:
                val.target = val.targets() & val.speech
        else:
            val = val_rows = val.speech_rows() if token_ids is not None else val
        lens = ExitHeads(bb, "logit-lens", layers, token_ids)
        metrics = {
            "heads": {str(k): v for k, v in layer_metrics(bb, heads, val).items()},
            "logit_lens": {str(k): v for k, v in layer_metrics(bb, lens, val_rows).items()},
            "train_rows": int((train.targets() & (train.speech if token_ids is not None else True)).sum())
            * world,
            "val_rows": len(val_rows),
            "val_prompts": len(val_idx),
            "train_prompts": len(train_idx),
        }
        heads.save(out, {"source": source_name, "steps": str(steps)})
        out.with_name(out.stem + ".metrics.json").write_text(json.dumps(metrics, indent=1))
    acc.wait_for_everyone()
    return metrics
