"""Per-step records, run statistics and the cost model.

The cost model counts, for every pass the engine actually ran:
- multiply-adds (FLOPs / 2): layer weights x rows, attention over the context, output projection
  and exit-head rows. Early exit with deferred deep fill computes the deep layers of every early
  position later, so SPAR-K saves little arithmetic; it saves *sequential* passes.
- weight reads: elements of weights and KV read. Single-sequence decoding is memory-bound, so a
  deep pass over k pending rows costs about what one row costs; this is the latency model whose
  ratio `predicted_speedup` the speed benchmark compares with measured wall-clock ratios.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepRecord:
    position: int  # position of the fed token; the step produced the token at position + 1
    token: int
    modality: str
    exit_layer: int  # layers executed for this step's own token (num_layers when full)
    action: str  # "full", "early", or "fallback" (confidence exit that ran on to the top)
    filled: int = 0  # pending positions whose deep layers this step computed
    agreed: bool | None = None  # early token vs the last layer's prediction, once a full pass checked it
    vocab_changed: bool | None = None  # --speech-vocab-only changed the argmax (audited full speech steps)
    corrected: bool = False  # verified mode replaced this step's token with the full-depth one


@dataclass
class CostMeter:
    layer_params: list[int]
    kv_per_pos: list[int]  # K and V elements per position per layer
    attn_width: (
        int  # num_heads * head_dim: multiply-adds per context position per query row (x2 for QK and AV)
    )
    hidden: int
    vocab: int
    macs: float = 0.0
    reads: float = 0.0
    passes: dict = field(default_factory=lambda: {"layer": 0, "head": 0, "proj": 0})

    def layer(self, i: int, rows: int, ctx_end: int) -> None:
        # ctx_end: context length seen by the last row
        self.macs += self.layer_params[i] * rows + 2 * self.attn_width * rows * ctx_end
        self.reads += self.layer_params[i] + self.kv_per_pos[i] * ctx_end
        self.passes["layer"] += 1

    def matrix(self, elements: int, rows: int, kind: str) -> None:
        self.macs += elements * rows
        self.reads += elements
        self.passes[kind] += 1

    def full_step_reads(self, ctx_end: int) -> float:
        """Weight reads of one plain full-depth decode step at context `ctx_end`."""
        return sum(self.layer_params) + sum(self.kv_per_pos) * ctx_end + self.hidden * self.vocab

    def full_step_macs(self, ctx_end: int) -> float:
        return (
            sum(self.layer_params)
            + 2 * self.attn_width * ctx_end * len(self.layer_params)
            + self.hidden * self.vocab
        )


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _rate(flags: list[bool | None]) -> float | None:
    seen = [f for f in flags if f is not None]
    return sum(seen) / len(seen) if seen else None


def compute_stats(
    steps: list[StepRecord],
    num_layers: int,
    meter: CostMeter,
    prompt_len: int,
    decode_s: float,
    prefill_s: float,
    rejections: int = 0,
    wasted_steps: int = 0,
) -> dict:
    """Run statistics. Depths average layers executed per step; agreement counts early tokens checked."""
    by = {m: [s for s in steps if s.modality == m] for m in ("text", "speech")}
    avg = {m: _mean([s.exit_layer for s in by[m]]) for m in by}
    # baseline cost: every step of this run as a plain full-depth step (prefill excluded on both sides)
    # (step i >= 1 feeds new token i - 1 at position prompt_len + i - 1, so it sees prompt_len + i positions)
    base_reads = sum(meter.full_step_reads(prompt_len + i) for i in range(1, len(steps)))
    base_macs = sum(meter.full_step_macs(prompt_len + i) for i in range(1, len(steps)))
    decode_tokens = max(len(steps) - 1, 0)  # the first token comes from the prefill
    return {
        "num_layers": num_layers,
        "new_tokens": len(steps),
        "text_steps": len(by["text"]),
        "speech_steps": len(by["speech"]),
        "avg_exit_layer_text": avg["text"],
        "avg_exit_layer_speech": avg["speech"],
        "text_depth_reduction_pct": None if avg["text"] is None else 100.0 * (1 - avg["text"] / num_layers),
        "speech_depth_reduction_pct": None
        if avg["speech"] is None
        else 100.0 * (1 - avg["speech"] / num_layers),
        "early_steps": sum(s.action == "early" for s in steps),
        "fallback_steps": sum(s.action == "fallback" for s in steps),
        "speech_agreement": _rate([s.agreed for s in by["speech"]]),
        "text_agreement": _rate([s.agreed for s in by["text"]]),
        "speech_vocab_changed": sum(bool(s.vocab_changed) for s in steps),
        "speech_vocab_checked": sum(s.vocab_changed is not None for s in steps),
        "verify_rejections": rejections,
        "verify_wasted_steps": wasted_steps,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
        "flops": 2 * meter.macs,
        "flops_full_estimate": 2 * base_macs,
        "flops_saved_pct": 100.0 * (1 - meter.macs / base_macs) if base_macs else None,
        "weight_reads": meter.reads,
        "weight_reads_full_estimate": base_reads,
        "predicted_speedup": base_reads / meter.reads if meter.reads else None,
    }


def steps_as_dicts(steps: list[StepRecord]) -> list[dict]:
    return [asdict(s) for s in steps]
