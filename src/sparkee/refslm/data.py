"""Spoken-QA data for the reference SLM and the interleaved sequence builders.

The data are generated from templates over a small synthetic fact base (capitals, colours,
animal sounds / legs / babies, opposites, next/previous number, days, months) and arithmetic with
numbers in words. Splits (``assets/data/{train,dev,test}.jsonl``):

* facts: every (template, entity) combination is an example; for a subset of entities one
  combination is held out for test and another for dev. The test question asks a fact the model
  has only heard through *other* question templates (unseen fact/template combination).
* ``plus``: operands 0-10; test and dev hold out ordered pairs (a, b) entirely (all templates),
  while (b, a) stays in training (unseen arithmetic pairs).
* ``minus``: held-out (template, pair) combinations.

Every spoken rendition (unit durations) of dev/test is drawn with its own seed (unseen
renditions); training draws fresh durations at every sample. The test split is never used in
training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import ASSET_DIR  # the one asset directory constant
from .vocab import ASSISTANT, BOS, USER, RefVocab

DATA_DIR = ASSET_DIR / "data"
FORMATS = ("padded", "early-stop")
DEFAULT_RATIO = (2, 12)  # 2 text words : 12 speech frames per cycle

NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]


@dataclass
class QAExample:
    id: str
    question: str
    answer: str
    accepted: list[str]
    category: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> QAExample:
        return cls(
            **{k: d[k] for k in ("id", "question", "answer", "accepted")}, category=d.get("category", "")
        )


# ---------------------------------------------------------------------------------------------
# fact base
# ---------------------------------------------------------------------------------------------
CAPITALS = {
    "france": "paris",
    "spain": "madrid",
    "italy": "rome",
    "germany": "berlin",
    "japan": "tokyo",
    "china": "beijing",
    "russia": "moscow",
    "egypt": "cairo",
    "kenya": "nairobi",
    "peru": "lima",
    "chile": "santiago",
    "greece": "athens",
    "norway": "oslo",
    "sweden": "stockholm",
    "poland": "warsaw",
    "austria": "vienna",
    "ireland": "dublin",
    "portugal": "lisbon",
    "canada": "ottawa",
    "mexico": "mexico city",
    "india": "delhi",
    "thailand": "bangkok",
    "cuba": "havana",
    "turkey": "ankara",
    "iran": "tehran",
    "england": "london",
}
COLOURS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "a carrot": "orange",
    "a lemon": "yellow",
    "milk": "white",
    "the sun": "yellow",
    "a frog": "green",
    "blood": "red",
    "the sea": "blue",
    "chocolate": "brown",
    "an apple": "red",
    "a pumpkin": "orange",
    "a crow": "black",
    "a plum": "purple",
    "a flamingo": "pink",
    "a cloud": "grey",
    "ash": "grey",
    "a lime": "green",
    "a grape": "purple",
    "a pig": "pink",
}
SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "lion": "roar",
    "snake": "hiss",
    "horse": "neigh",
    "pig": "oink",
    "mouse": "squeak",
    "bee": "buzz",
    "frog": "croak",
    "crow": "caw",
    "wolf": "howl",
    "goat": "bleat",
}
LEGS = {
    "cow": "four",
    "dog": "four",
    "cat": "four",
    "horse": "four",
    "duck": "two",
    "hen": "two",
    "spider": "eight",
    "ant": "six",
    "bee": "six",
    "snake": "zero",
    "fish": "zero",
    "owl": "two",
    "sheep": "four",
    "pig": "four",
    "frog": "four",
    "crab": "ten",
    "octopus": "eight",
    "lion": "four",
    "goat": "four",
    "beetle": "six",
    "parrot": "two",
    "whale": "zero",
}
BABIES = {
    "dog": "puppy",
    "cat": "kitten",
    "cow": "calf",
    "sheep": "lamb",
    "horse": "foal",
    "duck": "duckling",
    "hen": "chick",
    "frog": "tadpole",
    "goat": "kid",
    "pig": "piglet",
    "lion": "cub",
    "owl": "owlet",
    "bear": "cub",
    "deer": "fawn",
    "kangaroo": "joey",
    "swan": "cygnet",
}
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("old", "new"),
    ("day", "night"),
    ("black", "white"),
    ("open", "closed"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("left", "right"),
    ("in", "out"),
    ("early", "late"),
    ("full", "empty"),
    ("long", "short"),
    ("light", "dark"),
    ("high", "low"),
    ("rich", "poor"),
    ("loud", "quiet"),
]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]


def _an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _fact_groups() -> list[tuple[str, str, list[str], str, list[str]]]:
    """(category, entity key, question renditions, answer, accepted) for every fact."""
    groups = []
    for c, cap in CAPITALS.items():
        qs = [
            f"what is the capital of {c}",
            f"which city is the capital of {c}",
            f"name the capital of {c}",
            f"tell me the capital of {c}",
            f"what city is the capital of {c}",
        ]
        groups.append(("capital", c, qs, f"the capital of {c} is {cap}", [cap]))
    for x, col in COLOURS.items():
        qs = [
            f"what colour is {x}",
            f"what is the colour of {x}",
            f"tell me the colour of {x}",
            f"which colour is {x}",
            f"name the colour of {x}",
        ]
        groups.append(("colour", x, qs, f"{x} is {col}", [col]))
    for a, s in SOUNDS.items():
        qs = [
            f"what does {_an(a)} say",
            f"what sound does {_an(a)} make",
            f"which sound does {_an(a)} make",
            f"tell me what {_an(a)} says",
            f"what noise does {_an(a)} make",
        ]
        groups.append(("sound", a, qs, f"{_an(a)} says {s}", [s]))
    for a, n in LEGS.items():
        qs = [
            f"how many legs does {_an(a)} have",
            f"how many legs has {_an(a)} got",
            f"tell me how many legs {_an(a)} has",
            f"count the legs of {_an(a)}",
            f"what number of legs does {_an(a)} have",
        ]
        groups.append(("legs", a, qs, f"{_an(a)} has {n} legs", [f"{n} legs"]))
    for a, b in BABIES.items():
        qs = [
            f"what is a baby {a} called",
            f"what do we call a baby {a}",
            f"name a baby {a}",
            f"tell me what a baby {a} is called",
            f"what is the name of a baby {a}",
        ]
        groups.append(("baby", a, qs, f"a baby {a} is called {_an(b)}", [b]))
    for a, b in OPPOSITES + [(b, a) for a, b in OPPOSITES]:
        qs = [
            f"what is the opposite of {a}",
            f"tell me the opposite of {a}",
            f"name the opposite of {a}",
            f"which word is the opposite of {a}",
            f"what word means the opposite of {a}",
        ]
        groups.append(("opposite", a, qs, f"the opposite of {a} is {b}", [b]))
    for i in range(20):
        n, m = NUMBERS[i], NUMBERS[i + 1]
        qs = [
            f"what number comes after {n}",
            f"which number follows {n}",
            f"what comes after {n}",
            f"tell me the number after {n}",
        ]
        groups.append(("after", n, qs, f"{m} comes after {n}", [f"{m} comes"]))
        qs = [
            f"what number comes before {m}",
            f"which number is before {m}",
            f"what comes before {m}",
            f"tell me the number before {m}",
        ]
        groups.append(("before", m, qs, f"{n} comes before {m}", [f"{n} comes"]))
    for seq, kind in ((DAYS, "day"), (MONTHS, "month")):
        for i, d in enumerate(seq):
            nxt = seq[(i + 1) % len(seq)]
            qs = [
                f"what {kind} comes after {d}",
                f"which {kind} follows {d}",
                f"what {kind} is after {d}",
                f"tell me the {kind} after {d}",
            ]
            groups.append((kind, d, qs, f"{nxt} comes after {d}", [nxt]))
    return groups


def _plus_questions(a: str, b: str) -> list[str]:
    return [
        f"what is {a} plus {b}",
        f"how much is {a} plus {b}",
        f"add {a} and {b}",
        f"tell me {a} plus {b}",
        f"what do you get if you add {a} and {b}",
    ]


def _minus_questions(a: str, b: str) -> list[str]:
    return [
        f"what is {a} minus {b}",
        f"how much is {a} minus {b}",
        f"take {b} from {a}",
        f"tell me {a} minus {b}",
    ]


def generate_splits(
    seed: int = 1234, test_facts: int = 120, dev_facts: int = 90
) -> dict[str, list[QAExample]]:
    """Generate train/dev/test deterministically (see the module docstring for the holdout rules)."""
    rng = random.Random(seed)
    splits: dict[str, list[QAExample]] = {"train": [], "dev": [], "test": []}

    def add(split, cat, q, a, acc):
        splits[split].append(QAExample(f"{split}-{len(splits[split]):05d}", q, a, list(acc), cat))

    groups = _fact_groups()
    order = list(range(len(groups)))
    rng.shuffle(order)
    test_g = set(order[:test_facts])
    dev_g = set(order[test_facts : test_facts + dev_facts])
    for gi, (cat, _key, qs, ans, acc) in enumerate(groups):
        idx = list(range(len(qs)))
        rng.shuffle(idx)
        held = {}
        if gi in test_g:
            held[idx.pop()] = "test"
        if gi in dev_g:
            held[idx.pop()] = "dev"
        for qi, q in enumerate(qs):
            add(held.get(qi, "train"), cat, q, ans, acc)

    # plus: hold out whole ordered pairs; the commuted pair stays in training
    pairs = [(a, b) for a in range(11) for b in range(11) if a != b]
    rng.shuffle(pairs)
    held_pairs: dict[tuple[int, int], str] = {}
    for a, b in pairs:
        if (b, a) in held_pairs:
            continue
        n_test = sum(1 for v in held_pairs.values() if v == "test")
        n_dev = sum(1 for v in held_pairs.values() if v == "dev")
        if n_test < 20:
            held_pairs[(a, b)] = "test"
        elif n_dev < 12:
            held_pairs[(a, b)] = "dev"
        else:
            break
    for a in range(11):
        for b in range(11):
            qs = _plus_questions(NUMBERS[a], NUMBERS[b])
            ans = f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}"
            split = held_pairs.get((a, b))
            if split:
                add(split, "plus", rng.choice(qs), ans, [f"is {NUMBERS[a + b]}"])
            else:
                for q in qs:
                    add("train", "plus", q, ans, [f"is {NUMBERS[a + b]}"])
    # minus: held-out (template, pair) combinations
    mpairs = [(a, b) for a in range(21) for b in range(min(a, 10) + 1)]
    rng.shuffle(mpairs)
    mheld = {p: ("test" if i < 15 else "dev") for i, p in enumerate(mpairs[:25])}
    for a, b in sorted(mpairs):
        qs = _minus_questions(NUMBERS[a], NUMBERS[b])
        ans = f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}"
        hold = rng.randrange(len(qs)) if (a, b) in mheld else -1
        for qi, q in enumerate(qs):
            add(mheld[(a, b)] if qi == hold else "train", "minus", q, ans, [f"is {NUMBERS[a - b]}"])
    for split in ("dev", "test"):
        rng.shuffle(splits[split])
        for i, ex in enumerate(splits[split]):
            ex.id = f"{split}-{i:05d}"
    return splits


def all_words(splits: dict[str, list[QAExample]] | None = None) -> list[str]:
    splits = splits or generate_splits()
    words = set()
    for exs in splits.values():
        for ex in exs:
            words.update(ex.question.split())
            words.update(ex.answer.split())
    return sorted(words)


def write_splits(splits: dict[str, list[QAExample]], out_dir: str | Path = DATA_DIR) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, exs in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for ex in exs:
                f.write(json.dumps(asdict(ex)) + "\n")


def load_split(name: str, data_dir: str | Path | None = None) -> list[QAExample]:
    """Load ``train``, ``dev`` or ``test`` from the bundled JSONL files."""
    path = Path(data_dir or DATA_DIR) / f"{name}.jsonl"
    with open(path) as f:
        return [QAExample.from_dict(json.loads(line)) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# sequence building (the contract with the decoding engine)
# ---------------------------------------------------------------------------------------------
_LEXICON_CACHE: dict[str, dict[str, list[str]]] = {}


def _lexicon(vocab: RefVocab) -> dict[str, list[str]]:
    lex = getattr(vocab, "lexicon", None)
    if lex is not None:
        return lex
    if "default" not in _LEXICON_CACHE:
        from .units import load_lexicon

        _LEXICON_CACHE["default"] = load_lexicon()
    return _LEXICON_CACHE["default"]


def example_seed(example: QAExample, salt: str = "") -> int:
    h = hashlib.sha256((example.id + "|" + example.question + "|" + salt).encode()).digest()
    return int.from_bytes(h[:4], "little")


def _norm_fmt(fmt: str) -> str:
    f = fmt.lower().replace("_", "-")
    if f in ("esi", "early-stop", "earlystop"):
        return "early-stop"
    if f == "padded":
        return "padded"
    raise ValueError(f"unknown format {fmt!r} (padded | early-stop)")


def build_prompt(
    example: QAExample, vocab: RefVocab, fmt: str = "early-stop", seed: int | None = None
) -> list[int]:
    """``<bos> <user> [question as speech units] <assistant> <fmt_tag>``."""
    fmt = _norm_fmt(fmt)
    seed = example_seed(example, "q") if seed is None else seed
    units = vocab.encode_units(example.question, _lexicon(vocab), seed)
    return [vocab.id(BOS), vocab.id(USER), *units, vocab.id(ASSISTANT), vocab.format_tag_id(fmt)]


def interleave(
    text_ids: Sequence[int],
    speech_ids: Sequence[int],
    vocab: RefVocab,
    fmt: str = "early-stop",
    ratio: tuple[int, int] = DEFAULT_RATIO,
) -> tuple[list[int], list[str]]:
    """Interleave a text stream with its speech (see :func:`build_answer`)."""
    fmt = _norm_fmt(fmt)
    T, S = ratio
    text = list(text_ids) + ([vocab.eot_id] if fmt == "early-stop" else [])
    ti = si = 0
    out: list[int] = []
    speech_only = False
    step = 0
    while True:
        if ti >= len(text) and si >= len(speech_ids):
            out.append(vocab.eos_id)
            break
        is_text_slot = (not speech_only) and (step % (T + S)) < T
        if is_text_slot:
            if ti < len(text):
                out.append(text[ti])
                if fmt == "early-stop" and text[ti] == vocab.eot_id:
                    speech_only = True
                ti += 1
            else:
                out.append(vocab.pad_id)
        else:
            if si < len(speech_ids):
                out.append(speech_ids[si])
                si += 1
            else:
                out.append(vocab.silence_id)
        step += 1
    modal = ["speech" if vocab.is_speech(t) else "text" for t in out]
    return out, modal


def build_answer(
    example: QAExample,
    vocab: RefVocab,
    fmt: str = "early-stop",
    ratio: tuple[int, int] = DEFAULT_RATIO,
    seed: int | None = None,
) -> tuple[list[int], list[str]]:
    """Answer token ids and per-token modality (``"text"`` / ``"speech"``).

    Generation starts with T text steps, then S speech steps, repeating; a step's modality is the
    modality of the token it produces. ``padded``: text slots after the last word hold ``<pad>``.
    ``early-stop``: the first text slot after the last word holds ``<eot>`` (always exactly one)
    and every later step is speech. Speech slots with no speech left while text (words, or the
    ``<eot>`` of early-stop) is still to come hold the silence unit. ``<eos>`` comes at the step
    after both streams are done, whatever the slot.
    The speech is the answer text's units, so text runs ahead of the speech it transcribes.
    """
    seed = example_seed(example, "a") if seed is None else seed
    text_ids = vocab.encode_words(example.answer)
    speech = vocab.encode_units(example.answer, _lexicon(vocab), seed)
    return interleave(text_ids, speech, vocab, fmt, ratio)


def build_sequence(example, vocab, fmt="early-stop", ratio=DEFAULT_RATIO, seed=None):
    """(prompt ids, answer ids, answer modalities) with independent question/answer renditions."""
    if seed is None:
        qs, as_ = None, None
    else:
        r = np.random.default_rng(seed)
        qs, as_ = int(r.integers(2**31)), int(r.integers(2**31))
    p = build_prompt(example, vocab, fmt, qs)
    a, m = build_answer(example, vocab, fmt, ratio, as_)
    return p, a, m


def answer_text_from_tokens(ids: Sequence[int], vocab: RefVocab) -> str:
    """The words among the tokens (no specials, no speech), stopping at ``<eos>``."""
    words = []
    for t in ids:
        t = int(t)
        if t == vocab.eos_id:
            break
        if vocab.is_word(t):
            words.append(vocab.tokens[t])
    return " ".join(words)


def speech_units_from_tokens(ids: Sequence[int], vocab: RefVocab) -> list[int]:
    """The speech unit ids among the tokens, stopping at ``<eos>``."""
    out = []
    for t in ids:
        t = int(t)
        if t == vocab.eos_id:
            break
        if vocab.is_speech(t):
            out.append(t)
    return out


def contains_answer(text: str, accepted: Sequence[str]) -> bool:
    """The contains-the-answer judge: any accepted string appears as whole words in ``text``."""
    padded = f" {' '.join(text.lower().split())} "
    return any(f" {' '.join(a.lower().split())} " in padded for a in accepted)


def build_assets(seed: int = 1234) -> None:
    """Regenerate data splits, the lexicon (needs espeak-ng) and vocab.json in the assets."""
    from .units import build_lexicon, save_lexicon

    splits = generate_splits(seed)
    write_splits(splits)
    words = all_words(splits)
    lex = build_lexicon(words)
    save_lexicon(lex, ASSET_DIR / "lexicon.json")
    phones = sorted({p for ps in lex.values() for p in ps})
    RefVocab(words=words, phonemes=phones).save(ASSET_DIR / "vocab.json")
    # homophone report
    seen: dict[tuple, str] = {}
    for w, ps in lex.items():
        if tuple(ps) in seen:
            print(f"homophones: {seen[tuple(ps)]} / {w} ({' '.join(ps)})")
        seen.setdefault(tuple(ps), w)
    print({k: len(v) for k, v in splits.items()}, "words", len(words), "phonemes", len(phones))


if __name__ == "__main__":
    build_assets()
