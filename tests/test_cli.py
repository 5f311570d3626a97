"""`sparkee generate`: JSON output and one-sentence errors with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from sparkee import ExitHeads, wrap_model
from sparkee.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["generate", *args])


def test_json_output_has_tokens_modalities_layers_and_stats(qwen_dir):
    res = run(
        "--model",
        str(qwen_dir),
        "--prompt-ids",
        "5,7,9",
        "--max-new-tokens",
        "10",
        "--interleave",
        "2:4",
        "--speech-policy",
        "spar-k:even:3",
        "--json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["tokens"]) == 10
    assert out["modalities"] == ["text"] * 2 + ["speech"] * 4 + ["text"] * 2 + ["speech"] * 2
    assert out["exit_layers"] == [6, 6, 6, 3, 6, 3, 6, 6, 6, 3]
    for key in (
        "avg_exit_layer_text",
        "avg_exit_layer_speech",
        "speech_depth_reduction_pct",
        "num_layers",
        "speech_agreement",
        "tokens_per_s",
        "flops_saved_pct",
        "predicted_speedup",
    ):
        assert key in out["stats"]
    assert out["stats"]["avg_exit_layer_speech"] == pytest.approx(4.5)


def test_verify_output_equals_full(qwen_dir):
    full = json.loads(
        run("--model", str(qwen_dir), "--prompt-ids", "1,2", "--max-new-tokens", "12", "--json").stdout
    )
    ver = run(
        "--model",
        str(qwen_dir),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "12",
        "--json",
        "--verify",
        "--interleave",
        "0:1",
        "--speech-policy",
        "fixed:2",
    )
    assert json.loads(ver.stdout)["tokens"] == full["tokens"]


def test_streaming_text_output(qwen_dir):
    res = run("--model", str(qwen_dir), "--prompt-ids", "5", "--max-new-tokens", "4", "--interleave", "0:1")
    assert res.exit_code == 0
    assert res.stdout.split("\n")[0].count("~@") == 4


def heads_of_other_model(tmp_path):
    return str(
        ExitHeads(wrap_model(tiny_model("qwen2", seed=7)), "tuned-lens", layers=[2]).save(
            tmp_path / "o.safetensors"
        )
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speech-policy", "nonsense"], "unknown policy 'nonsense'"),
        (["--speech-policy", "fixed:6"], "out of range"),
        (["--text-policy", "spar-k:XYZ:2"], "letters F and E"),
        (["--speech-ids", "90:300"], "outside the vocabulary"),
        (["--speech-ids", "9-3"], "must look like A:B"),
        (["--interleave", "a:b"], "must look like A:B"),
        (["--format", "early-stop"], "early-stop needs the text-end token"),
        (["--speech-vocab-only"], "needs the speech token range"),
        (["--heads", "OTHER", "--speech-policy", "fixed:2"], "made for another model"),
        (["--heads", "/nonexistent/h.safetensors"], "does not exist"),
        (["--speech-policy", "fixed:3", "--heads", "LAYER2"], "no head for exit layer 3"),
        (["--dtype", "float8"], "unknown dtype"),
    ],
)
def test_bad_inputs_exit_2_with_one_sentence(qwen_dir, tmp_path, args, message):
    if "OTHER" in args:
        args = [heads_of_other_model(tmp_path) if a == "OTHER" else a for a in args]
    if "LAYER2" in args:
        bb = wrap_model(tiny_model("qwen2"))
        path = str(ExitHeads(bb, "tuned-lens", layers=[2]).save(tmp_path / "l2.safetensors"))
        args = [path if a == "LAYER2" else a for a in args]
    base = ["--model", str(qwen_dir), "--prompt-ids", "5,7"]
    if "--interleave" not in args and "--format" not in args:
        base += ["--interleave", "1:2"]
    if "--format" in args:
        base += ["--interleave", "1:2"]
    res = run(*base, *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_model_dir_and_empty_prompt(qwen_dir, tmp_path):
    res = run("--model", str(tmp_path / "none"), "--prompt-ids", "1")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = run("--model", str(qwen_dir), "--prompt-ids", "")
    assert res.exit_code == 2 and "--prompt-ids is empty" in res.stderr
    res = run("--model", str(qwen_dir), "--prompt", "hello")
    assert res.exit_code == 2 and "need a tokenizer" in res.stderr


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2"
    )
    res = run("--model", str(tmp_path / "gpt2"), "--prompt-ids", "1")
    assert res.exit_code == 2
    assert "is not supported" in res.stderr and "Qwen2ForCausalLM" in res.stderr


def test_presets_apply_and_unknown_presets_are_named(qwen_dir):
    res = run("--model", str(qwen_dir), "--prompt-ids", "5", "--preset", "nope")
    assert res.exit_code == 2 and "unknown preset 'nope'" in res.stderr
    # the test model has no tokenizer files, so the preset cannot know its speech and stop ids
    res = run("--model", str(qwen_dir), "--prompt-ids", "5", "--preset", "step-audio-2-mini")
    assert res.exit_code == 2 and "--speech-ids" in res.stderr and len(res.stderr.splitlines()) == 1
    # given them, the preset's own policy (spar-k at layer 22 of 28) cannot fit a 6-layer model:
    # that shows the preset was applied
    ids = ["--speech-ids", "40:80", "--stop-ids", "1"]
    res = run("--model", str(qwen_dir), "--prompt-ids", "5", "--preset", "step-audio-2-mini", *ids)
    assert res.exit_code == 2 and "exit layer 22 in policy 'spar-k:even:22' is out of range" in res.stderr
    res = run(
        "--model", str(qwen_dir), "--prompt-ids", "5", "--preset", "step-audio-2-mini", *ids,
        "--speech-policy", "full", "--max-new-tokens", "6", "--seed", "1", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["modalities"][0] == "text"  # the preset's 1 text : 4 speech


@pytest.mark.parametrize("text", ["5 7 9", "5,7,9", "5, 7, 9", " 5  7,9 "])
def test_prompt_ids_take_commas_and_spaces(qwen_dir, text):
    res = run("--model", str(qwen_dir), "--prompt-ids", text, "--max-new-tokens", "3", "--trace", "--json")
    assert res.exit_code == 0, res.output
    assert [s["position"] for s in json.loads(res.stdout)["steps"]] == [2, 3, 4]  # a 3-token prompt


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1 2 x"], "whole numbers separated by commas or spaces"),
        (["--prompt-ids", "1;2"], "whole numbers separated by commas or spaces"),
        (["--prompt-ids", "1,,2"], "whole numbers separated by commas or spaces"),
        (["--prompt-ids", "-1"], "whole numbers separated by commas or spaces"),
        (["--prompt-ids", "1", "--stop-ids", "1 x"], "--stop-ids must be whole numbers"),
        (["--prompt-ids", "1", "--trace"], "give --json too"),
        (["--prompt-ids", "1", "--prefill-pool", ""], "--prefill-pool is empty"),
        (["--prompt-ids", "1", "--prefill-pool", "in=nan,deep=0.7@2"], "must be finite"),
        (["--prompt-ids", "1", "--prefill-pool", "in=inf,deep=0.7@2"], "must be finite"),
        (["--prompt-ids", "1", "--format", "zigzag", "--interleave", "1:2"], "unknown format 'zigzag'"),
    ],
)
def test_more_bad_inputs_exit_2_with_one_sentence(qwen_dir, args, message):
    res = run("--model", str(qwen_dir), *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_text_prompt_on_the_reference_model_is_spoken_and_answers_are_decoded():
    from sparkee.refslm import bundled_model_dir

    res = run("--model", str(bundled_model_dir()), "--prompt", "Tell me one plus two?", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["text"] == "one plus two is three" and out["speech_transcript"] == "one plus two is three"
    res = run(
        "--model", str(bundled_model_dir()), "--prompt", "tell me one plus two", "--max-new-tokens", "4"
    )
    assert res.exit_code == 0 and "text: one plus" in res.stdout
    res = run("--model", str(bundled_model_dir()), "--prompt", "what is a quokka")
    assert res.exit_code == 2 and "does not know the word 'quokka'" in res.stderr


@pytest.mark.parametrize("command", ["generate", "eval", "train-heads", "layer-report", "demo"])
def test_help_fits_80_columns_without_cutting_syntax(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0
    assert "\u2026" not in res.output  # rich's ellipsis: a word too long for the column was cut
    assert all(ord(c) < 0x2600 for c in res.output)  # box drawing, but no emoji made of "A:B:"
    if command == "eval":
        assert "A:B (A < B)" in res.output
    if command == "generate":
        flat = " ".join(res.output.replace("\u2502", " ").split())
        assert "spar-k:P:L with P = even, odd, triple" in flat and "in=T1,deep=T2@L" in flat


def test_ctrl_c_exits_130(qwen_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    args = ["eval", "--model", str(qwen_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    args += ["--policies", "full", "--interleave", "1:1", "--speech-ids", "40:80", "--max-new-tokens", "4"]
    res = CliRunner().invoke(app, [*args, "--transcriber", "test_cli:interrupt"])
    assert res.exit_code == 130 and "interrupted" in res.stderr


def interrupt(speech_ids):
    """A transcriber plug-in that stands in for the user pressing Ctrl-C."""
    raise KeyboardInterrupt
