"""Train the reference interleaved SLM from scratch (HF ``Qwen2ForCausalLM``).

One model is trained on both sequence formats (``padded`` and ``early-stop``), selected by the
format tag at the end of the prompt. The loss covers answer tokens only. Training is seeded and
resumable (``--out/checkpoint/``), the LR schedule is linear warm-up then cosine decay to 5% of
the peak (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``). With ``--max-minutes``
the schedule runs on the fraction of the time budget used (or of ``--steps``, whichever is further
along), so a CPU shared with other jobs still ends the schedule on time; without it the schedule
runs over ``--steps``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import ASSET_DIR
from .data import (
    DEFAULT_RATIO,
    FORMATS,
    QAExample,
    answer_text_from_tokens,
    build_answer,
    build_prompt,
    build_sequence,
    contains_answer,
    load_split,
    speech_units_from_tokens,
)
from .units import load_lexicon
from .vocab import RefVocab


def make_config(vocab: RefVocab, tiny: bool = False, layers: int = 16, hidden: int = 192):
    from transformers import Qwen2Config

    if tiny:
        layers, hidden = 2, 32
    return Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        attention_dropout=0.0,
        use_cache=True,
    )


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def _category_weights(examples: Sequence[QAExample]) -> np.ndarray:
    counts = Counter(ex.category for ex in examples)
    w = np.array([1.0 / math.sqrt(counts[ex.category]) for ex in examples])
    return w / w.sum()


def make_batches(examples, weights, vocab, step: int, seed: int, batch_size: int, ratio, n_groups: int = 1):
    """``n_groups`` length-sorted batches for one step (deterministic in (seed, step))."""
    rng = np.random.default_rng([seed, step])
    n = batch_size * n_groups
    idx = rng.choice(len(examples), size=n, p=weights)
    seqs = []
    for k, i in enumerate(idx):
        fmt = FORMATS[int(rng.integers(2))]
        p, a, _ = build_sequence(examples[i], vocab, fmt, ratio, seed=int(rng.integers(2**31)) + k)
        seqs.append((p, a))
    seqs.sort(key=lambda s: len(s[0]) + len(s[1]))
    out = []
    for g in range(n_groups):
        out.append(collate(seqs[g * batch_size : (g + 1) * batch_size], vocab.pad_id))
    return out


def collate(seqs, pad_id: int):
    L = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, (p, a) in enumerate(seqs):
        s = p + a
        ids[r, : len(s)] = torch.tensor(s)
        labels[r, len(p) : len(s)] = torch.tensor(a)
        mask[r, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_schedule(total: int, warmup: int, final_frac: float = 0.05) -> Callable[[float], float]:
    """The LR factor at a (possibly fractional) step: linear warm-up, then cosine to `final_frac`.

    transformers' schedule, taken from a scheduler on a throwaway optimizer: the real optimizer's
    learning rate is set from the position at every step, so a resumed run follows the schedule
    of a straight one. Positions past `total` stay at the end of the schedule."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_cosine_with_min_lr_schedule_with_warmup(
        scratch, warmup, total, min_lr_rate=final_frac
    ).lr_lambdas[0]
    return lambda pos: factor(min(pos, total))


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, vocab, examples, fmt, batch_size: int = 32, max_new_tokens: int = 200):
    """Full-depth greedy HF ``generate`` (left-padded batches); returns answer token lists."""
    model.eval()
    outs: list[list[int]] = []
    for b in range(0, len(examples), batch_size):
        prompts = [build_prompt(ex, vocab, fmt) for ex in examples[b : b + batch_size]]
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), vocab.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), L), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, L - len(p) :] = torch.tensor(p)
            mask[r, L - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=vocab.eos_id,
            pad_token_id=vocab.pad_id,
        )
        for r in range(len(prompts)):
            seq = gen[r, L:].tolist()
            if vocab.eos_id in seq:
                seq = seq[: seq.index(vocab.eos_id) + 1]
            outs.append(seq)
    return outs


def score_outputs(outputs, examples, vocab, lexicon=None) -> dict:
    """Text accuracy, speech-transcript accuracy (lexicon decoder) and alignment WER (the one
    scorer's rule, scoring.py: answers without text are left out of the WER)."""
    from ..scoring import wer as alignment_wer
    from .lexicon import LexiconDecoder

    dec = LexiconDecoder(vocab, lexicon or load_lexicon())
    text_ok = speech_ok = stopped = 0
    refs, hyps, rows = [], [], []
    for seq, ex in zip(outputs, examples, strict=True):
        text = answer_text_from_tokens(seq, vocab)
        speech = dec.decode(speech_units_from_tokens(seq, vocab))
        t_ok, s_ok = contains_answer(text, ex.accepted), contains_answer(speech, ex.accepted)
        text_ok += t_ok
        speech_ok += s_ok
        stopped += bool(seq) and seq[-1] == vocab.eos_id
        refs.append(text)
        hyps.append(speech)
        rows.append(
            {
                "id": ex.id,
                "category": ex.category,
                "text": text,
                "speech": speech,
                "text_ok": t_ok,
                "speech_ok": s_ok,
            }
        )
    n = max(1, len(examples))
    wer = alignment_wer(refs, hyps) if examples else None
    by_cat: dict[str, list[int]] = {}
    for r in rows:
        c = by_cat.setdefault(r["category"], [0, 0])
        c[0] += r["text_ok"]
        c[1] += 1
    return {
        "n": len(examples),
        "text_acc": text_ok / n,
        "speech_acc": speech_ok / n,
        "alignment_wer": wer,
        "stopped": stopped / n,
        "mean_answer_tokens": float(np.mean([len(s) for s in outputs])) if outputs else 0.0,
        "text_acc_by_category": {k: v[0] / v[1] for k, v in sorted(by_cat.items())},
        "errors": [r for r in rows if not (r["text_ok"] and r["speech_ok"])][:10],
    }


def evaluate(
    model, vocab, examples, formats=FORMATS, batch_size: int = 32, max_new_tokens: int = 200
) -> dict:
    res = {}
    for fmt in formats:
        t0 = time.time()
        outs = generate_answers(model, vocab, examples, fmt, batch_size, max_new_tokens)
        res[fmt] = score_outputs(outs, examples, vocab)
        res[fmt]["seconds"] = round(time.time() - t0, 1)
    return res


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def sequence_length_stats(examples, vocab, ratio) -> dict:
    stats = {}
    for fmt in FORMATS:
        pl, al, sp, tx = [], [], [], []
        for ex in examples:
            p = build_prompt(ex, vocab, fmt)
            a, m = build_answer(ex, vocab, fmt, ratio)
            pl.append(len(p))
            al.append(len(a))
            sp.append(m.count("speech"))
            tx.append(m.count("text"))
        stats[fmt] = {
            "prompt_mean": float(np.mean(pl)),
            "answer_mean": float(np.mean(al)),
            "answer_max": int(np.max(al)),
            "answer_speech_steps_mean": float(np.mean(sp)),
            "answer_text_steps_mean": float(np.mean(tx)),
        }
    stats["early_stop_vs_padded_answer_length"] = (
        stats["early-stop"]["answer_mean"] / stats["padded"]["answer_mean"]
    )
    return stats


def refslm_meta(vocab: RefVocab, ratio) -> dict:
    s, e = vocab.speech_range
    return {
        "interleave_ratio": {"text": ratio[0], "speech": ratio[1]},
        "formats": {
            f: {"tag": vocab.format_tag_id(f), "tag_token": vocab.token(vocab.format_tag_id(f))}
            for f in FORMATS
        },
        "speech_range": [s, e],
        "silence_id": vocab.silence_id,
        "stop_id": vocab.eos_id,
        "text_end_id": vocab.eot_id,
        "pad_id": vocab.pad_id,
        "bos_id": vocab.bos_id,
        "user_id": vocab.id("<user>"),
        "assistant_id": vocab.id("<assistant>"),
        "word_range": list(vocab.word_range),
        "vocab_size": len(vocab),
        "prompt_format": "<bos> <user> [question speech units] <assistant> <fmt_tag>",
    }


def save_model_dir(
    model, vocab: RefVocab, out_dir: Path, ratio, report: dict | None = None, dtype=torch.float16
):
    """Write the shippable model directory (fp16 safetensors + vocab, tokenizer, lexicon, meta)."""
    import copy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(dtype)
    m.save_pretrained(out_dir, safe_serialization=True)
    # weights are stored in fp16 (size); declare fp32 so from_pretrained(dir) computes in fp32
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    vocab.save(out_dir / "vocab.json")
    vocab.save_hf_tokenizer(out_dir)
    shutil.copy(ASSET_DIR / "lexicon.json", out_dir / "lexicon.json")
    (out_dir / "sparkee_refslm.json").write_text(json.dumps(refslm_meta(vocab, ratio), indent=1) + "\n")
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    if report is not None:
        (out_dir / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")


def load_model(model_dir: Path | None = None, checkpoint: Path | None = None):
    """(fp32 model in eval mode, vocab) from a model dir (default: bundled) or a training checkpoint."""
    from transformers import Qwen2ForCausalLM

    if checkpoint is not None:
        from safetensors.torch import load_file

        checkpoint = Path(checkpoint)
        vocab = RefVocab.load()
        st = json.loads((checkpoint / "state.json").read_text())
        sd = load_file(str(checkpoint / "model.safetensors"))
        cfg = st.get("config")
        if cfg is not None:
            from transformers import Qwen2Config

            config = Qwen2Config(**cfg)
        else:  # older checkpoints: infer the size from the weights
            n_layers = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})
            config = make_config(vocab, layers=n_layers, hidden=sd["model.embed_tokens.weight"].shape[1])
        model = Qwen2ForCausalLM(config)
        model.load_state_dict(sd, strict=False)
        model.tie_weights()
        return model.float().eval(), vocab
    if model_dir is None:
        from . import bundled_model_dir

        model_dir = bundled_model_dir()
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), RefVocab.load(Path(model_dir) / "vocab.json")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _save_checkpoint(ckpt: Path, model, opt, state: dict) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(ckpt / "model.safetensors.tmp"))
    torch.save(opt.state_dict(), ckpt / "optimizer.pt.tmp")
    (ckpt / "model.safetensors.tmp").replace(ckpt / "model.safetensors")
    (ckpt / "optimizer.pt.tmp").replace(ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text(json.dumps(state, indent=1) + "\n")


def train(
    out: Path,
    steps: int = 100000,
    max_minutes: float | None = None,
    batch_size: int = 32,
    lr: float = 2.5e-3,
    warmup: int = 100,
    weight_decay: float = 0.05,
    seed: int = 0,
    tiny: bool = False,
    layers: int = 16,
    hidden: int = 192,
    ratio: tuple[int, int] = DEFAULT_RATIO,
    checkpoint_every: int = 100,
    eval_limit: int | None = None,
    eval_test: bool = True,
    resume: bool = True,
    threads: int = 2,
    progress: bool = True,
) -> dict:
    from transformers import Qwen2ForCausalLM

    from ..progress import Progress

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    vocab = RefVocab.load()
    train_set = load_split("train")
    dev_set = load_split("dev")
    weights = _category_weights(train_set)
    config = make_config(vocab, tiny=tiny, layers=layers, hidden=hidden)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    state = {"step": 0, "total_steps": steps, "elapsed_s": 0.0, "tokens": 0, "answer_tokens": 0, "losses": []}
    state["config"] = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    if resume and (ckpt / "state.json").exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        model.tie_weights()
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        state["total_steps"] = steps
        state["config"] = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        print(f"resumed from {ckpt} at step {state['step']}")
    budget_s = max_minutes * 60 if max_minutes else None
    total = state["total_steps"]
    # time-based: warm-up over steps, then the position on the cosine is the further along of
    # steps and of the time budget, robust to a machine shared with other jobs
    warm = warmup if budget_s else min(warmup, max(1, total // 10))
    factor = lr_schedule(total, warm)
    model.train()
    t_start = time.time() - state["elapsed_s"]
    bar = Progress(total=state["total_steps"], initial=state["step"], enabled=progress, desc="refslm train")
    tok_window: list[tuple[float, int]] = []
    while state["step"] < state["total_steps"]:
        step = state["step"]
        pos = float(step)
        if budget_s and step >= warm:
            pos = max(pos, warm + state["elapsed_s"] / budget_s * (total - warm))
        cur_lr = lr * factor(pos)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        t0 = time.time()
        (batch,) = make_batches(train_set, weights, vocab, step, seed, batch_size, ratio)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.time() - t0
        ntok = int(batch["attention_mask"].sum())
        state["tokens"] += ntok
        state["answer_tokens"] += int((batch["labels"] != -100).sum())
        state["step"] += 1
        state["elapsed_s"] = time.time() - t_start
        state["losses"].append(round(loss.item(), 4))
        tok_window = (tok_window + [(dt, ntok)])[-50:]
        tps = sum(n for _, n in tok_window) / max(1e-9, sum(d for d, _ in tok_window))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cur_lr:.2e}", tok_s=f"{tps:.0f}")
        if budget_s and state["elapsed_s"] >= budget_s:
            print("time budget reached")
            break
        if state["step"] % checkpoint_every == 0 or state["step"] >= state["total_steps"]:
            _save_checkpoint(ckpt, model, opt, state)
    bar.close()
    _save_checkpoint(ckpt, model, opt, state)
    train_s = state["elapsed_s"]
    report = {
        "model": {
            "arch": "Qwen2ForCausalLM",
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "params": n_params,
            "vocab_size": len(vocab),
            "n_words": len(vocab.words),
            "n_units": len(vocab.units),
        },
        "training": {
            "steps": state["step"],
            "batch_size": batch_size,
            "peak_lr": lr,
            "warmup": warmup,
            "schedule": "linear warm-up, cosine to 5% of peak (transformers)",
            "weight_decay": weight_decay,
            "seed": seed,
            "minutes": round(train_s / 60, 2),
            "tokens": state["tokens"],
            "answer_tokens": state["answer_tokens"],
            "tokens_per_s": round(state["tokens"] / max(1e-9, train_s), 1),
            "final_loss_mean_last50": float(np.mean(state["losses"][-50:])),
            "loss_curve_every_50": [
                float(np.mean(state["losses"][i : i + 50])) for i in range(0, len(state["losses"]), 50)
            ],
            "threads": threads,
            "formats": list(FORMATS),
            "ratio": list(ratio),
            "train_examples": len(train_set),
        },
        "sequence_lengths": sequence_length_stats(dev_set, vocab, ratio),
    }
    model.eval()
    lim = eval_limit if eval_limit is not None else (4 if tiny else None)
    mnt = 200 if not tiny else 8
    report["dev"] = evaluate(model, vocab, dev_set[:lim] if lim else dev_set, max_new_tokens=mnt)
    if eval_test:
        test_set = load_split("test")
        report["test_after_training_report_only"] = evaluate(
            model, vocab, test_set[:lim] if lim else test_set, max_new_tokens=mnt
        )
    save_model_dir(model, vocab, out / "model", ratio, report)
    print(json.dumps({k: report[k] for k in ("training",)}, indent=1)[:2000])
    for split in ("dev", "test_after_training_report_only"):
        for fmt, r in report.get(split, {}).items():
            print(
                f"{split} {fmt}: text {r['text_acc']:.3f} speech {r['speech_acc']:.3f} wer {'n/a' if r['alignment_wer'] is None else format(r['alignment_wer'], '.3f')}"
            )
    return report
