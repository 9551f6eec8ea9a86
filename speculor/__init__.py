"""speculor: lossless speculative decoding for Hugging Face causal language models.

The public names below import torch and transformers, which take seconds; they are loaded on first use, so that
`import speculor` (and with it every `speculor` command's start, `--help` included) stays quick. `speculor.models`
(the shipped family) needs neither and is always there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from speculor import models
from speculor.errors import SpeculorError

if TYPE_CHECKING:
    from speculor.adaptive import ConfidenceThreshold, FixedGamma, GammaPolicy, LeviathanGamma, LoadAwareGamma
    from speculor.api import SpeculativeDecoder, generate
    from speculor.engine import (
        BatchEngine,
        DecodeRequest,
        Delta,
        GenerationResult,
        GenerationStats,
        RowEvent,
        TokenLogprob,
    )
    from speculor.grammar import StructuredOutput

# Where each lazily loaded public name lives.
LAZY_NAMES = {
    "ConfidenceThreshold": "speculor.adaptive",
    "FixedGamma": "speculor.adaptive",
    "GammaPolicy": "speculor.adaptive",
    "LeviathanGamma": "speculor.adaptive",
    "LoadAwareGamma": "speculor.adaptive",
    "BatchEngine": "speculor.engine",
    "DecodeRequest": "speculor.engine",
    "RowEvent": "speculor.engine",
    "TokenLogprob": "speculor.engine",
    "SpeculativeDecoder": "speculor.api",
    "generate": "speculor.api",
    "Delta": "speculor.engine",
    "GenerationResult": "speculor.engine",
    "GenerationStats": "speculor.engine",
    "StructuredOutput": "speculor.grammar",
}


def __getattr__(name: str) -> object:
    module = LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'speculor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY_NAMES])


__all__ = [
    "BatchEngine",
    "ConfidenceThreshold",
    "DecodeRequest",
    "Delta",
    "FixedGamma",
    "GammaPolicy",
    "GenerationResult",
    "GenerationStats",
    "LeviathanGamma",
    "LoadAwareGamma",
    "RowEvent",
    "SpeculativeDecoder",
    "SpeculorError",
    "StructuredOutput",
    "TokenLogprob",
    "generate",
    "models",
]
__version__ = "0.1.0"
