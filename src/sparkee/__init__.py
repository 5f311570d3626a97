"""sparkee: faster decoding for interleaved spoken language models (SPAR-K scheduled early exit)."""

from .backbone import SUPPORTED_ARCHITECTURES, Backbone, load_model, wrap_model
from .errors import SparkeeError
from .generate import Emitted, Generation, GenerationConfig, GenerationResult, generate, stream
from .heads import ExitHeads, load_heads, resolve_heads
from .schedule import Interleave, Policy, expected_depth, parse_interleave, parse_policy

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Backbone",
    "Emitted",
    "ExitHeads",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "Interleave",
    "Policy",
    "SparkeeError",
    "expected_depth",
    "generate",
    "load_heads",
    "load_model",
    "parse_interleave",
    "parse_policy",
    "resolve_heads",
    "stream",
    "wrap_model",
]
__version__ = "0.1.0"
