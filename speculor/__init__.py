"""speculor: lossless speculative decoding for Hugging Face causal language models."""

from speculor.adaptive import ConfidenceThreshold, FixedGamma, GammaPolicy, LeviathanGamma
from speculor.api import SpeculativeDecoder, generate
from speculor.engine import Delta, GenerationResult, GenerationStats
from speculor.errors import SpeculorError

__all__ = [
    "ConfidenceThreshold",
    "Delta",
    "FixedGamma",
    "GammaPolicy",
    "GenerationResult",
    "GenerationStats",
    "LeviathanGamma",
    "SpeculativeDecoder",
    "SpeculorError",
    "generate",
]
__version__ = "0.1.0"
