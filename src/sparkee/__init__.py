"""sparkee: faster decoding for interleaved spoken language models (SPAR-K scheduled early exit)."""

from . import hf
from .accept import AcceptRule, parse_accept
from .backbone import SUPPORTED_ARCHITECTURES, Backbone, load_model, wrap_model
from .engine import Engine
from .errors import SparkeeError
from .generate import (
    BatchGeneration,
    Emitted,
    Generation,
    GenerationConfig,
    GenerationResult,
    generate,
    generate_batch,
    stream,
    stream_batch,
)
from .heads import ExitHeads, load_heads, resolve_heads
from .profiles import ModelProfile, load_profile, resolve_config
from .schedule import Interleave, Policy, expected_depth, parse_interleave, parse_policy

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AcceptRule",
    "BatchGeneration",
    "Backbone",
    "Emitted",
    "Engine",
    "ExitHeads",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "ModelProfile",
    "Interleave",
    "Policy",
    "SparkeeError",
    "expected_depth",
    "generate",
    "generate_batch",
    "load_heads",
    "load_model",
    "load_profile",
    "parse_accept",
    "parse_interleave",
    "parse_policy",
    "resolve_config",
    "resolve_heads",
    "stream",
    "stream_batch",
    "wrap_model",
]
__version__ = "0.1.0"

hf.warn_if_untested()  # one line on stderr when transformers is outside the tested range
