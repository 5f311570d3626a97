"""Lexicon decoder: speech unit ids -> words over the closed vocabulary (the primary metric).

Units are collapsed (repeated frames -> one phoneme), silences mark likely word boundaries, and a
dynamic programme segments the phoneme string into vocabulary words minimising

    sum over words of edit_distance(segment, pronunciation)
    + ``boundary_cost`` for every word boundary without a silence
    + ``boundary_cost`` for every silence inside a word
    + ``skip_cost`` for every phoneme left out of all words

where deleting a phoneme costs 1, except the second half of a run split by a one-phoneme blip
(``A X A``: a single wrong frame inside a run of A) which costs ``blip_cost``.

It is deterministic (ties go to the word that sorts first) and tolerant to unit errors, so
slightly wrong units from early exit still decode to the nearest words. All edit distances from
one start position to every word are computed in one vectorised pass (numpy), so an utterance
decodes in milliseconds; exact matches between silences take a fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .units import SIL, collapse, load_lexicon
from .vocab import RefVocab


class LexiconDecoder:
    def __init__(
        self,
        vocab: RefVocab,
        lexicon: dict[str, list[str]] | None = None,
        words: Sequence[str] | None = None,
        boundary_cost: float = 0.6,
        skip_cost: float = 1.0,
        blip_cost: float = 0.25,
    ) -> None:
        self.vocab = vocab
        lexicon = lexicon if lexicon is not None else load_lexicon()
        words = sorted(words if words is not None else [w for w in vocab.words if w in lexicon])
        self.words = [w for w in words if lexicon.get(w)]
        self.prons = [tuple(collapse(lexicon[w])) for w in self.words]
        self.exact = {}
        for w, p in zip(self.words, self.prons, strict=True):
            self.exact.setdefault(p, w)
        self.ph_index = {p: i for i, p in enumerate(sorted({p for ps in self.prons for p in ps}))}
        V, Lmax = len(self.prons), max(len(p) for p in self.prons)
        self.P = np.full((V, Lmax), -1, dtype=np.int64)
        for k, p in enumerate(self.prons):
            self.P[k, : len(p)] = [self.ph_index[x] for x in p]
        self.lens = np.array([len(p) for p in self.prons])
        self.Lmax = Lmax
        self.boundary_cost = boundary_cost
        self.skip_cost = skip_cost
        self.blip_cost = blip_cost

    # -------------------------------------------------------------------------------------------
    def unit_names(self, unit_ids: Sequence[int]) -> list[str]:
        s, e = self.vocab.speech_range
        return [self.vocab.unit_name(int(u)) for u in unit_ids if s <= int(u) < e]

    def decode(self, unit_ids: Sequence[int]) -> str:
        """Speech unit ids -> words (space separated)."""
        return " ".join(self.decode_phonemes(collapse(self.unit_names(unit_ids))))

    def decode_phonemes(self, phones: Sequence[str]) -> list[str]:
        # phoneme string without silences + the boundary positions the silences mark
        seq: list[str] = []
        bounds = {0}
        for p in phones:
            if p == SIL:
                bounds.add(len(seq))
            else:
                seq.append(p)
        n = len(seq)
        bounds.add(n)
        if n == 0:
            return []
        # fast path: every silence-delimited segment is exactly a word
        cuts = sorted(bounds)
        fast = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            w = self.exact.get(tuple(seq[a:b]))
            if w is None:
                break
            fast.append(w)
        else:
            return fast
        return self._dp(seq, bounds)

    def _dp(self, seq: list[str], bounds: set[int]) -> list[str]:
        n = len(seq)
        codes = np.array([self.ph_index.get(p, -2) for p in seq], dtype=np.int64)
        maxseg = self.Lmax + 3
        INF = float("inf")
        best = np.full(n + 1, INF)
        best[0] = 0.0
        back: list[tuple[int, int]] = [(-1, -1)] * (n + 1)  # (prev position, word index or -1 = skip)
        bound_arr = np.zeros(n + 1, dtype=bool)
        bound_arr[list(bounds)] = True
        V = len(self.prons)
        cols = np.arange(self.Lmax + 1)
        # deleting the second half of a run split by a one-phoneme blip (A X A -> A) is cheap
        del_cost = [
            self.blip_cost if k >= 2 and seq[k] == seq[k - 2] and seq[k - 1] != seq[k] else 1.0
            for k in range(n)
        ]
        for i in range(n):
            if best[i] == INF:
                continue
            # skip one phoneme
            c = best[i] + min(self.skip_cost, del_cost[i])
            if c < best[i + 1]:
                best[i + 1], back[i + 1] = c, (i, -1)
            # edit-distance rows of s[i:j] against every pronunciation prefix
            row = np.tile(cols.astype(float), (V, 1))  # j == i: distance to prefixes = prefix length
            inside = 0.0
            for j in range(i + 1, min(n, i + maxseg) + 1):
                x = codes[j - 1]
                dcost = del_cost[j - 1]
                new = np.empty_like(row)
                new[:, 0] = row[:, 0] + dcost
                sub = row[:, :-1] + (x != self.P)
                dele = row[:, 1:] + dcost
                cand = np.minimum(sub, dele)
                for k in range(1, self.Lmax + 1):
                    new[:, k] = np.minimum(cand[:, k - 1], new[:, k - 1] + 1)
                row = new
                dist = row[np.arange(V), self.lens]
                pen = inside + (0.0 if bound_arr[j] else self.boundary_cost)
                k = int(np.argmin(dist))
                c = best[i] + dist[k] + pen
                if c < best[j] - 1e-9:
                    best[j], back[j] = c, (i, k)
                if j < n and bound_arr[j]:
                    inside += self.boundary_cost  # a silence inside the next, longer segment
        words: list[str] = []
        j = n
        while j > 0:
            i, k = back[j]
            if k >= 0:
                words.append(self.words[k])
            j = i
        return words[::-1]


_DEFAULT: dict[int, LexiconDecoder] = {}


def decode_units(unit_ids: Sequence[int], vocab: RefVocab | None = None) -> str:
    """Convenience: decode with a cached decoder over the bundled vocabulary and lexicon."""
    vocab = vocab or RefVocab.load()
    key = id(vocab)
    if key not in _DEFAULT:
        _DEFAULT[key] = LexiconDecoder(vocab)
    return _DEFAULT[key].decode(unit_ids)
