"""Dialogue histories for multi-turn prompts: a small data model, a file format and its loader.

History file format (UTF-8; `.json` holds one document, `.jsonl` one turn per line):

    {"model": "step-audio-2-mini",                # optional: refused if it names another model
     "system": "You are a helpful assistant.",    # optional: absent = the model's default, "" or null = none
     "turns": [
       {"role": "user", "speech": [812, 33, 4051]},        # codes of the model's own speech tokenizer
       {"role": "assistant", "ids": [151700, 9906, 151701]},  # the ids the model generated
       {"role": "user", "text": "And in French?"}
     ]}

- A `.json` file may also be a bare list of turns. A `.jsonl` file has one turn object per line;
  a line `{"role": "system", "text": "..."}` (first only) sets the system prompt. Blank lines are skipped.
- `role`: "user" (or "human", Step-Audio-2's spelling), "assistant", or "system" (first turn only).
- A user turn has `speech` (a list of speech codes: 0..16383 for GLM-4-Voice's whisper-VQ
  tokenizer, 0..6560 for Step-Audio-2's CosyVoice-2 tokenizer), `text`, or both (speech first).
- An assistant turn has `ids`: the token ids the model produced, text and speech interleaved,
  as `sparkee generate --json` prints them under "tokens" (a trailing stop token may stay: the
  prompt builders drop it); or `text` for a reply given as plain text.
- Turns alternate user / assistant, starting with a user turn. A history that ends with an
  assistant turn is "previous turns": the caller adds the new question (`Dialogue.ask`).
- `meta` (any JSON) may accompany a turn or the document and is ignored.

An eval data line can carry the same document or list under a `history` key; `parse_dialogue`
turns either form into a `Dialogue`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import SparkeeError

ROLES = {"user": "user", "human": "user", "assistant": "assistant"}
TURN_KEYS = {"role", "speech", "text", "ids", "meta"}
DOC_KEYS = {"model", "system", "turns", "meta"}


@dataclass(frozen=True)
class Turn:
    """One turn: a user's question (speech codes and/or text) or the model's reply (ids or text)."""

    role: str  # "user" or "assistant"
    speech: tuple[int, ...] = ()
    text: str | None = None
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Dialogue:
    """Turns in order, the system prompt (None = the model's default, "" = none) and the model named by the file."""

    turns: tuple[Turn, ...] = ()
    system: str | None = None
    model: str | None = None

    def ask(self, speech: Sequence[int] | None = None, text: str | None = None) -> Dialogue:
        """This dialogue with a new user turn appended."""
        if not speech and not text:
            raise SparkeeError("a user turn needs speech codes or text")
        if self.turns and self.turns[-1].role == "user":
            raise SparkeeError("the history already ends with a user turn: answer it before asking again")
        turn = Turn("user", tuple(int(s) for s in speech or ()), text or None)
        return replace(self, turns=(*self.turns, turn))

    def answer(self, ids: Sequence[int] | None = None, text: str | None = None) -> Dialogue:
        """This dialogue with the model's reply appended (ids as generated, or plain text)."""
        if not self.turns or self.turns[-1].role != "user":
            raise SparkeeError("an assistant turn must follow a user turn")
        if not ids and not text:
            raise SparkeeError("an assistant turn needs the generated ids or text")
        return replace(
            self, turns=(*self.turns, Turn("assistant", ids=tuple(int(i) for i in ids or ()), text=text))
        )

    def with_system(self, system: str | None) -> Dialogue:
        return replace(self, system=system)

    @property
    def pending(self) -> bool:
        """True when the last turn is a user turn waiting for an answer."""
        return bool(self.turns) and self.turns[-1].role == "user"


def question(model: str, speech_ids, text, history, system: str | None) -> Dialogue:
    """The dialogue of a prompt builder's one question (`speech_ids` and/or `text`) after the
    turns of `history` (a `Dialogue` or turns); `system` goes in unless the history has its own."""
    if not speech_ids and not text:
        raise SparkeeError(f"a {model} prompt needs input speech ids or text")
    past = history if isinstance(history, Dialogue) else Dialogue(tuple(history or ()))
    if past.system is None:
        past = past.with_system(system)
    return past.ask(speech=speech_ids, text=text)


def check_codes(codes: Sequence[int], count: int, model: str) -> None:
    """Refuse a speech code outside the model's codebook (0..count-1)."""
    bad = [c for c in codes if not 0 <= c < count]
    if bad:
        raise SparkeeError(f"speech code {bad[0]} is outside {model}'s 0..{count - 1}")


def _ints(value, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SparkeeError(f"{where}: '{what}' must be a list of whole numbers")
    if any(v < 0 for v in value):
        raise SparkeeError(f"{where}: '{what}' holds a negative number")
    return tuple(value)


def _turn(obj, where: str) -> Turn:
    if not isinstance(obj, dict):
        raise SparkeeError(f"{where} is not a JSON object")
    unknown = sorted(set(obj) - TURN_KEYS)
    if unknown:
        raise SparkeeError(f"{where} has the unknown key '{unknown[0]}' (use role, speech, text, ids)")
    role = ROLES.get(str(obj.get("role", "")).lower())
    if role is None:
        raise SparkeeError(
            f"{where} has role {obj.get('role')!r}: use user, assistant or system (first turn)"
        )
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise SparkeeError(f"{where}: 'text' must be a string")
    if role == "user":
        if "ids" in obj:
            raise SparkeeError(f"{where}: a user turn gives 'speech' codes or 'text', not 'ids'")
        speech = _ints(obj["speech"], where, "speech") if "speech" in obj else ()
        if not speech and not text:
            raise SparkeeError(f"{where}: a user turn needs 'speech' or 'text'")
        return Turn("user", speech, text or None)
    if "speech" in obj:
        raise SparkeeError(f"{where}: an assistant turn gives the generated 'ids' (or 'text'), not 'speech'")
    ids = _ints(obj["ids"], where, "ids") if "ids" in obj else ()
    if not ids and not text:
        raise SparkeeError(f"{where}: an assistant turn needs the generated 'ids' or 'text'")
    if ids and text:
        raise SparkeeError(f"{where}: an assistant turn gives 'ids' or 'text', not both")
    return Turn("assistant", ids=ids, text=text or None)


def _check_order(turns: Sequence[Turn], where: str) -> None:
    for i, t in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise SparkeeError(
                f"{where}: turn {i + 1} should be {'a user' if want == 'user' else 'an assistant'} turn "
                "(turns alternate user, assistant, starting with user)"
            )


def _system_of(value, where: str) -> str | None:
    if value is None:
        return ""  # an explicit null means "no system prompt"
    if not isinstance(value, str):
        raise SparkeeError(f"{where}: 'system' must be a string or null")
    return value


def parse_dialogue(obj, model: str | None = None, where: str = "history") -> Dialogue:
    """A `Dialogue` from decoded JSON: a document `{"turns": [...], ...}` or a bare list of turns."""
    system: str | None = None
    named = None
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - DOC_KEYS)
        if unknown:
            raise SparkeeError(f"{where} has the unknown key '{unknown[0]}' (use model, system, turns)")
        if "turns" not in obj:
            raise SparkeeError(f"{where} has no 'turns' list")
        if "system" in obj:
            system = _system_of(obj["system"], where)
        named = obj.get("model")
        if named is not None and not isinstance(named, str):
            raise SparkeeError(f"{where}: 'model' must be a model name")
        items = obj["turns"]
    else:
        items = obj
    if not isinstance(items, list):
        raise SparkeeError(f"{where} must be a list of turns or an object with a 'turns' list")
    if items and isinstance(items[0], dict) and str(items[0].get("role", "")).lower() == "system":
        if system is not None:
            raise SparkeeError(f"{where} gives the system prompt twice")
        first = items[0]
        if set(first) - {"role", "text", "meta"}:
            raise SparkeeError(f"{where}: the system turn has only 'text'")
        system = _system_of(first.get("text"), where)
        items = items[1:]
    turns = tuple(_turn(t, f"{where}, turn {i + 1}") for i, t in enumerate(items))
    _check_order(turns, where)
    if model is not None and named is not None and named.strip().lower() != model.strip().lower():
        raise SparkeeError(f"{where} was written for {named}, not {model}")
    return Dialogue(turns, system, named or model)


def load_history(path: str | Path, model: str | None = None) -> Dialogue:
    """Read a history file (`.jsonl`: one turn per line; anything else: one JSON document)."""
    p = Path(path)
    if not p.is_file():
        raise SparkeeError(f"history file '{p}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SparkeeError(f"cannot read history file '{p}': {e}") from None
    if not text.strip():
        raise SparkeeError(f"history file '{p}' is empty")
    if p.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError:
                raise SparkeeError(f"line {n} of history file '{p}' is not valid JSON") from None
        return parse_dialogue(items, model, where=f"history file '{p}'")
    try:
        obj = json.loads(text)
    except ValueError:
        raise SparkeeError(
            f"history file '{p}' is not valid JSON (use .jsonl for one turn per line)"
        ) from None
    return parse_dialogue(obj, model, where=f"history file '{p}'")


def dialogue_to_json(d: Dialogue) -> dict:
    """The file form of a dialogue (what `load_history` reads back)."""
    turns = []
    for t in d.turns:
        item: dict = {"role": t.role}
        if t.speech:
            item["speech"] = list(t.speech)
        if t.ids:
            item["ids"] = list(t.ids)
        if t.text is not None:
            item["text"] = t.text
        turns.append(item)
    doc: dict = {}
    if d.model is not None:
        doc["model"] = d.model
    if d.system is not None:
        doc["system"] = d.system
    doc["turns"] = turns
    return doc


def save_history(d: Dialogue, path: str | Path) -> Path:
    """Write `d` as a `.json` document (e.g. after appending the model's answer, for the next turn)."""
    p = Path(path)
    p.write_text(json.dumps(dialogue_to_json(d), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return p


__all__ = ["Dialogue", "Turn", "dialogue_to_json", "load_history", "parse_dialogue", "save_history"]
