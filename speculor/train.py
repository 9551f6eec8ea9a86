"""`speculor train`: a byte-level BPE tokenizer and a family of Llama models trained together on Python source.

A family is one tokenizer plus models of different shapes (a target and its drafts), so every pair in it can be
used for speculative decoding. The default corpus is the running interpreter's own Python source (standard library
and site-packages), which every machine has, so the family can be retrained anywhere without a download.

`train_family` is the in-process entry point (the GPU benchmark calls it); `speculor.train_command` adds the CLI
subcommand (and `python -m speculor.train_command`) and imports this module only when the command runs; this module
never imports it.

Budgets are wall-clock seconds per model, so what a budget buys depends on the machine: the shipped family's
(target 180 s, drafts 40–90 s) were set on one H100-class GPU, where an 8×384 step of 32 × 1024 tokens takes a
fraction of a second; on a 2-core CPU the same step takes over a minute. Hence a corpus cap by default on the CPU
(`default_corpus_cap`) and the CPU-sized example in the README.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import platform
import re
import site
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speculor.errors import SpeculorError
from speculor.loading import resolve_device
from speculor.wording import counted

END_OF_TEXT = "<|endoftext|>"
SHAPE_PATTERN = re.compile(
    r"(?P<name>[A-Za-z0-9][\w.-]*):(?P<layers>\d+)x(?P<width>\d+)(?:@(?P<seconds>\d+(?:\.\d+)?))?"
)
# Files bigger than this are mostly generated tables (unicode data, test vectors), not code worth imitating.
LARGEST_CORPUS_FILE = 512 * 1024
HELD_OUT_PERCENT = 1
HELD_OUT_TOKENS = 1 << 20
# On the CPU the held-out pass over a million tokens would take minutes, longer than a small budget's training.
HELD_OUT_TOKENS_CPU = 1 << 16
TOKENIZER_SAMPLE_BYTES = 40_000_000
# Default corpus caps. The whole site-packages of a typical environment is hundreds of MB (one user's: 304 MB in
# 21,010 files, 11.6 GB peak memory and 146 s of tokenizer training on a CPU before the first step); a CPU cannot
# train on more than a few MB in any reasonable budget anyway. The shipped family used 200 MB on a GPU.
DEFAULT_CPU_CORPUS_BYTES = 8_000_000
DEFAULT_GPU_CORPUS_BYTES = 200_000_000


@dataclass(frozen=True)
class ModelShape:
    """A Llama model named `name` with `layers` decoder layers of hidden size `width`; `seconds` optionally
    overrides the family's per-model time budget. Written `name:LAYERSxWIDTH[@SECONDS]` on the command line."""

    name: str
    layers: int
    width: int
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> ModelShape:
        match = SHAPE_PATTERN.fullmatch(text.strip())
        if match is None:
            raise SpeculorError(f"model shape {text!r} must look like NAME:LAYERSxWIDTH or NAME:LAYERSxWIDTH@SECONDS")
        seconds = float(match["seconds"]) if match["seconds"] else None
        shape = cls(match["name"], int(match["layers"]), int(match["width"]), seconds)
        if shape.layers < 1 or shape.width < 16 or shape.width % 16:
            raise SpeculorError(f"model shape {text!r}: need at least 1 layer and a width that is a multiple of 16")
        return shape

    @property
    def head_dim(self) -> int:
        """64 like most Llamas when the width allows it; narrower heads only for toy widths."""
        return next(size for size in (64, 32, 16) if self.width % size == 0)

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def kv_heads(self) -> int:
        """Grouped-query attention with two query heads per key/value head where the head count allows it: it
        saves weight bytes (the shipped family has a size budget) and costs next to nothing in quality."""
        return self.heads // 2 if self.heads % 2 == 0 else self.heads

    @property
    def intermediate_size(self) -> int:
        """The SwiGLU width of Llama, 8/3 of the hidden size, rounded up to a multiple of 32."""
        return -(-8 * self.width // 3 // 32) * 32

    def config(self, vocab_size: int, context_length: int, end_of_text_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.width,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=context_length,
            tie_word_embeddings=True,
            bos_token_id=end_of_text_id,
            eos_token_id=end_of_text_id,
            pad_token_id=end_of_text_id,
        )

    def __str__(self) -> str:
        return f"{self.name}:{self.layers}x{self.width}"


@dataclass
class Corpus:
    """Documents split into training and held-out parts by a hash of each file's path (stable across runs)."""

    train: list[str]
    held_out: list[str]
    roots: list[str]
    files: int
    bytes: int


@dataclass
class TrainedModel:
    """What the model card reports about one trained model."""

    name: str
    shape: str
    path: str
    parameters: int
    steps: int
    tokens_seen: int
    seconds: float
    tokens_per_second: float
    final_train_loss: float
    held_out_loss: float
    distilled_from: str | None = None


@dataclass
class FamilyResult:
    """Everything `train_family` made: one directory per model (each with the shared tokenizer) and the numbers."""

    output_dir: str
    models: dict[str, TrainedModel]
    corpus_files: int
    corpus_bytes: int
    train_tokens: int
    held_out_tokens: int
    vocab_size: int
    device: str
    command: str
    date: str
    settings: dict = field(default_factory=dict)

    def path(self, name: str) -> str:
        return self.models[name].path


def default_corpus_roots() -> list[str]:
    """Where the running interpreter keeps Python source: the standard library and every site-packages."""
    paths = sysconfig.get_paths()
    candidates = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        candidates.append(user_site)
    roots: list[str] = []
    for candidate in candidates:
        resolved = os.path.realpath(candidate)
        if os.path.isdir(resolved) and resolved not in roots:
            roots.append(resolved)
    return roots


def default_corpus_cap(device: torch.device) -> int:
    """How many bytes of source `train_family` reads unless told otherwise: a few MB on the CPU, 200 MB on a GPU."""
    return DEFAULT_GPU_CORPUS_BYTES if device.type == "cuda" else DEFAULT_CPU_CORPUS_BYTES


def _held_out(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


def collect_corpus(roots: Sequence[str | os.PathLike] | None = None, max_bytes: int | None = None) -> Corpus:
    """Read every `.py` file under `roots` (default: the interpreter's own source) in sorted order, dropping
    duplicates by content hash, files that are not UTF-8 and very large generated files.

    With `max_bytes`, files are kept in the order of a hash of their path until the budget is spent, so a capped
    corpus is a deterministic sample of every package instead of the alphabetically first ones."""
    root_list = [os.path.realpath(os.fspath(root)) for root in roots] if roots else default_corpus_roots()
    for root in root_list:
        if not os.path.isdir(root):
            raise SpeculorError(f"corpus directory {root!r} does not exist")
    found: dict[str, tuple[str, str]] = {}
    for root in root_list:
        for directory, subdirectories, filenames in os.walk(root):
            subdirectories.sort()
            for filename in sorted(filenames):
                if filename.endswith(".py"):
                    path = os.path.join(directory, filename)
                    found.setdefault(os.path.realpath(path), (root, os.path.relpath(path, root)))
    entries = sorted(found.items(), key=lambda item: (item[1][1], item[1][0]))
    if max_bytes is not None:
        sizes = {path: os.path.getsize(path) for path, _ in entries}
        budget, chosen = max_bytes, set()
        for path, _ in sorted(entries, key=lambda item: hashlib.sha256(item[1][1].encode()).digest()):
            if sizes[path] <= min(budget, LARGEST_CORPUS_FILE):
                chosen.add(path)
                budget -= sizes[path]
        entries = [entry for entry in entries if entry[0] in chosen]
    seen: set[bytes] = set()
    train: list[str] = []
    held_out: list[str] = []
    total = 0
    for path, (_, relative) in entries:
        try:
            with open(path, "rb") as handle:
                data = handle.read(LARGEST_CORPUS_FILE + 1)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).digest()
        if len(data) > LARGEST_CORPUS_FILE or not text.strip() or digest in seen:
            continue
        seen.add(digest)
        total += len(data)
        (held_out if _held_out(relative) else train).append(text)
    if not train:
        raise SpeculorError(f"no usable .py files under {', '.join(root_list)}")
    if not held_out:
        held_out.append(train.pop())
    return Corpus(train, held_out, root_list, len(train) + len(held_out), total)


def read_corpus(roots: Sequence[str | os.PathLike] | None, max_bytes: int | None, say: Callable[[str], None]) -> Corpus:
    """`collect_corpus`, with a line before it saying how much it will read and one after saying what it read and
    how long that took: a large corpus takes minutes to read, and a silent command looks hung."""
    began = time.perf_counter()
    say(f"corpus: reading .py files, {'all of them' if max_bytes is None else f'at most {max_bytes / 1e6:g} MB'} …")
    documents = collect_corpus(roots, max_bytes)
    say(
        f"corpus: {counted(documents.files, 'file')}, {documents.bytes:,} bytes from {', '.join(documents.roots)} "
        f"({time.perf_counter() - began:.0f} s)"
    )
    return documents


def build_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose only special token is the end-of-text separator (also used as BOS).

    Each "\\n" is split off as a token of its own before byte-level BPE sees the text. Plain byte-level BPE would
    merge a newline with the indentation after it, so a prompt ending in a bare "\\n" (every HumanEval prompt) would
    end in a token the model never saw there; with the newline isolated, such a prompt tokenizes exactly like
    training text and the model continues with the indentation. Encoding prepends the end-of-text token, so a prompt
    starts like every training document does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    end_of_text_id = tokenizer.token_to_id(END_OF_TEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A",
        pair=f"{END_OF_TEXT} $A {END_OF_TEXT} $B",
        special_tokens=[(END_OF_TEXT, end_of_text_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> torch.Tensor:
    """One long 1-D stream: each document preceded by the end-of-text token (the template adds it), so the model
    learns to end a file with it and to start one after it."""
    encoded = tokenizer.backend_tokenizer.encode_batch_fast(list(documents))
    return torch.from_numpy(np.concatenate([np.asarray(item.ids, dtype=np.int32) for item in encoded]))


def tokenizer_sample(documents: Sequence[str], max_bytes: int = TOKENIZER_SAMPLE_BYTES) -> list[str]:
    """Every k-th document, with k chosen to keep about `max_bytes`: BPE merges settle long before the whole corpus,
    and training them on all of it would cost minutes."""
    total = sum(len(document) for document in documents)
    stride = max(1, math.ceil(total / max_bytes))
    return list(documents[::stride])


def learning_rate_for(width: int) -> float:
    """Narrow models take larger steps; 2e-3 at width 256, shrinking with the square root of the width."""
    return min(3e-3, 2e-3 * math.sqrt(256 / width))


def learning_rate_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine decay to `floor` × peak. `progress` is the
    fraction of the budget spent (steps or seconds), so a time budget gets a full schedule too."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    decay = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * decay)))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per token, averaged: the draft learns the target's whole next-token
    distribution, which is what acceptance rewards, rather than only the corpus's next token."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")


def _windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return stream[starts.view(-1, 1) + torch.arange(length + 1, device=stream.device)].long()


def _autocast(device: torch.device):
    """bfloat16 autocast on a GPU; full float32 on the CPU, where half precision is slow."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, stream: torch.Tensor, sequence_length: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of the held-out stream (at most HELD_OUT_TOKENS, or
    HELD_OUT_TOKENS_CPU on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    usable = min(stream.numel() - 1, HELD_OUT_TOKENS if device.type == "cuda" else HELD_OUT_TOKENS_CPU)
    length = min(sequence_length, usable)
    starts = torch.arange(0, usable - length + 1, length, device=device)
    total, count = 0.0, 0
    for batch in starts.split(batch_size):
        tokens = _windows(stream, batch, length)
        with _autocast(device):
            logits = model(input_ids=tokens[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum").item()
        count += tokens[:, 1:].numel()
    model.train()
    return total / count


# The progress bar's postfix (steps, smoothed losses, throughput) is redrawn at most this often; the losses shown are
# exponential moving averages over about 1 / LOSS_SMOOTHING steps, since one batch's loss is noisy.
POSTFIX_SECONDS = 1.0
LOSS_SMOOTHING = 0.1
TIME_BUDGET_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]"


def _training_postfix(steps: int, losses: torch.Tensor, tokens: int, seconds: float) -> str:
    """Step count, speed and the smoothed training losses, each named: "train CE" is next-token cross-entropy on
    the corpus, in the same units as the held-out loss printed at the end; a distilled model adds its training
    objective, the KL divergence to the teacher (near zero long before the cross-entropy is small)."""
    seconds = max(seconds, 1e-9)
    cross_entropy, *kl = losses.tolist()
    shown = f"train CE {cross_entropy:.3f}" + (f", KL to teacher {kl[0]:.3f}" if kl else "")
    return f"step {steps}, {steps / seconds:.2f} steps/s, {shown}, {tokens / seconds:,.0f} tok/s"


@dataclass
class TrainSettings:
    """How one model is trained. Exactly one of `seconds` and `steps` bounds it (steps win when both are set)."""

    seconds: float | None = 60.0
    steps: int | None = None
    batch_size: int = 32
    sequence_length: int = 1024
    learning_rate: float | None = None
    weight_decay: float = 0.1
    seed: int = 0
    progress: bool = True


def train_model(
    shape: ModelShape,
    train_stream: torch.Tensor,
    held_out_stream: torch.Tensor,
    vocab_size: int,
    end_of_text_id: int,
    settings: TrainSettings,
    teacher: LlamaForCausalLM | None = None,
) -> tuple[LlamaForCausalLM, dict]:
    """Train one model from scratch on random windows of `train_stream` (already on the training device). With a
    `teacher`, the loss is the distillation loss against it instead of the corpus's next token."""
    device = train_stream.device
    length = settings.sequence_length
    if train_stream.numel() <= length + 1:
        raise SpeculorError(
            f"the training corpus has {train_stream.numel()} tokens, fewer than one window of {length + 1}; "
            "give a larger corpus or a shorter --sequence-length"
        )
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(shape.config(vocab_size, length, end_of_text_id)).to(device)
    model.generation_config.eos_token_id = end_of_text_id
    model.generation_config.bos_token_id = end_of_text_id
    model.generation_config.pad_token_id = end_of_text_id
    model.train()
    peak = settings.learning_rate or learning_rate_for(shape.width)
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    sampler = torch.Generator().manual_seed(settings.seed)
    budget_seconds = shape.seconds if shape.seconds is not None else settings.seconds
    use_steps = settings.steps is not None or budget_seconds is None
    total = settings.steps if use_steps else budget_seconds
    if not total or total <= 0:
        raise SpeculorError("give a positive number of steps or seconds to train for")
    bar = tqdm(
        total=int(total) if use_steps else round(total),
        desc=str(shape),
        unit="step",
        # A time budget counts seconds, whose rate (seconds per second) means nothing: the postfix has steps/s.
        bar_format=None if use_steps else TIME_BUDGET_BAR,
        disable=not settings.progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    steps = 0
    smoothed_losses: torch.Tensor | None = None
    shown_at = -math.inf
    last_step_seconds = 0.0
    while True:
        elapsed = time.perf_counter() - started
        progress = steps / total if use_steps else elapsed / total
        # A time budget stops before a step that would end past it (judged by the last step's duration), so a run
        # ends within one step of its budget even when a step takes a large part of it (a big model on a CPU).
        if progress >= 1 or (not use_steps and steps and elapsed + last_step_seconds > total):
            break
        step_began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(progress, peak)
        starts = torch.randint(0, train_stream.numel() - length - 1, (settings.batch_size,), generator=sampler)
        tokens = _windows(train_stream, starts.to(device), length)
        inputs = tokens[:, :-1]
        with _autocast(device):
            logits = model(input_ids=inputs).logits
            cross_entropy = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            if teacher is None:
                loss = cross_entropy
                step_losses = cross_entropy.detach()[None]
            else:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=inputs).logits
                loss = distillation_loss(logits, teacher_logits)
                step_losses = torch.stack([cross_entropy.detach(), loss.detach()])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        # Smoothed on the device, and read (a host sync) only when the postfix is redrawn.
        smoothed_losses = step_losses if smoothed_losses is None else smoothed_losses.lerp(step_losses, LOSS_SMOOTHING)
        now = time.perf_counter()
        last_step_seconds = now - step_began
        if settings.progress and now - shown_at >= POSTFIX_SECONDS:
            shown_at = now
            bar.set_postfix_str(_training_postfix(steps, smoothed_losses, steps * inputs.numel(), now - started))
        bar.update(1 if use_steps else min(round(now - started), bar.total) - bar.n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if settings.progress and smoothed_losses is not None:
        postfix = _training_postfix(steps, smoothed_losses, steps * inputs.numel(), seconds)
        if not use_steps:
            postfix += f"; stopped after {seconds:.1f} s of a {total:g} s budget"
        bar.set_postfix_str(postfix)
    bar.close()
    loss_value = cross_entropy.item()
    tokens_seen = steps * settings.batch_size * length
    report = {
        "steps": steps,
        "tokens_seen": tokens_seen,
        "seconds": seconds,
        "tokens_per_second": tokens_seen / seconds,
        "final_train_loss": loss_value,
        "held_out_loss": held_out_loss(model, held_out_stream, length, settings.batch_size),
    }
    return model.eval(), report


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} thread{'s' if threads != 1 else ''})"


def what_it_writes(held_out: float, vocab_size: int) -> str:
    """What a model card may claim about the output, judged from the measured held-out cross-entropy (nats per
    token) rather than hoped for: the shipped target (1.58) writes plausible Python, a model a few steps old (near
    ln(vocabulary), the loss of guessing uniformly) writes noise. The thresholds come from reading the shipped
    family's completions (held-out losses 1.6–2.8)."""
    if held_out < 2.0:
        return "It writes plausible Python for a few lines at a time"
    if held_out < 3.0:
        return "It writes Python-shaped text (indentation, keywords, common idioms) with frequent mistakes"
    if held_out < 5.0:
        return "It has learned little beyond common tokens and indentation; its output is rarely valid Python"
    return (
        f"It is barely trained (held-out loss {held_out:.2f} against {math.log(vocab_size):.2f} for guessing "
        "uniformly) and writes close to noise"
    )


def model_card(result: FamilyResult, trained: TrainedModel, config: LlamaConfig) -> str:
    """A README.md in the Hugging Face model-card spirit: what the model is and exactly how it was made, and what
    its measured held-out loss says it can do."""
    distilled = (
        f"Trained by distillation from `{trained.distilled_from}` (forward KL to its next-token distribution)."
        if trained.distilled_from
        else "Trained on next-token cross-entropy."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [speculor, llama, python, speculative-decoding]
---

# {trained.name} ({trained.shape})

A small Llama model for Python code, trained from scratch with `speculor train` as part of a family of models that
share one tokenizer, so that a larger one (the target) can be paired with a smaller one (the draft) for speculative
decoding. {what_it_writes(trained.held_out_loss, result.vocab_size)}; it is a test and demonstration model, not
an assistant.

| | |
|---|---|
| architecture | Llama, {counted(config.num_hidden_layers, "layer")}, hidden size {config.hidden_size}, \
{counted(config.num_attention_heads, "head")} ({config.num_key_value_heads} key/value), \
MLP {config.intermediate_size}, tied embeddings |
| parameters | {trained.parameters:,} |
| vocabulary | {result.vocab_size:,} byte-level BPE tokens, newline isolated; `<|endoftext|>` is BOS and EOS |
| context | {config.max_position_embeddings} tokens (training windows of the same length) |
| corpus | {result.corpus_files:,} de-duplicated Python files, {result.corpus_bytes:,} bytes: \
{result.train_tokens:,} training tokens, {result.held_out_tokens:,} held-out tokens (1% of files, by path hash) |
| training | {counted(trained.steps, "step")}, {trained.tokens_seen:,} tokens seen, {trained.seconds:.0f} s at \
{trained.tokens_per_second:,.0f} tokens/s |
| held-out loss | {trained.held_out_loss:.4f} nats/token (cross-entropy against the corpus) |
| hardware | {result.device} |
| date | {result.date} |

{distilled} AdamW (β = 0.9, 0.95, weight decay 0.1), linear warm-up then cosine decay, gradient clipping at 1.0,
bfloat16 autocast on a GPU. Weights are stored in float16; load them in float32 on a CPU.

Command:

```
{result.command}
```
"""


def save_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    directory: Path,
    card: str,
    max_shard_size: str = "15MB",
) -> None:
    """Save a float16 copy of the weights (exact when loaded back in float32; half the bytes), sharded so no file is
    large. The model itself stays in float32: it may still teach the models after it."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(dtype=torch.float16).save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(card)


def progress_printer(enabled: bool) -> Callable[[str], None]:
    """A function that prints a progress line on stderr above any progress bar, or does nothing when disabled."""

    def say(message: str) -> None:
        if enabled:
            tqdm.write(message, file=sys.stderr)

    return say


def train_family(
    output_dir: str | os.PathLike,
    models: Sequence[str | ModelShape],
    *,
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_corpus_bytes: int | Literal["auto"] | None = "auto",
    vocab_size: int = 8192,
    seconds: float | None = 60.0,
    steps: int | None = None,
    batch_size: int = 32,
    sequence_length: int = 1024,
    learning_rate: float | None = None,
    distill_from: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
) -> FamilyResult:
    """Train a tokenizer and then each model in `models` (in order) and save each as a Hugging Face directory
    `output_dir/<name>` holding config, generation config, float16 safetensors, the tokenizer and a model card.

    `models` are `ModelShape`s or strings like "target:12x768" or "draft:4x256@30" (30 s for that one). Each model
    trains for `seconds` (or `steps`, which wins). With `distill_from` naming a model listed earlier, every later
    model learns that model's next-token distribution instead of the corpus's next token; naming a saved model's
    directory instead (a family's target) distills every model from it, with its tokenizer (no new one is trained).
    `corpus` is a directory (or several) of .py files; by default the interpreter's own source. It is read up to
    `max_corpus_bytes` ("auto": `default_corpus_cap` of the device; None: all of it). Also writes
    `output_dir/family.json`."""
    shapes = [ModelShape.parse(item) if isinstance(item, str) else item for item in models]
    if not shapes:
        raise SpeculorError("name at least one model to train, e.g. target:8x384")
    names = [shape.name for shape in shapes]
    if len(set(names)) != len(names):
        raise SpeculorError(f"model names must be unique, got {names}")
    teacher_directory = distill_from if distill_from is not None and os.path.isdir(distill_from) else None
    if distill_from is not None and teacher_directory is None and distill_from not in names[:-1]:
        raise SpeculorError(
            f"distill_from={distill_from!r} must be a saved model's directory or name a model trained before "
            f"another one: {names}"
        )
    if vocab_size < 300:
        raise SpeculorError(f"vocab_size must be at least 300 (256 bytes plus merges), got {vocab_size}")
    if steps is None and not seconds and any(not shape.seconds for shape in shapes):
        raise SpeculorError("give a positive number of steps or seconds to train for")
    resolved = resolve_device(device)
    say = progress_printer(progress)
    if resolved.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    roots = None if corpus is None else [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    cap = default_corpus_cap(resolved) if max_corpus_bytes == "auto" else max_corpus_bytes
    began = time.perf_counter()
    documents = read_corpus(roots, cap, say)
    teacher = None
    if teacher_directory is None:
        sample = tokenizer_sample(documents.train)
        say(f"tokenizer: training {vocab_size:,} BPE tokens on {sum(map(len, sample)) / 1e6:.1f} MB of text …")
        tokenizer = build_tokenizer(sample, vocab_size, progress=progress)
    else:
        tokenizer, teacher = _load_teacher(teacher_directory, resolved)
    say("tokenizer: encoding the corpus …")
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    train_stream = encode_documents(tokenizer, documents.train).to(resolved)
    held_out_stream = encode_documents(tokenizer, documents.held_out).to(resolved)
    actual_vocab = len(tokenizer)
    say(
        f"tokenizer: {actual_vocab:,} tokens; {train_stream.numel():,} training and {held_out_stream.numel():,} "
        f"held-out tokens ({time.perf_counter() - began:.0f} s)"
    )
    settings = TrainSettings(
        seconds=seconds,
        steps=steps,
        batch_size=batch_size,
        sequence_length=sequence_length,
        learning_rate=learning_rate,
        seed=seed,
        progress=progress,
    )
    result = FamilyResult(
        output_dir=os.fspath(output_dir),
        models={},
        corpus_files=documents.files,
        corpus_bytes=documents.bytes,
        train_tokens=train_stream.numel(),
        held_out_tokens=held_out_stream.numel(),
        vocab_size=actual_vocab,
        device=hardware_name(resolved),
        command=command or f"train_family({os.fspath(output_dir)!r}, {[str(shape) for shape in shapes]!r}, ...)",
        date=datetime.date.today().isoformat(),
        settings=asdict(settings) | {"vocab_size": vocab_size, "distill_from": distill_from, "max_corpus_bytes": cap},
    )
    teacher_name = Path(teacher_directory).name if teacher_directory is not None else distill_from
    say(training_plan(shapes, settings))
    for shape in shapes:
        model, numbers = train_model(
            shape, train_stream, held_out_stream, actual_vocab, end_of_text_id, settings, teacher
        )
        directory = Path(output_dir) / shape.name
        trained = TrainedModel(
            name=shape.name,
            shape=f"{shape.layers}x{shape.width}",
            path=os.fspath(directory),
            parameters=sum(parameter.numel() for parameter in model.parameters()),
            distilled_from=teacher_name if teacher is not None else None,
            **numbers,
        )
        result.models[shape.name] = trained
        say(
            f"{shape}: {trained.parameters:,} parameters, {counted(trained.steps, 'step')}, "
            f"{trained.tokens_seen:,} tokens, held-out loss {trained.held_out_loss:.4f}"
        )
        save_model(model, tokenizer, directory, model_card(result, trained, model.config))
        if shape.name == distill_from:
            teacher = model
    (Path(output_dir) / "family.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def training_plan(shapes: Sequence[ModelShape], settings: TrainSettings) -> str:
    """What the training will cost, said before it starts: each model's budget (as `train_model` applies it) and
    the seconds they add up to."""
    if settings.steps is not None:
        return f"training: {counted(len(shapes), 'model')}, {counted(settings.steps, 'step')} each"
    budgets = [shape.seconds if shape.seconds is not None else settings.seconds for shape in shapes]
    each = ", ".join(f"{shape.name} {budget:g} s" for shape, budget in zip(shapes, budgets, strict=True))
    return f"training: {each}; {sum(budgets):g} s in all, plus a held-out pass after each model"


def _load_teacher(directory: str, device: torch.device) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """A saved model to distill new drafts from, with its tokenizer: the drafts must speak its vocabulary."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise SpeculorError(f"cannot load the model to distill from, {directory!r}: {error}") from error
    if END_OF_TEXT not in tokenizer.get_vocab():
        raise SpeculorError(f"{directory!r} was not made by speculor train: its tokenizer has no {END_OF_TEXT}")
    return tokenizer, teacher.to(device).eval()
