"""`speculor train-parallel`: turn a trained draft into a parallel draft (PARD, arXiv 2504.18583), which proposes K
tokens in one forward.

The draft gets one more embedding row, the mask token (id V, past the vocabulary it shares with the target, so the
target never sees it). It learns to read a context followed by K − 1 masks and to predict, at the last real token
and at each mask, the tokens 1, 2, …, K ahead. Training packs many such cut points into one forward (PARD's
attention-mask trick): a window of real tokens, causal as usual, followed by one block of K − 1 masks per cut
point; a block attends to the real tokens up to its cut and to its own earlier masks, and carries the positions
those masks would have at that cut. So every real position trains offset 1 (what the draft already knew) and each
cut trains offsets 2..K, for the price of one forward of the window plus the masks. With a teacher (the target)
the loss is the forward KL to its next-token distribution at each offset's position, as `speculor train
--distill-from` does; otherwise cross-entropy against the corpus. Offsets are weighted equally.

Corpus and tokenizer come from `speculor.train` (the same hash-split Python source), so held-out numbers compare.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from speculor.errors import SpeculorError
from speculor.loading import resolve_device
from speculor.proposers import PARALLEL_DRAFT_KEY, ParallelDraftSpec
from speculor.train import (
    default_corpus_cap,
    distillation_loss,
    encode_documents,
    hardware_name,
    learning_rate_at,
    progress_printer,
    read_corpus,
)
from speculor.wording import counted

DEFAULT_MAX_GAMMA = 6
HELD_OUT_WINDOWS = 64


@dataclass
class ParallelTrainResult:
    """What the model card reports: how the parallel draft was made and how well each offset predicts."""

    output_dir: str
    base_draft: str
    teacher: str | None
    max_gamma: int
    mask_token_id: int
    parameters: int
    steps: int
    seconds: float
    windows_seen: int
    cuts_per_window: int
    sequence_length: int
    final_train_loss: float
    held_out_loss_by_offset: list[float]
    held_out_accuracy_by_offset: list[float]
    accuracy_against: str
    device: str
    command: str
    date: str


def cut_points(length: int, max_gamma: int, cuts: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`cuts` distinct positions t in a window of `length` tokens where a context ends, each leaving the K tokens
    after it inside the window (t + K ≤ length − 1); random with a generator, evenly spread without one."""
    last = length - 1 - max_gamma
    if last < 0:
        raise SpeculorError(f"a window of {length} tokens is too short to train {max_gamma} offsets")
    cuts = min(cuts, last + 1)
    if generator is None:
        return torch.linspace(0, last, cuts).round().long().unique()
    return torch.randperm(last + 1, generator=generator)[:cuts].sort().values


def packed_inputs(
    windows: torch.Tensor, cuts: torch.Tensor, max_gamma: int, mask_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids (B, L + C·(K−1)), position ids and a boolean attention mask (B, 1, T, T), True where attention is
    allowed, for windows (B, L) with the same cut points `cuts` (C,) in every window (see the module docstring)."""
    batch, length = windows.shape
    masks_per_cut = max_gamma - 1
    device = windows.device
    cuts = cuts.to(device)
    mask_ids = torch.full((batch, cuts.numel() * masks_per_cut), mask_token_id, dtype=windows.dtype, device=device)
    input_ids = torch.cat([windows, mask_ids], dim=1)
    offsets = torch.arange(1, max_gamma, device=device)
    mask_positions = (cuts[:, None] + offsets).reshape(-1)
    positions = torch.cat([torch.arange(length, device=device), mask_positions])
    total = positions.numel()
    real = torch.arange(length, device=device)
    block = torch.cat(
        [
            torch.full((length,), -1, device=device),
            torch.arange(cuts.numel(), device=device).repeat_interleave(masks_per_cut),
        ]
    )
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:length, :length] = real[None, :] <= real[:, None]
    # A mask sees the real tokens up to its cut, and the masks of its own block up to itself.
    allowed[length:, :length] = real[None, :] <= cuts.repeat_interleave(masks_per_cut)[:, None]
    same_block = block[length:, None] == block[None, length:]
    allowed[length:, length:] = same_block & (positions[None, length:] <= positions[length:, None])
    return input_ids, positions.expand(batch, -1), allowed.expand(batch, 1, -1, -1)


def offset_positions(length: int, cuts: torch.Tensor, max_gamma: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each offset 1..K, (where the student's prediction sits in the packed sequence, the window position whose
    next token is the answer — also where the teacher's logits for it sit). Offset 1 is every real position but the
    last; offset i + 1 is the i-th mask of every cut."""
    cuts = cuts.cpu()
    every_real = torch.arange(length - 1)
    pairs = [(every_real, every_real)]
    for mask_index in range(max_gamma - 1):
        packed = length + torch.arange(cuts.numel()) * (max_gamma - 1) + mask_index
        pairs.append((packed, cuts + mask_index + 1))
    return pairs


def offset_losses(
    student_logits: torch.Tensor,
    windows: torch.Tensor,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    vocab_size: int,
    teacher_logits: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The loss of each offset: KL to the teacher at the answer's position, or cross-entropy against the window's
    next token. The mask's own logit (past `vocab_size`) is never a prediction, so it is left out."""
    losses = []
    for packed, answer_at in pairs:
        predicted = student_logits[:, packed, :vocab_size]
        if teacher_logits is not None:
            losses.append(distillation_loss(predicted, teacher_logits[:, answer_at, :vocab_size]))
        else:
            labels = windows[:, answer_at + 1]
            losses.append(F.cross_entropy(predicted.flatten(0, 1).float(), labels.flatten()))
    return losses


def add_mask_token(model: PreTrainedModel, max_gamma: int) -> ParallelDraftSpec:
    """Grow the vocabulary by the mask token (its embedding starts at the mean of the others) and mark the config."""
    vocab_size = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab_size + 1, mean_resizing=False)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[vocab_size] = embedding[:vocab_size].mean(0)
    spec = ParallelDraftSpec(mask_token_id=vocab_size, max_gamma=max_gamma)
    setattr(model.config, PARALLEL_DRAFT_KEY, spec.to_config())
    return spec


@torch.no_grad()
def held_out_by_offset(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    stream: torch.Tensor,
    spec: ParallelDraftSpec,
    length: int,
    cuts_per_window: int,
    vocab_size: int,
) -> tuple[list[float], list[float]]:
    """Per offset: the held-out loss (as trained: KL with a teacher, else cross-entropy) and top-1 agreement with
    the teacher's greedy token at that position (with the corpus token when there is no teacher), over up to
    HELD_OUT_WINDOWS consecutive windows with evenly spread cut points."""
    student.eval()
    count = min(HELD_OUT_WINDOWS, (stream.numel() - 1) // length)
    if count < 1:
        raise SpeculorError(f"the held-out corpus has {stream.numel()} tokens, fewer than one window of {length}")
    windows_all = stream[: count * length].view(count, length).long()
    cuts = cut_points(length, spec.max_gamma, cuts_per_window)
    pairs = offset_positions(length, cuts, spec.max_gamma)
    losses = torch.zeros(spec.max_gamma, dtype=torch.float64)
    hits = torch.zeros(spec.max_gamma, dtype=torch.float64)
    totals = torch.zeros(spec.max_gamma, dtype=torch.float64)
    for windows in windows_all.split(8):
        input_ids, positions, allowed = packed_inputs(windows, cuts, spec.max_gamma, spec.mask_token_id)
        student_logits = student(input_ids=input_ids, position_ids=positions, attention_mask=allowed).logits
        teacher_logits = teacher(input_ids=windows).logits if teacher is not None else None
        for offset, loss in enumerate(offset_losses(student_logits, windows, pairs, vocab_size, teacher_logits)):
            losses[offset] += loss.item() * windows.shape[0]
        for offset, (packed, answer_at) in enumerate(pairs):
            guess = student_logits[:, packed, :vocab_size].argmax(-1)
            truth = teacher_logits[:, answer_at].argmax(-1) if teacher_logits is not None else windows[:, answer_at + 1]
            hits[offset] += (guess == truth).sum().item()
            totals[offset] += guess.numel()
    student.train()
    return (losses / count).tolist(), (hits / totals).tolist()


def model_card(result: ParallelTrainResult, config) -> str:
    """A README.md saying what the parallel draft is, how it was made, and how well each offset does."""
    offsets = " | ".join(str(offset) for offset in range(1, result.max_gamma + 1))
    accuracy = " | ".join(f"{value:.3f}" for value in result.held_out_accuracy_by_offset)
    losses = " | ".join(f"{value:.3f}" for value in result.held_out_loss_by_offset)
    loss_kind = "KL to the teacher" if result.teacher else "cross-entropy"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [speculor, llama, python, speculative-decoding, parallel-draft]
---

# {Path(result.output_dir).name} (parallel draft, K = {result.max_gamma})

A parallel draft (PARD, arXiv 2504.18583): one forward proposes up to {result.max_gamma} tokens. It reads its
context followed by γ − 1 copies of its mask token (id {result.mask_token_id}, one past the {result.mask_token_id:,}
tokens it shares with the target) and predicts the token 1, 2, …, γ ahead at the last real token and at each mask.
speculor detects it from `"{PARALLEL_DRAFT_KEY}"` in config.json and drafts with `ParallelDraftProposer`; the
output stays exactly the target's.

| | |
|---|---|
| made from | `{result.base_draft}` (same weights plus the mask token's embedding row) |
| architecture | Llama, {counted(config.num_hidden_layers, "layer")}, hidden size {config.hidden_size}, \
tied embeddings, vocabulary {config.vocab_size:,} (the target's plus the mask) |
| parameters | {result.parameters:,} |
| training | {counted(result.steps, "step")}, {result.windows_seen:,} windows of {result.sequence_length} tokens with \
{result.cuts_per_window} cut points each, {result.seconds:.0f} s, final training loss {result.final_train_loss:.4f} |
| loss | {loss_kind} at every offset, offsets weighted equally |
| teacher | {f"`{result.teacher}`" if result.teacher else "none (corpus tokens)"} |
| hardware | {result.device} |
| date | {result.date} |

Held-out, by offset (the token 1..K ahead of a cut point; agreement is top-1 with {result.accuracy_against}):

| offset | {offsets} |
|---|{"---|" * result.max_gamma}
| top-1 agreement | {accuracy} |
| held-out loss | {losses} |

Weights are stored in float16; load them in float32 on a CPU.

Command:

```
{result.command}
```
"""


def train_parallel_draft(
    output_dir: str | os.PathLike,
    init_from: str | os.PathLike,
    *,
    distill_from: str | os.PathLike | None = None,
    max_gamma: int = DEFAULT_MAX_GAMMA,
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_corpus_bytes: int | Literal["auto"] | None = "auto",
    seconds: float | None = 600.0,
    steps: int | None = None,
    batch_size: int = 8,
    sequence_length: int = 256,
    cuts_per_window: int = 32,
    learning_rate: float = 1e-3,
    device: str | torch.device | None = None,
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
) -> ParallelTrainResult:
    """Adapt the draft saved in `init_from` into a parallel draft of `max_gamma` (K) tokens and save it in
    `output_dir` (float16 safetensors, the draft's tokenizer and a model card). Trains for `steps`,
    or for `seconds` when no step count is given. The corpus is read up to `max_corpus_bytes` ("auto": the
    device's default cap, as `speculor train` reads it; None: all of it)."""
    if max_gamma < 2:
        raise SpeculorError(f"a parallel draft proposes at least 2 tokens a forward, got max_gamma={max_gamma}")
    if steps is None and not seconds:
        raise SpeculorError("give a positive number of steps or seconds to train for")
    resolved = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(init_from)
        student = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32, attn_implementation="sdpa")
        teacher = None
        if distill_from is not None:
            teacher = AutoModelForCausalLM.from_pretrained(distill_from, dtype=torch.float32).to(resolved).eval()
    except (OSError, ValueError) as error:
        raise SpeculorError(f"cannot load the draft or the teacher: {error}") from error
    if ParallelDraftSpec.from_config(student.config) is not None:
        raise SpeculorError(f"{os.fspath(init_from)!r} is already a parallel draft")
    vocab_size = student.get_input_embeddings().weight.shape[0]
    if teacher is not None and teacher.get_output_embeddings().weight.shape[0] < vocab_size:
        raise SpeculorError("the teacher scores fewer tokens than the draft: they cannot share a vocabulary")
    spec = add_mask_token(student, max_gamma)
    student.to(resolved).train()
    say = progress_printer(progress)
    roots = None if corpus is None else [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    cap = default_corpus_cap(resolved) if max_corpus_bytes == "auto" else max_corpus_bytes
    documents = read_corpus(roots, cap, say)
    train_stream = encode_documents(tokenizer, documents.train).to(resolved)
    held_out_stream = encode_documents(tokenizer, documents.held_out).to(resolved)
    if train_stream.numel() <= sequence_length + 1:
        raise SpeculorError(f"the training corpus has {train_stream.numel()} tokens, fewer than one window")
    budget = counted(steps, "step") if steps is not None else f"{seconds:g} s"
    say(
        f"training: {train_stream.numel():,} training and {held_out_stream.numel():,} held-out tokens; "
        f"{budget} of {counted(batch_size, 'window')} × {sequence_length} tokens, then a held-out pass"
    )
    torch.manual_seed(seed)
    sampler = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    total = steps if steps is not None else seconds
    bar = tqdm(total=steps, desc="parallel draft", unit="step", disable=not progress, dynamic_ncols=True)
    started, done, loss = time.perf_counter(), 0, torch.tensor(math.nan)
    while True:
        elapsed = time.perf_counter() - started
        fraction = done / total if steps is not None else elapsed / total
        if fraction >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(fraction, learning_rate)
        starts = torch.randint(0, train_stream.numel() - sequence_length, (batch_size,), generator=sampler)
        windows = train_stream[starts[:, None].to(resolved) + torch.arange(sequence_length, device=resolved)].long()
        cuts = cut_points(sequence_length, max_gamma, cuts_per_window, sampler)
        input_ids, positions, allowed = packed_inputs(windows, cuts, max_gamma, spec.mask_token_id)
        with torch.autocast(resolved.type, dtype=torch.bfloat16, enabled=resolved.type == "cuda"):
            logits = student(input_ids=input_ids, position_ids=positions, attention_mask=allowed).logits
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=windows).logits
            pairs = offset_positions(sequence_length, cuts, max_gamma)
            loss = torch.stack(offset_losses(logits, windows, pairs, vocab_size, teacher_logits)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        bar.update(1)
        if progress and done % 10 == 0:
            bar.set_postfix_str(f"loss {loss.item():.3f}, {time.perf_counter() - started:.0f} s")
    bar.close()
    seconds_spent = time.perf_counter() - started
    held_out_losses, accuracies = held_out_by_offset(
        student, teacher, held_out_stream, spec, sequence_length, cuts_per_window, vocab_size
    )
    result = ParallelTrainResult(
        output_dir=os.fspath(output_dir),
        base_draft=os.fspath(init_from),
        teacher=os.fspath(distill_from) if distill_from is not None else None,
        max_gamma=max_gamma,
        mask_token_id=spec.mask_token_id,
        parameters=sum(parameter.numel() for parameter in student.parameters()),
        steps=done,
        seconds=seconds_spent,
        windows_seen=done * batch_size,
        cuts_per_window=min(cuts_per_window, sequence_length - max_gamma),
        sequence_length=sequence_length,
        final_train_loss=loss.item(),
        held_out_loss_by_offset=held_out_losses,
        held_out_accuracy_by_offset=accuracies,
        accuracy_against="the teacher's greedy token" if teacher is not None else "the corpus token",
        device=hardware_name(resolved),
        command=command or f"train_parallel_draft({os.fspath(output_dir)!r}, {os.fspath(init_from)!r}, ...)",
        date=datetime.date.today().isoformat(),
    )
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(student).to(dtype=torch.float16).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(model_card(result, student.config))
    return result
