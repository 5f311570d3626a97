"""sparkee's optional vLLM integration (install `sparkee[vllm]`; see docs/serving.md, "Serving with vLLM").

- `run`: offline plain vs speculative runs on token-id prompts, with the engine's acceptance counters;
- `proposer.ShallowProposer`: a `custom_class` proposer drafting with the target's own first L layers
  and sparkee's head (weights shared).

`register` is the `vllm.general_plugins` entry point: vLLM calls it in every process it starts. It
registers no model (the draft `sparkee export-draft` writes is a standard checkpoint vLLM loads as
it is); it checks the proposer's settings early when the proposer is asked for, so a bad setting
fails at start-up with one sentence instead of inside a worker.
"""

from __future__ import annotations

import os

PROPOSER = "sparkee.integrations.vllm.proposer.ShallowProposer"


def register() -> None:
    if os.environ.get("SPARKEE_VLLM_LAYER") is None:
        return
    from .proposer import read_settings

    read_settings()
