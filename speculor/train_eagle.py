"""`speculor train-eagle`: train an EAGLE-3 head (`speculor.eagle`) for a target that loads, on the corpora `speculor
train` reads, and save it in the hub layout vLLM and SGLang load.

Each step takes random windows of the corpus, runs the target over them once (no gradient) for its hidden states
at the head's feature layers and its next-token distributions, and unrolls the head over `ttt_steps` drafting steps
(EAGLE-3's training-time test). Step 0 reads the target's fused features at every position t and the token at t + 1
and predicts the target's distribution at t + 1 (over the token at t + 2); step s reads, at the same row t, the
head's own output of step s − 1 in place of the features and the token at t + s + 1, sits at position t + s, and
predicts the target's distribution there. Attention is what drafting will see: a query of step s at row t attends
to step 0's keys at positions ≤ t (the committed context, fed with target features) and to its own chain's keys of
steps 1..s at row t (the drafted positions). (EAGLE's reference trainer also masks step 0's keys at t − s + 1..t;
that is not what a chain drafted from t sees, so it is not done here.) The teacher is the target's distribution
restricted to the draft vocabulary; the loss is its cross-entropy against the head's, step s weighted 0.8^s as the
EAGLE papers do.

The draft vocabulary is the `draft_vocab_size` target tokens most frequent in the training corpus (`d2t`/`t2d`).
The head starts from the target where it can, so a short CPU budget is not spent rediscovering it: its `lm_head`
and final norm are the target's for those tokens, and `fc` passes the highest feature layer through.

The model card (README.md in the output directory) reports held-out numbers two ways: per training-time-test step,
how often the head's top token agrees with the target's on held-out windows (inputs are corpus tokens); and the
greedy acceptance by draft position measured by running `BatchEngine` with the head on held-out prompts (γ fixed),
which is what speculative decoding gets.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from speculor.adaptive import FixedGamma
from speculor.eagle import (
    Eagle3Head,
    Eagle3Proposer,
    default_feature_layers,
    head_for_target,
    load_eagle3,
    save_eagle3,
)
from speculor.engine import BatchEngine, DecodeRequest
from speculor.errors import SpeculorError
from speculor.loading import resolve_device
from speculor.runners import make_runner
from speculor.sampling import SamplingParams
from speculor.train import collect_corpus, encode_documents, hardware_name, learning_rate_at

DEFAULT_TTT_STEPS = 4
DEFAULT_DRAFT_VOCAB = 2048
STEP_WEIGHT_DECAY = 0.8
HELD_OUT_WINDOWS = 32
HELD_OUT_PROMPT_TOKENS = 48


@dataclass
class EagleTrainResult:
    """What the model card reports about one trained head."""

    output_dir: str
    target: str
    feature_layers: list[int]
    draft_vocab_size: int
    corpus_coverage: float
    parameters: int
    steps: int
    seconds: float
    windows_seen: int
    sequence_length: int
    ttt_steps: int
    final_train_loss: float
    agreement_by_step: list[float]
    acceptance_by_position: list[float]
    mean_accepted_length: float
    gamma: int
    held_out_prompts: int
    held_out_new_tokens: int
    device: str
    initialised_from: str | None
    command: str
    date: str


def draft_vocabulary(stream: torch.Tensor, vocab_size: int, size: int) -> tuple[list[int], float]:
    """The `size` most frequent token ids of `stream` (ascending) and the share of the stream's tokens they cover."""
    counts = torch.bincount(stream.long().cpu(), minlength=vocab_size)[:vocab_size]
    size = min(size, vocab_size)
    top = counts.topk(size).indices
    return sorted(top.tolist()), float(counts[top].sum()) / max(1, int(counts.sum()))


def vocabulary_coverage(stream: torch.Tensor, vocab_size: int, token_ids: Sequence[int]) -> float:
    """The share of `stream`'s tokens that are among `token_ids`."""
    counts = torch.bincount(stream.long().cpu(), minlength=vocab_size)[:vocab_size]
    return float(counts[list(token_ids)].sum()) / max(1, int(counts.sum()))


def start_from_target(head: Eagle3Head, target: PreTrainedModel, draft_token_ids: Sequence[int]) -> None:
    """Initialise what the target already knows: the head's `lm_head` rows and final norm from the target's, and
    `fc` passing the last feature layer's state through (the other two start at zero)."""
    ids = torch.tensor(list(draft_token_ids), device=head.lm_head.weight.device)
    hidden = head.config.target_hidden_size
    with torch.no_grad():
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[ids])
        final_norm = getattr(getattr(target, "model", None), "norm", None)
        if getattr(final_norm, "weight", None) is not None and final_norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(final_norm.weight)
        head.fc.weight.zero_()
        if head.config.hidden_size == hidden:
            head.fc.weight[:, 2 * hidden :].copy_(torch.eye(hidden))


def target_pass(
    target: PreTrainedModel, windows: torch.Tensor, layers: Sequence[int], draft_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target over `windows` (B, T): its features at `layers` (B, T, 3H), its distribution over the draft
    vocabulary at each position (B, T, Vd, renormalised) and its greedy token at each position (B, T)."""
    with torch.no_grad():
        output = target(input_ids=windows, output_hidden_states=True)
        features = torch.cat([output.hidden_states[layer] for layer in layers], dim=-1)
        logits = output.logits.float()
        teacher = logits[..., draft_ids].softmax(-1)
        return features, teacher, logits.argmax(-1)


def unrolled_logits(head: Eagle3Head, windows: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The head's draft-vocabulary logits (B, T, Vd) at each training-time-test step (see the module docstring):
    entry s at row t predicts the token at t + s + 2. Rows whose inputs run past the window are computed on padding
    and must be ignored (the last s + 1 rows of step s)."""
    length = windows.shape[1]
    config = head.config
    group = config.num_attention_heads // config.num_key_value_heads
    scale = config.head_dim**-0.5
    cos, sin = head.rotary_tables(length + steps)
    rows = torch.arange(length, device=windows.device)
    causal = rows[None, :] <= rows[:, None]
    hidden = head.fuse(features)
    first_keys = first_values = None
    chain: list[tuple[torch.Tensor, torch.Tensor]] = []
    logits = []
    for step in range(steps):
        tokens = F.pad(windows[:, step + 1 :], (0, step + 1))
        query, key, value = head.queries_keys_values(
            tokens, hidden, cos[step : step + length], sin[step : step + length]
        )
        if step == 0:
            first_keys, first_values = key, value
            attended = F.scaled_dot_product_attention(
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                is_causal=True,
                scale=scale,
                enable_gqa=group > 1,
            ).transpose(1, 2)
        else:
            chain.append((key.repeat_interleave(group, dim=2), value.repeat_interleave(group, dim=2)))
            keys0 = first_keys.repeat_interleave(group, dim=2)
            values0 = first_values.repeat_interleave(group, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", query, keys0) * scale
            scores = scores.masked_fill(~causal, float("-inf"))
            diagonal = torch.stack([(query * chain_key).sum(-1) * scale for chain_key, _ in chain], dim=-1)
            weights = torch.cat([scores, diagonal.permute(0, 2, 1, 3)], dim=-1).float().softmax(-1).to(query.dtype)
            attended = torch.einsum("bhqk,bkhd->bqhd", weights[..., :length], values0)
            for index, (_, chain_value) in enumerate(chain):
                attended = attended + weights[..., length + index].permute(0, 2, 1)[..., None] * chain_value
        hidden = head.finish(attended.flatten(2), hidden)
        logits.append(head.logits(hidden))
    return logits


def unrolled_loss(
    head: Eagle3Head, windows: torch.Tensor, features: torch.Tensor, teacher: torch.Tensor, steps: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weighted training loss and each step's loss: cross-entropy of the head's distribution against the
    teacher's at the position it predicts."""
    length = windows.shape[1]
    losses = []
    for step, logits in enumerate(unrolled_logits(head, windows, features, steps)):
        valid = length - step - 1
        log_q = logits[:, :valid].float().log_softmax(-1)
        losses.append(-(teacher[:, step + 1 :] * log_q).sum(-1).mean())
    weights = [STEP_WEIGHT_DECAY**step for step in range(steps)]
    total = sum(weight * loss for weight, loss in zip(weights, losses, strict=True)) / sum(weights)
    return total, losses


@torch.no_grad()
def agreement_by_step(
    head: Eagle3Head,
    target: PreTrainedModel,
    stream: torch.Tensor,
    layers: Sequence[int],
    draft_token_ids: Sequence[int],
    length: int,
    steps: int,
) -> list[float]:
    """Per training-time-test step, how often the head's top token (as a target id) equals the target's greedy
    token at the position it predicts, over up to HELD_OUT_WINDOWS consecutive held-out windows."""
    count = min(HELD_OUT_WINDOWS, (stream.numel() - 1) // length)
    if count < 1:
        raise SpeculorError(f"the held-out corpus has {stream.numel()} tokens, fewer than one window of {length}")
    windows_all = stream[: count * length].view(count, length).long()
    ids = torch.tensor(list(draft_token_ids), device=stream.device)
    hits, totals = [0] * steps, [0] * steps
    for windows in windows_all.split(8):
        features, _, greedy = target_pass(target, windows, layers, ids)
        for step, logits in enumerate(unrolled_logits(head, windows, features, steps)):
            valid = length - step - 1
            guess = ids[logits[:, :valid].argmax(-1)]
            hits[step] += int((guess == greedy[:, step + 1 :]).sum())
            totals[step] += guess.numel()
    return [hit / total for hit, total in zip(hits, totals, strict=True)]


@torch.no_grad()
def held_out_acceptance(
    target: PreTrainedModel,
    head: Eagle3Head,
    layers: Sequence[int],
    prompts: Sequence[list[int]],
    gamma: int,
    new_tokens: int,
) -> tuple[list[float], float]:
    """Greedy acceptance by draft position (accepted / drafted at positions 1..γ) and the mean accepted length
    (tokens per target forward, bonus included) of speculative decoding with `head` on `prompts`, measured by the
    engine itself over `new_tokens` tokens each (end-of-text ignored)."""
    runner = make_runner(target, "auto", slots=len(prompts))
    vocab = int(target.get_output_embeddings().weight.shape[0])
    engine = BatchEngine(runner, Eagle3Proposer(head, layers, runner, vocab), vocab, None)
    requests = [
        DecodeRequest(list(prompt), new_tokens, SamplingParams(), FixedGamma(gamma), frozenset(), ignore_eos=True)
        for prompt in prompts
    ]
    for request in requests:
        engine.add(request)
    accepted, drafted, emitted, forwards = [0] * gamma, [0] * gamma, 0, 0
    while engine.running:
        for event in engine.step():
            if event.result is None:
                continue
            stats = event.result.stats
            for position, count in enumerate(stats.accepted_by_position):
                accepted[position] += count
            for position, count in enumerate(stats.drafted_by_position):
                drafted[position] += count
            emitted += stats.new_tokens
            forwards += stats.target_forwards
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)], emitted / max(1, forwards)


def held_out_prompts(stream: torch.Tensor, count: int, length: int, separator: int | None) -> list[list[int]]:
    """Up to `count` prompts of `length` tokens: the starts of held-out documents (after each separator), else
    evenly spaced windows of the held-out stream."""
    tokens = stream.long().cpu()
    starts = (torch.nonzero(tokens == separator).view(-1).tolist() if separator is not None else []) or list(
        range(0, max(1, tokens.numel() - length), max(1, tokens.numel() // max(1, count)))
    )
    prompts = [tokens[start : start + length].tolist() for start in starts if start + length <= tokens.numel()]
    return prompts[:count]


def model_card(result: EagleTrainResult, head: Eagle3Head) -> str:
    """A README.md saying what the head is, how it was made and how well it drafts for its target."""
    config = head.config
    steps = " | ".join(str(step + 1) for step in range(result.ttt_steps))
    agreement = " | ".join(f"{value:.3f}" for value in result.agreement_by_step)
    positions = " | ".join(str(position + 1) for position in range(result.gamma))
    acceptance = " | ".join(f"{value:.3f}" for value in result.acceptance_by_position)
    origin = "the target's output layer and final norm; the rest at random"
    if result.initialised_from:
        origin = f"the head in `{result.initialised_from}` (its draft vocabulary and layers kept)"
    return f"""---
tags: [speculor, eagle3, speculative-decoding]
---

# {Path(result.output_dir).name} (EAGLE-3 head for `{result.target}`)

An EAGLE-3 draft head (Li et al., arXiv 2503.01840): one decoder layer that reads the target's hidden states entering
layers {result.feature_layers} and drafts the next tokens. Saved in the hub layout vLLM and SGLang load
(`LlamaForCausalLMEagle3`: `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`; no embeddings: the target's are
used). `speculor generate/bench/serve --target {result.target} --draft <this directory>` detects it; the output
stays exactly the target's.

| | |
|---|---|
| head | 1 layer, hidden size {config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} \
key/value), MLP {config.intermediate_size}, {result.parameters:,} parameters |
| draft vocabulary | {result.draft_vocab_size:,} of the target's {config.vocab_size:,} tokens (the most frequent \
in the training corpus: {100 * result.corpus_coverage:.1f}% of its tokens) |
| training | {result.steps:,} steps, {result.windows_seen:,} windows of {result.sequence_length} tokens, \
training-time test over {result.ttt_steps} steps, {result.seconds:.0f} s, final loss {result.final_train_loss:.4f} |
| teacher | the target's next-token distribution (cross-entropy over the draft vocabulary) |
| started from | {origin} |
| hardware | {result.device} |
| date | {result.date} |

Held-out agreement with the target's greedy token, by training-time-test step (corpus tokens as inputs):

| step | {steps} |
|---|{"---|" * result.ttt_steps}
| top-1 agreement | {agreement} |

Held-out greedy acceptance by draft position, measured by speculor's engine with this head (γ = {result.gamma},
{result.held_out_prompts} held-out prompts of {HELD_OUT_PROMPT_TOKENS} tokens, {result.held_out_new_tokens} new tokens
each): mean accepted length {result.mean_accepted_length:.2f} tokens per target forward.

| draft position | {positions} |
|---|{"---|" * result.gamma}
| acceptance | {acceptance} |

Weights are stored in float16; speculor loads them in the target's dtype.

Command:

```
{result.command}
```
"""


def train_eagle_head(
    output_dir: str | os.PathLike,
    target: str | os.PathLike,
    *,
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_corpus_bytes: int | None = None,
    seconds: float | None = 600.0,
    steps: int | None = None,
    batch_size: int = 8,
    sequence_length: int = 128,
    ttt_steps: int = DEFAULT_TTT_STEPS,
    draft_vocab_size: int = DEFAULT_DRAFT_VOCAB,
    feature_layers: Sequence[int] | None = None,
    init_from: str | os.PathLike | None = None,
    learning_rate: float = 1e-3,
    gamma: int = 4,
    held_out_prompt_count: int = 16,
    held_out_new_tokens: int = 48,
    device: str | torch.device | None = None,
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
) -> EagleTrainResult:
    """Train an EAGLE-3 head for the target saved in `target` and save it in `output_dir` (hub layout plus a model
    card). Trains for `steps`, or for `seconds` when no step count is given (stopping before a step that would end
    past the budget). `feature_layers` are the three target layers whose incoming hidden states feed the head (the
    peers' default when None). `init_from` is a saved head to go on training (its draft vocabulary and layers are
    kept), e.g. a hub head to fine-tune on your own corpus."""
    if steps is None and not seconds:
        raise SpeculorError("give a positive number of steps or seconds to train for")
    if ttt_steps < 1:
        raise SpeculorError(f"the training-time test unrolls at least one step, got {ttt_steps}")
    resolved = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(resolved).eval()
    except (OSError, ValueError) as error:
        raise SpeculorError(f"cannot load the target {os.fspath(target)!r} and its tokenizer: {error}") from error
    model.requires_grad_(False)
    layer_count = model.config.get_text_config().num_hidden_layers
    start: Eagle3Head | None = None
    if init_from is not None:
        start, kept_layers = load_eagle3(init_from, model)
        if feature_layers is not None and tuple(feature_layers) != tuple(kept_layers):
            raise SpeculorError(
                f"the head in {os.fspath(init_from)!r} reads layers {tuple(kept_layers)}, not {tuple(feature_layers)}"
            )
        feature_layers = kept_layers
    layers = tuple(feature_layers) if feature_layers is not None else default_feature_layers(layer_count)
    if len(layers) != 3 or not all(0 <= layer < layer_count for layer in layers):
        raise SpeculorError(f"feature layers must be three layers of the target's 0..{layer_count - 1}, got {layers}")
    roots = None if corpus is None else [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    documents = collect_corpus(roots, max_corpus_bytes)
    train_stream = encode_documents(tokenizer, documents.train).to(resolved)
    held_out_stream = encode_documents(tokenizer, documents.held_out).to(resolved)
    if train_stream.numel() <= sequence_length + 1:
        raise SpeculorError(f"the training corpus has {train_stream.numel()} tokens, fewer than one window")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    torch.manual_seed(seed)
    if start is None:
        draft_ids, coverage = draft_vocabulary(train_stream, vocab, draft_vocab_size)
        head = head_for_target(model, draft_ids, layers)
        start_from_target(head, model, draft_ids)
    else:
        head, draft_ids = start.float(), start.draft_to_target.tolist()
        coverage = vocabulary_coverage(train_stream, vocab, draft_ids)
    head.train()
    draft_index = torch.tensor(draft_ids, device=resolved)
    sampler = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    total = steps if steps is not None else seconds
    bar = tqdm(total=steps, desc="EAGLE-3 head", unit="step", disable=not progress, dynamic_ncols=True)
    started, done, last_step, loss = time.perf_counter(), 0, 0.0, torch.tensor(math.nan)
    while True:
        elapsed = time.perf_counter() - started
        fraction = done / total if steps is not None else elapsed / total
        if fraction >= 1 or (steps is None and done and elapsed + last_step > total):
            break
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(fraction, learning_rate)
        starts = torch.randint(0, train_stream.numel() - sequence_length, (batch_size,), generator=sampler)
        windows = train_stream[starts[:, None].to(resolved) + torch.arange(sequence_length, device=resolved)].long()
        features, teacher, _ = target_pass(model, windows, layers, draft_index)
        with torch.autocast(resolved.type, dtype=torch.bfloat16, enabled=resolved.type == "cuda"):
            loss, step_losses = unrolled_loss(head, windows, features, teacher, ttt_steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        last_step = time.perf_counter() - began
        bar.update(1)
        if progress and done % 5 == 0:
            shown = " ".join(f"{value.item():.2f}" for value in step_losses)
            bar.set_postfix_str(f"loss by step {shown}, {time.perf_counter() - started:.0f} s")
    bar.close()
    spent = time.perf_counter() - started
    head.eval()
    agreement = agreement_by_step(head, model, held_out_stream, layers, draft_ids, sequence_length, ttt_steps)
    separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompts = held_out_prompts(held_out_stream, held_out_prompt_count, HELD_OUT_PROMPT_TOKENS, separator)
    acceptance, mean_length = held_out_acceptance(model, head, layers, prompts, gamma, held_out_new_tokens)
    result = EagleTrainResult(
        output_dir=os.fspath(output_dir),
        target=os.fspath(target),
        feature_layers=list(layers),
        draft_vocab_size=len(draft_ids),
        corpus_coverage=coverage,
        parameters=sum(parameter.numel() for parameter in head.parameters()),
        steps=done,
        seconds=spent,
        windows_seen=done * batch_size,
        sequence_length=sequence_length,
        ttt_steps=ttt_steps,
        final_train_loss=loss.item(),
        agreement_by_step=agreement,
        acceptance_by_position=acceptance,
        mean_accepted_length=mean_length,
        gamma=gamma,
        held_out_prompts=len(prompts),
        held_out_new_tokens=held_out_new_tokens,
        device=hardware_name(resolved),
        initialised_from=os.fspath(init_from) if init_from is not None else None,
        command=command or f"train_eagle_head({os.fspath(output_dir)!r}, {os.fspath(target)!r}, ...)",
        date=datetime.date.today().isoformat(),
    )
    save_eagle3(head, output_dir)
    (Path(output_dir) / "README.md").write_text(model_card(result, head))
    return result
