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
    assert res.exit_code == 2 and "prompt is empty" in res.stderr
    res = run("--model", str(qwen_dir), "--prompt", "hello")
    assert res.exit_code == 2 and "needs a tokenizer" in res.stderr


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
    # the preset's own policy (spar-k at layer 22 of 28) and speech ids (151696..) cannot fit a
    # 6-layer, 96-token test model: both show that the preset was applied
    res = run("--model", str(qwen_dir), "--prompt-ids", "5", "--preset", "step-audio-2-mini")
    assert res.exit_code == 2 and "exit layer 22 in policy 'spar-k:even:22' is out of range" in res.stderr
    res = run(
        "--model",
        str(qwen_dir),
        "--prompt-ids",
        "5",
        "--preset",
        "step-audio-2-mini",
        "--speech-policy",
        "full",
    )
    assert res.exit_code == 2 and "outside the vocabulary" in res.stderr
