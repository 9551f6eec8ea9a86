"""Loading Hugging Face checkpoints and checking that a target and a draft speak the same vocabulary."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from speculor.errors import SpeculorError
from speculor.proposers import ParallelDraftSpec

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# How long a model name that is not on disk may spend finding out whether the hub answers at all.
HUB_PROBE_SECONDS = 3.0

# The files Hugging Face tokenizers are built from. A directory holding none of them has no tokenizer, whatever
# transformers makes of it: version 5 builds an empty placeholder (one to a few special tokens) for many
# architectures, whose length would then pass for the vocabulary and reject every prompt.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tekken.json",
    }
)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None

    @property
    def logits_width(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise SpeculorError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SpeculorError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None means float32 on the CPU (half precision is slow there) and bfloat16 on a GPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SpeculorError(f"unknown dtype {dtype!r}: choose one of float32, bfloat16, float16, float64")
    return DTYPES[dtype]


def load_model(source: str | os.PathLike | PreTrainedModel, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load a causal LM from a local directory or hub id, or adopt an already loaded model. A directory without a
    tokenizer is fine: prompts are then token ids and results carry no text."""
    if isinstance(source, PreTrainedModel):
        name = getattr(source.config, "name_or_path", None) or type(source).__name__
        tokenizer = _load_tokenizer(name) if name and os.path.isdir(name) else None
        return LoadedModel(name, source.to(device=device, dtype=dtype).eval(), tokenizer)
    name = os.fspath(source)
    name = os.path.expanduser(name)
    if not os.path.exists(name) and not HUB_ID.fullmatch(name):
        raise SpeculorError(f"model path {name!r} does not exist")
    if os.path.exists(name) and not os.path.isdir(name):
        raise SpeculorError(f"model path {name!r} is a file; give the directory holding config.json and weights")
    local_only = not os.path.isdir(name) and _hub_source(name) == "cache"
    try:
        with _quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as error:
        raise SpeculorError(f"could not load model {name!r}: {error}") from error
    return LoadedModel(name, model.to(device).eval(), _load_tokenizer(name))


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No "Loading weights" bar per model: a decoder loads two models and prints its own errors; the caller's
    setting is restored afterwards."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or now


def _hub_source(name: str) -> str:
    """Where a name that is not a local directory can load from: "cache" (the local Hugging Face cache, used
    without asking the hub: it may be unreachable) or "hub". Raises at once when it is neither, instead of letting
    transformers retry an unreachable hub for half a minute: offline (HF_HUB_OFFLINE), the hub not answering within
    HUB_PROBE_SECONDS, or the hub saying there is no such model."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "cache"
    neither = f"model {name!r} is neither a local directory nor in the Hugging Face cache"
    if _hub_offline():
        raise SpeculorError(f"{neither}, and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(name, timeout=HUB_PROBE_SECONDS)
    except GatedRepoError:
        return "hub"
    except RepositoryNotFoundError as error:
        raise SpeculorError(f"{neither}, and the hub has no such model (or it is private: log in)") from error
    except HfHubHTTPError:
        return "hub"
    except Exception as error:  # any transport failure (DNS, refused, timeout): the hub is unreachable
        raise SpeculorError(f"{neither}, and the Hugging Face hub is not reachable ({type(error).__name__})") from error
    return "hub"


def _has_tokenizer_files(directory: str) -> bool:
    return any(name in TOKENIZER_FILES or name.endswith(".tiktoken") for name in os.listdir(directory))


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer, or None when it has none: a directory without tokenizer files, a tokenizer that fails
    to load, or one whose vocabulary is nothing but special tokens (a placeholder, not a tokenizer)."""
    if os.path.isdir(name) and not _has_tokenizer_files(name):
        logger.info("no tokenizer files in %s: prompts must be token ids", name)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        logger.info("no tokenizer found for %s: prompts must be token ids", name)
        return None
    if set(tokenizer.get_vocab()) <= set(tokenizer.all_special_tokens):
        logger.info("the tokenizer of %s holds only special tokens, so it is ignored: prompts must be token ids", name)
        return None
    return tokenizer


def shared_vocab_size(target: LoadedModel, draft: LoadedModel) -> int:
    """The number of token ids both models can score, after checking that they mean the same tokens.

    With tokenizers on both sides the vocabularies must be identical; a model whose embedding is padded past its
    tokenizer (Qwen style) is fine, and logits are compared over the tokenizer's range. With a tokenizer on one side
    only, nothing can be compared: both models must score at least the tokenizer's range, and a warning says the
    vocabularies are assumed to agree. Without tokenizers the logits widths must agree.
    """
    if (target.tokenizer is None) != (draft.tokenizer is None):
        known, unknown = (target, draft) if target.tokenizer is not None else (draft, target)
        size = len(known.tokenizer)
        if unknown.logits_width < size:
            raise SpeculorError(
                f"model {unknown.name!r} has no tokenizer and scores {unknown.logits_width} tokens, fewer than the "
                f"{size} of the tokenizer of {known.name!r}; speculative decoding needs one shared vocabulary"
            )
        if known.logits_width < size:
            raise SpeculorError(f"model {known.name!r} scores {known.logits_width} tokens but its tokenizer has {size}")
        logger.warning(
            "model %r has a tokenizer and %r has none, so the vocabularies could not be compared: token ids below %d "
            "are assumed to mean the same tokens in both",
            known.name,
            unknown.name,
            size,
        )
        return size
    if target.tokenizer is not None and draft.tokenizer is not None:
        target_vocab, draft_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
        if target_vocab != draft_vocab:
            differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=str)[:3]
            raise SpeculorError(
                f"target {target.name!r} and draft {draft.name!r} have different tokenizers "
                f"({len(target_vocab)} vs {len(draft_vocab)} tokens; e.g. {differing}); speculative decoding needs "
                "one shared vocabulary"
            )
        size = len(target.tokenizer)
        for loaded in (target, draft):
            if loaded.logits_width < size:
                raise SpeculorError(
                    f"model {loaded.name!r} scores {loaded.logits_width} tokens but its tokenizer has {size}"
                )
        return size
    spec = ParallelDraftSpec.from_config(draft.model.config)
    if spec is not None and spec.mask_token_id == target.logits_width == draft.logits_width - 1:
        # A parallel draft scores its mask token past the shared range too; the proposer never drafts it.
        return target.logits_width
    if target.logits_width != draft.logits_width:
        raise SpeculorError(
            f"target {target.name!r} scores {target.logits_width} tokens and draft {draft.name!r} scores "
            f"{draft.logits_width}; without tokenizers to compare, the vocabularies must have the same size"
        )
    return target.logits_width


def eos_token_ids(model: PreTrainedModel) -> frozenset[int]:
    """Every end-of-sequence id of the model's generation config (falling back to its config)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
        if ids:
            break
    return frozenset(ids)
