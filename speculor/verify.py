"""The acceptance rule of Leviathan et al. (2211.17192) and Chen et al. (2302.01318), as pure tensor functions.

No model is in sight here, so the rule can be tested exhaustively on small vocabularies. Both functions return
(number of drafted tokens accepted, the next token to emit) as 0-d device tensors, so the caller decides when to
pay for the single host read.
"""

from __future__ import annotations

import torch

from speculor.sampling import sample


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the longest prefix of `draft_tokens` (γ,) equal to the target's argmaxes, then emit the target's argmax
    at the first mismatch (or the bonus position γ). `target_logits` is (γ+1, V)."""
    choices = target_logits.argmax(-1)
    gamma = draft_tokens.shape[0]
    matches = (draft_tokens == choices[:gamma]).to(torch.int64)
    accepted = matches.cumprod(0).sum()
    return accepted, choices[accepted]


def stochastic_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right; at the first
    rejection emit a token from normalize(max(0, p_i − q_i)); if all γ pass, emit a bonus token from p_{γ+1}.

    `draft_probs` (γ, V) is the exact q the draft sampled from, or None when the proposal was deterministic (n-gram
    lookup), i.e. q is one-hot at each drafted token. `target_probs` is (γ+1, V). The output is distributed exactly
    as tokens sampled from the target alone.
    """
    gamma = draft_tokens.shape[0]
    dtype = target_probs.dtype
    rows = torch.arange(gamma, device=target_probs.device)
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs[:gamma])
        draft_probs[rows, draft_tokens] = 1
    draft_probs = draft_probs.to(dtype)
    p_of_x = target_probs[rows, draft_tokens]
    q_of_x = draft_probs[rows, draft_tokens]
    uniform = torch.rand(gamma, generator=generator, device=target_probs.device, dtype=dtype)
    # u < p/q written without a division so q = 0 (never sampled) cannot produce NaN.
    accept = (uniform * q_of_x < p_of_x).to(torch.int64)
    accepted = accept.cumprod(0).sum()
    padded_q = torch.cat([draft_probs, torch.zeros_like(target_probs[:1])], dim=0)
    p_next = target_probs[accepted]
    residual = (p_next - padded_q[accepted]).clamp_min(0)
    total = residual.sum()
    # At the bonus position q is zero, so the residual is p itself. A residual of zero mass can only come from
    # rounding when p ≈ q; then p is the right fallback.
    residual = torch.where(total > 0, residual / total.clamp_min(torch.finfo(dtype).tiny), p_next)
    return accepted, sample(residual, generator)
