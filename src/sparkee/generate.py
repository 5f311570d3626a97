"""The decode loop, top to bottom.

One sequence, one token per step. Each step feeds the last token at position `pos` and produces
the token at `pos + 1`. Its modality comes from the interleave tracker, its depth from the policy
of that modality:

- full step: all layers, the model's own output projection;
- early step: layers 1..L, then the exit head of layer L. Layers L+1..N of this position stay
  empty in the KV cache ("pending"), and the state after layer L is kept;
- confidence step: run to L, exit if the head's entropy is below the threshold, else go on.

Deferred deep fill: a step that runs layer i first takes in every position still missing layer i
(their kept states), so a full step runs the deep layers over all pending positions plus its own
in one causal pass, like a small prefill. By induction the positions missing layer i are always a
contiguous tail, so a per-layer length describes the cache and an offset causal mask is enough.
That pass also yields the last layer's prediction for every pending position: compared with the
tokens the early steps emitted it gives the agreement rate for free, and in verified mode the
first disagreement is rejected and the caches rolled back, which makes greedy output equal
full-depth greedy output token for token (self-speculative decoding).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .backbone import Backbone
from .cache import LayeredKVCache
from .errors import SparkeeError
from .heads import ExitHeads
from .pooling import PoolSpec, affinity_groups, pool
from .schedule import Interleave, Policy, TrackerState, advance, chunk_index, next_modality, parse_policy
from .trace import CostMeter, StepRecord, compute_stats


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    speech_policy: str | Policy = "full"
    text_policy: str | Policy = "full"
    interleave: Interleave | None = None
    speech_ids: tuple[int, int] | None = None  # half-open range of speech token ids
    stop_ids: Sequence[int] = ()
    control_ids: Sequence[int] | None = (
        None  # non-speech ids legal at speech steps; default: stop + text-end ids
    )
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    verify: bool = False
    speech_vocab_only: bool = False
    # with speech_vocab_only, also compute the full projection to count changed tokens
    audit_vocab: bool = True
    prefill_pool: PoolSpec | None = None  # Affinity Pooling of the speech part of the prompt


@dataclass
class Emitted:
    """One streamed token. In verified mode a token is streamed once a full pass has confirmed it."""

    index: int  # 0-based index among the new tokens
    token: int
    modality: str
    exit_layer: int


@dataclass
class GenerationResult:
    prompt: list[int]
    tokens: list[int]
    modalities: list[str]
    exit_layers: list[int]
    steps: list[StepRecord]
    stats: dict
    cache: LayeredKVCache = field(repr=False)

    def as_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "modalities": self.modalities,
            "exit_layers": self.exit_layers,
            "stats": self.stats,
        }


# ---------------------------------------------------------------------------------------------
# sampling


def _filter_logits(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, top-p (the order transformers uses); logits: [V] float32."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _distribution(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor | None:
    return None if cfg.temperature == 0 else _filter_logits(logits.float(), cfg).softmax(-1)


def _draw(
    logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    probs = _distribution(logits, cfg)
    if probs is None:
        return int(torch.argmax(logits)), None
    return int(torch.multinomial(probs, 1, generator=gen)), probs


def _entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())


# ---------------------------------------------------------------------------------------------
# state


@dataclass
class _State:
    bb: Backbone
    heads: ExitHeads
    cfg: GenerationConfig
    speech_policy: Policy
    text_policy: Policy
    speech_set: torch.Tensor | None  # ids legal at speech steps, for --speech-vocab-only
    cache: LayeredKVCache
    meter: CostMeter
    pend_h: torch.Tensor  # [1, max_len, H]: state of each pending position at its first missing layer
    seq: list[int]  # prompt + new tokens
    prompt_len: int
    records: list[StepRecord] = field(default_factory=list)
    trackers: list[TrackerState] = field(default_factory=list)  # tracker state before each new token
    early_probs: dict = field(default_factory=dict)  # pos -> sampling distribution of an early step
    gen: torch.Generator | None = None
    emitted: int = 0
    rejections: int = 0
    wasted: int = 0

    @property
    def pos(self) -> int:  # position of the next token to feed
        return len(self.seq) - 1

    @property
    def tracker(self) -> TrackerState:
        return advance(
            self.cfg.interleave, self.trackers[-1], self.records[-1].modality, self.records[-1].token
        )


def _causal_mask(rows: int, kv_len: int, device) -> torch.Tensor:
    q = torch.arange(kv_len - rows, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return (k <= q)[None, None]  # [1, 1, rows, kv_len], True = attend; the rows are the last kv slots


def _run_layers(st: _State, carry: torch.Tensor | None, rows_start: int, pos_end: int, layers: range):
    """Run `layers` over positions [rows_start, pos_end]; positions missing a layer join the pass there.

    carry: [1, rows, H] states of positions rows_start..pos_end, or None when only pending
    positions take part (the final flush). Returns the new carry and its first position.
    """
    bb, cache = st.bb, st.cache
    if len(layers) == 0:
        return carry, rows_start
    lo = min(rows_start, cache.next_position(layers[-1]))  # deepest layer has the longest pending tail
    pids_all = torch.arange(lo, pos_end + 1, device=bb.device)[None]
    cos, sin = bb.rope(st.pend_h[:, :1] if carry is None else carry, pids_all)
    masks: dict[tuple[int, int], torch.Tensor] = {}
    for i in layers:
        s = cache.next_position(i)
        if s < rows_start:
            joined = st.pend_h[:, s:rows_start]
            carry = joined if carry is None else torch.cat([joined, carry], dim=1)
            rows_start = s
        if carry is None:
            continue
        rows = pos_end + 1 - rows_start
        kv_len = cache.lens[i] + rows
        mask = None  # one row, or a prefill from slot 0: is_causal does it
        if rows > 1 and kv_len > rows:
            mask = masks.get((rows, kv_len))
            if mask is None:
                mask = masks[(rows, kv_len)] = _causal_mask(rows, kv_len, bb.device)
        a = rows_start - lo
        carry = bb.run_layer(i, carry, mask, pids_all[:, a:], (cos[:, a:], sin[:, a:]), cache)
        st.meter.layer(i, rows, kv_len)
    return carry, rows_start


def _project(st: _State, hn: torch.Tensor, speech_rows: list[bool], audit: bool):
    """Last-layer logits for rows of `hn` ([1, r, H]); speech rows restricted under --speech-vocab-only.

    Returns (full, restricted): full [r, V] or None, restricted [r, |set|] or None.
    """
    bb, restrict = st.bb, st.cfg.speech_vocab_only and st.speech_set is not None
    need_full = not restrict or audit or not all(speech_rows)
    H, r = bb.hidden_size, hn.shape[1]
    if need_full:
        full = bb.project(hn)[0].float()
        st.meter.matrix(H * bb.vocab_size, r, "proj")
        return full, (full[:, st.speech_set] if restrict else None)
    st.meter.matrix(H * st.speech_set.numel(), r, "proj")
    return None, bb.project(hn, st.speech_set)[0].float()


def _row_choice(
    st: _State, full, restricted, j: int, speech: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits the full model decides from at row j, and the id map when they cover a token subset."""
    if speech and restricted is not None:
        return restricted[j], st.speech_set
    return full[j], None


def _accept(
    st: _State, pos: int, token: int, logits: torch.Tensor, ids: torch.Tensor | None
) -> tuple[bool, int]:
    """Verified mode: keep the early token at `pos + 1`, or return the full model's replacement."""
    cfg = st.cfg
    if cfg.temperature == 0:
        full_tok = int(torch.argmax(logits))
        full_tok = int(ids[full_tok]) if ids is not None else full_tok
        return full_tok == token, full_tok
    # speculative sampling: accept with prob min(1, p(x) / q(x)), else draw from max(0, p - q)
    p = torch.zeros(st.bb.vocab_size)
    p_sub = _distribution(logits, cfg)
    p[ids.cpu() if ids is not None else slice(None)] = p_sub.cpu()
    q = st.early_probs[pos]
    if float(torch.rand((), generator=st.gen)) < min(1.0, float(p[token] / q[token].clamp_min(1e-20))):
        return True, token
    resid = (p - q).clamp_min(0)
    resid = resid / resid.sum() if resid.sum() > 0 else p
    return False, int(torch.multinomial(resid, 1, generator=st.gen))


def _rollback(st: _State, pos: int, token: int) -> None:
    """Replace the token produced at step `pos` by `token` and forget every later step."""
    k = pos - (st.prompt_len - 1)  # index of that step among the new tokens
    st.wasted += len(st.records) - (k + 1)
    st.rejections += 1
    del st.records[k + 1 :], st.trackers[k + 1 :], st.seq[pos + 2 :]
    st.seq[pos + 1] = token
    st.records[k].token, st.records[k].corrected, st.records[k].agreed = token, True, False
    st.cache.truncate(pos + 1)  # positions <= pos saw only kept tokens
    for p in [p for p in st.early_probs if p >= pos]:
        del st.early_probs[p]


def _check_pending(st: _State, full, restricted, rows_start: int, n_pending: int) -> bool:
    """Compare each pending early token with the last layer; in verified mode roll back at the first miss.

    Returns True when a rollback happened.
    """
    for j in range(n_pending):
        pos = rows_start + j
        rec = st.records[pos - (st.prompt_len - 1)]
        logits, ids = _row_choice(st, full, restricted, j, rec.modality == "speech")
        best = int(torch.argmax(logits))
        rec.agreed = (int(ids[best]) if ids is not None else best) == rec.token
        if st.cfg.verify:
            ok, token = _accept(st, pos, rec.token, logits, ids)
            if not ok:
                _rollback(st, pos, token)
                return True
        st.early_probs.pop(pos, None)
    return False


# ---------------------------------------------------------------------------------------------
# steps


def _prefill(st: _State) -> None:
    bb, P = st.bb, st.prompt_len
    h = bb.embed(torch.tensor([st.seq], device=bb.device))
    if st.cfg.prefill_pool is None:
        carry, _ = _run_layers(st, h, 0, P - 1, range(bb.num_layers))
    else:
        carry = _pooled_prefill(st, h, st.cfg.prefill_pool)
    modality = next_modality(st.cfg.interleave, st.trackers[-1])
    full, restricted = _project(st, bb.final_norm(carry[:, -1:]), [modality == "speech"], st.cfg.audit_vocab)
    _emit_full(st, full, restricted, 0, modality, bb.num_layers, "full", filled=0)


def _pooled_prefill(st: _State, h: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """Prefill with Affinity Pooling at the embeddings and after layer `spec.layer` (see pooling.py).

    Layers after each pooling point run on the shorter sequence; `cache.shift` records how many
    positions each layer dropped, so later steps keep the usual positions P, P + 1, ...
    """
    bb, P, N = st.bb, st.prompt_len, st.bb.num_layers
    ids = torch.tensor(st.seq)
    lo, hi = st.cfg.speech_ids
    speech = (ids >= lo) & (ids < hi)
    pos = torch.arange(P, dtype=torch.float32)
    for first, last, tau, window in (
        (0, spec.layer, spec.tau_in, spec.window_in),
        (spec.layer, N, spec.tau_deep, spec.window_deep),
    ):
        h, pos, speech = pool(h, pos, speech, affinity_groups(h[0], speech, tau, window), spec.position)
        pids = pos[None].to(bb.device)
        pe = bb.rope(h, pids)
        for i in range(first, last):
            st.cache.shift[i] = P - h.shape[1]
            h = bb.run_layer(i, h, None, pids, pe, st.cache)  # slots start at 0: is_causal masks it
            st.meter.layer(i, h.shape[1], h.shape[1])
    return h


def _emit_full(
    st: _State, full, restricted, j: int, modality: str, depth: int, action: str, filled: int
) -> None:
    logits, ids = _row_choice(st, full, restricted, j, modality == "speech")
    idx, _ = _draw(logits, st.cfg, st.gen)
    token = int(ids[idx]) if ids is not None else idx
    changed = None
    if ids is not None and full is not None:  # audited --speech-vocab-only
        changed = int(torch.argmax(full[j])) != int(ids[int(torch.argmax(logits))])
    _record(st, StepRecord(st.pos, token, modality, depth, action, filled=filled, vocab_changed=changed))


def _record(st: _State, rec: StepRecord) -> None:
    st.records.append(rec)
    st.seq.append(rec.token)


def _step(st: _State) -> None:
    bb, cfg, N = st.bb, st.cfg, st.bb.num_layers
    tracker = st.tracker
    st.trackers.append(tracker)
    modality = next_modality(cfg.interleave, tracker)
    policy = st.speech_policy if modality == "speech" else st.text_policy
    action, L = policy.plan(chunk_index(modality, tracker))
    pos = st.pos
    h = bb.embed(torch.tensor([[st.seq[-1]]], device=bb.device))
    carry, rows_start = _run_layers(st, h, pos, pos, range(L if L else N))
    if L:
        head_logits = st.heads(L, carry[:, -1:])[0, 0].float()
        st.meter.matrix(st.heads.cost(L), 1, "head")
        if action == "exit" or _entropy(head_logits) < policy.threshold:
            st.pend_h[:, rows_start : pos + 1] = carry
            idx, probs = _draw(head_logits, cfg, st.gen)
            ids = st.heads.token_ids
            if probs is not None and cfg.verify:  # the proposal distribution, over the whole vocabulary
                q = torch.zeros(bb.vocab_size)
                q[ids.cpu() if ids is not None else slice(None)] = probs.cpu()
                st.early_probs[pos] = q
            token = int(ids[idx]) if ids is not None else idx
            _record(st, StepRecord(pos, token, modality, L, "early", filled=pos - rows_start))
            return
        carry, rows_start = _run_layers(st, carry, rows_start, pos, range(L, N))
        action = "fallback"
    else:
        action = "full"
    n_pending = pos - rows_start
    speech_rows = [st.records[p - (st.prompt_len - 1)].modality == "speech" for p in range(rows_start, pos)]
    full, restricted = _project(
        st, bb.final_norm(carry), speech_rows + [modality == "speech"], cfg.audit_vocab
    )
    if _check_pending(st, full, restricted, rows_start, n_pending):
        st.wasted += 1  # this step's own pass served the check only
        return
    _emit_full(st, full, restricted, n_pending, modality, N, action, filled=n_pending)


def _flush(st: _State) -> bool:
    """Fill the deep layers of the pending tail (so the cache is complete) and check its tokens."""
    bb, last = st.bb, st.pos - 1  # the newest token is not fed yet
    rows_start = min(st.cache.next_position(bb.num_layers - 1), last + 1)
    if rows_start > last:
        return False
    carry, rows_start = _run_layers(st, None, last + 1, last, range(bb.num_layers))
    speech_rows = [
        st.records[p - (st.prompt_len - 1)].modality == "speech" for p in range(rows_start, last + 1)
    ]
    full, restricted = _project(st, bb.final_norm(carry), speech_rows, audit=False)
    return _check_pending(st, full, restricted, rows_start, last + 1 - rows_start)


# ---------------------------------------------------------------------------------------------
# public API


def _validate(bb: Backbone, heads: ExitHeads, prompt: Sequence[int], cfg: GenerationConfig):
    V = bb.vocab_size
    if len(prompt) == 0:
        raise SparkeeError("the prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= int(t) < V]
    if bad:
        raise SparkeeError(f"prompt token id {bad[0]} is outside the vocabulary (0..{V - 1})")
    return check_config(bb, heads, cfg)


def check_config(bb: Backbone, heads: ExitHeads, cfg: GenerationConfig):
    """Check a configuration against a model and heads; returns (speech policy, text policy, speech set)."""
    N, V = bb.num_layers, bb.vocab_size
    if cfg.max_new_tokens < 1:
        raise SparkeeError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise SparkeeError("sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    sp = cfg.speech_policy if isinstance(cfg.speech_policy, Policy) else parse_policy(cfg.speech_policy)
    tp = cfg.text_policy if isinstance(cfg.text_policy, Policy) else parse_policy(cfg.text_policy)
    for pol in (sp, tp):
        pol.check_layers(N)
        if pol.uses_heads and not heads.has(pol.layer):
            raise SparkeeError(
                f"the {heads.kind} heads have no head for exit layer {pol.layer} (they cover layers {heads.layers})"
            )
    if tp.uses_heads and heads.token_ids is not None:
        raise SparkeeError("these heads are restricted to a token set, so they cannot serve text steps")
    if cfg.speech_ids is not None:
        a, b = cfg.speech_ids
        if not 0 <= a < b <= V:
            raise SparkeeError(f"speech id range {a}:{b} is outside the vocabulary (need 0 <= A < B <= {V})")
    for t in list(cfg.stop_ids) + list(cfg.control_ids or []):
        if not 0 <= int(t) < V:
            raise SparkeeError(f"token id {t} (stop or control token) is outside the vocabulary (0..{V - 1})")
    if cfg.interleave and cfg.interleave.text_end_id is not None and not 0 <= cfg.interleave.text_end_id < V:
        raise SparkeeError(f"text-end id {cfg.interleave.text_end_id} is outside the vocabulary (0..{V - 1})")
    if cfg.prefill_pool is not None:
        cfg.prefill_pool.check(N)
        if cfg.speech_ids is None:
            raise SparkeeError(
                "--prefill-pool needs the speech token range (--speech-ids A:B) to know what may merge"
            )
    speech_set = None
    if cfg.speech_vocab_only:
        if heads.token_ids is not None:
            speech_set = heads.token_ids
        elif cfg.speech_ids is not None:
            speech_set = speech_token_set(cfg, V).to(bb.lm_head.weight.device)
        else:
            raise SparkeeError("--speech-vocab-only needs the speech token range (--speech-ids A:B)")
    return sp, tp, speech_set


def speech_token_set(cfg: GenerationConfig, vocab_size: int) -> torch.Tensor:
    """Speech ids plus the control ids that can end speech (stop ids and the text-end id by default)."""
    if cfg.speech_ids is None:
        raise SparkeeError("a speech token set needs the speech token range (--speech-ids A:B)")
    extra = list(cfg.control_ids) if cfg.control_ids is not None else list(cfg.stop_ids)
    if cfg.control_ids is None and cfg.interleave is not None and cfg.interleave.text_end_id is not None:
        extra.append(cfg.interleave.text_end_id)
    ids = torch.cat([torch.arange(*cfg.speech_ids), torch.tensor(extra, dtype=torch.long)])
    return ids[(ids >= 0) & (ids < vocab_size)].unique(sorted=True)


class Generation:
    """A streaming generation: iterate for tokens as they are produced, then call `result()`."""

    def __init__(self, bb: Backbone, heads: ExitHeads | None, prompt: Sequence[int], cfg: GenerationConfig):
        heads = heads if heads is not None else ExitHeads(bb, "logit-lens")
        sp, tp, speech_set = _validate(bb, heads, prompt, cfg)
        max_len = len(prompt) + cfg.max_new_tokens + 1
        cache = LayeredKVCache(
            bb.num_layers, max_len, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices
        )
        meter = CostMeter(
            layer_params=bb.layer_params,
            kv_per_pos=[2 * bb.num_kv_heads * bb.head_dim] * bb.num_layers,
            attn_width=bb.config.num_attention_heads * bb.head_dim,
            hidden=bb.hidden_size,
            vocab=bb.vocab_size,
        )
        pend_h = torch.zeros(1, max_len, bb.hidden_size, dtype=bb.dtype, device=bb.device)
        gen = None
        if cfg.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        self._st = _State(
            bb, heads, cfg, sp, tp, speech_set, cache, meter, pend_h, [int(t) for t in prompt], len(prompt)
        )
        self._st.trackers.append(TrackerState())
        self._st.gen = gen
        self._times = (0.0, 0.0)
        self._prefill_macs = 0.0
        self._done = False
        self._iter = self._run()

    def __iter__(self) -> Iterator[Emitted]:
        return self._iter

    def _confirmed(self, upto: int) -> Iterator[Emitted]:
        st = self._st
        while st.emitted < upto:
            r = st.records[st.emitted]
            yield Emitted(st.emitted, r.token, r.modality, r.exit_layer)
            st.emitted += 1

    def _finished(self) -> bool:
        st = self._st
        return len(st.records) >= st.cfg.max_new_tokens or st.records[-1].token in set(st.cfg.stop_ids)

    def _run(self) -> Iterator[Emitted]:
        st = self._st
        with torch.inference_mode():
            t0 = time.perf_counter()
            _prefill(st)
            t1 = time.perf_counter()
            self._prefill_macs = st.meter.macs
            # costs below are decode costs; the all-full baseline excludes prefill too
            st.meter.macs = st.meter.reads = 0.0
            yield from self._confirmed(len(st.records))
            while True:
                if self._finished():
                    if _flush(st):  # verified mode rejected a pending token: generation goes on
                        yield from self._confirmed(len(st.records))
                        continue
                    break
                _step(st)
                # in verified mode, stream only what a full pass has confirmed
                if not st.cfg.verify or st.cache.next_position(st.bb.num_layers - 1) >= st.pos:
                    yield from self._confirmed(len(st.records))
            yield from self._confirmed(len(st.records))
            self._times = (t1 - t0, time.perf_counter() - t1)
        self._done = True

    def result(self) -> GenerationResult:
        for _ in self._iter:
            pass
        st = self._st
        prefill_s, decode_s = self._times
        stats = compute_stats(
            st.records,
            st.bb.num_layers,
            st.meter,
            st.prompt_len,
            decode_s,
            prefill_s,
            st.rejections,
            st.wasted,
        )
        N, P = st.bb.num_layers, st.prompt_len
        stats["prefill_flops"] = 2 * self._prefill_macs
        stats["prompt_len"] = P
        stats["prompt_len_first_layer"] = P - st.cache.shift[0]
        stats["prompt_len_last_layer"] = P - st.cache.shift[N - 1]
        stats["kv_bytes"] = st.cache.nbytes()
        new = st.seq[st.prompt_len :]
        return GenerationResult(
            prompt=st.seq[: st.prompt_len],
            tokens=new,
            modalities=[r.modality for r in st.records],
            exit_layers=[r.exit_layer for r in st.records],
            steps=st.records,
            stats=stats,
            cache=st.cache,
        )


def stream(
    bb: Backbone, prompt: Sequence[int], cfg: GenerationConfig, heads: ExitHeads | None = None
) -> Generation:
    """Start a generation; iterate over it for tokens as they come (see `Emitted`)."""
    return Generation(bb, heads, prompt, cfg)


def generate(
    bb: Backbone, prompt: Sequence[int], cfg: GenerationConfig | None = None, heads: ExitHeads | None = None
) -> GenerationResult:
    """Generate to completion and return tokens, per-step trace and stats."""
    return Generation(bb, heads, prompt, cfg or GenerationConfig()).result()
