"""Dialogue histories: the file format (JSON and JSONL), its loader and the Dialogue API."""

from __future__ import annotations

import json

import pytest

from sparkee import SparkeeError
from sparkee.models import Dialogue, Turn, load_history, parse_dialogue, save_history
from sparkee.models.dialogue import dialogue_to_json

DOC = {
    "model": "step-audio-2-mini",
    "system": "Be brief.",
    "turns": [
        {"role": "user", "speech": [812, 33, 4051]},
        {"role": "assistant", "ids": [151700, 9906, 151701], "meta": {"note": "ignored"}},
        {"role": "human", "text": "And in French?"},
    ],
}
TURNS = (
    Turn("user", speech=(812, 33, 4051)),
    Turn("assistant", ids=(151700, 9906, 151701)),
    Turn("user", text="And in French?"),
)


def test_json_document_loads(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps(DOC))
    d = load_history(p, "step-audio-2-mini")
    assert d == Dialogue(TURNS, "Be brief.", "step-audio-2-mini") and d.pending
    # a bare list of turns; no system key means the model's default (None), null means none ("")
    p.write_text(json.dumps(DOC["turns"][:2]))
    d = load_history(p)
    assert d.turns == TURNS[:2] and d.system is None and d.model is None and not d.pending
    p.write_text(json.dumps({"system": None, "turns": []}))
    assert load_history(p) == Dialogue((), "", None)


def test_jsonl_one_turn_per_line_with_a_system_line(tmp_path):
    p = tmp_path / "h.jsonl"
    lines = [{"role": "system", "text": "Be brief."}, *DOC["turns"]]
    p.write_text(
        "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:])
    )
    assert load_history(p) == Dialogue(TURNS, "Be brief.")


def test_save_and_load_round_trip(tmp_path):
    d = Dialogue(TURNS[:2], "", "glm-4-voice").ask(text="more").answer(text="sure")
    p = save_history(d, tmp_path / "out.json")
    assert load_history(p, "GLM-4-Voice") == d
    assert dialogue_to_json(d)["turns"][-1] == {"role": "assistant", "text": "sure"}


def test_ask_and_answer_keep_the_alternation():
    d = Dialogue().ask(speech=[1, 2])
    assert d.turns == (Turn("user", speech=(1, 2)),)
    with pytest.raises(SparkeeError, match="already ends with a user turn"):
        d.ask(text="again")
    d = d.answer([5, 6])
    with pytest.raises(SparkeeError, match="must follow a user turn"):
        d.answer([7])
    with pytest.raises(SparkeeError, match="needs speech codes or text"):
        d.ask()


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"turns": [{"role": "bot", "text": "x"}]}, "has role 'bot'"),
        ({"turns": [{"role": "user", "txt": "x"}]}, "unknown key 'txt'"),
        ({"turns": [{"role": "user"}]}, "needs 'speech' or 'text'"),
        ({"turns": [{"role": "user", "speech": [1, -2]}]}, "'speech' holds a negative number"),
        ({"turns": [{"role": "user", "speech": "1 2"}]}, "'speech' must be a list of whole numbers"),
        ({"turns": [{"role": "user", "speech": [1.5]}]}, "'speech' must be a list of whole numbers"),
        ({"turns": [{"role": "user", "ids": [1]}]}, "not 'ids'"),
        ({"turns": [{"role": "user", "text": "a"}, {"role": "assistant", "speech": [1]}]}, "not 'speech'"),
        (
            {"turns": [{"role": "user", "text": "a"}, {"role": "assistant", "ids": [1], "text": "b"}]},
            "not both",
        ),
        (
            {"turns": [{"role": "user", "text": "a"}, {"role": "assistant"}]},
            "needs the generated 'ids' or 'text'",
        ),
        (
            {"turns": [{"role": "assistant", "ids": [1]}]},
            "turn 1 should be a user turn",
        ),
        (
            {"turns": [{"role": "user", "text": "a"}, {"role": "user", "text": "b"}]},
            "turn 2 should be an assistant turn",
        ),
        ({"turns": [{"role": "user", "text": 3}]}, "'text' must be a string"),
        ({"turns": [], "extra": 1}, "unknown key 'extra'"),
        ({"system": "x"}, "has no 'turns' list"),
        ({"turns": {"role": "user"}}, "must be a list of turns"),
        ({"system": 3, "turns": []}, "'system' must be a string or null"),
        ({"system": "x", "turns": [{"role": "system", "text": "y"}]}, "gives the system prompt twice"),
        ({"model": "glm-4-voice", "turns": []}, "was written for glm-4-voice, not step-audio-2-mini"),
        ("just text", "must be a list of turns"),
        ([3], "turn 1 is not a JSON object"),
    ],
)
def test_bad_documents_are_one_sentence_errors(doc, message):
    with pytest.raises(SparkeeError, match=message) as e:
        parse_dialogue(doc, "step-audio-2-mini")
    assert "\n" not in str(e.value)


def test_bad_files_are_one_sentence_errors(tmp_path):
    with pytest.raises(SparkeeError, match="does not exist"):
        load_history(tmp_path / "none.json")
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(SparkeeError, match="is empty"):
        load_history(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text('{"turns": [')
    with pytest.raises(SparkeeError, match="is not valid JSON"):
        load_history(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"role": "user", "text": "a"}\n{oops\n')
    with pytest.raises(SparkeeError, match="line 2 of history file"):
        load_history(tmp_path / "bad.jsonl")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SparkeeError, match="cannot read history file"):
        load_history(tmp_path / "bin.json")
