"""The acceptance rule of Leviathan et al. (2211.17192) and Chen et al. (2302.01318), as pure tensor functions over
the rows of a batch.

No model is in sight here, so the rule can be tested exhaustively on small vocabularies. Rows draft different
numbers of tokens (`counts`); drafts are right-padded to the longest row and the padding is never accepted. Every
result stays on the device, so the caller decides when to pay for the single host read of a step.
"""

from __future__ import annotations

import torch


def _within_counts(counts: torch.Tensor, gamma: int) -> torch.Tensor:
    """(rows, γ) mask of the real (not padding) draft positions."""
    return torch.arange(gamma, device=counts.device)[None, :] < counts[:, None]


def greedy_accept(
    draft_tokens: torch.Tensor, counts: torch.Tensor, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, keep the longest prefix of its drafts (rows, γ) equal to the target's argmaxes, then emit the target's
    argmax at the first mismatch (or after the row's last draft). `target_logits` is (rows, γ+1, V). Returns
    (accepted (rows,), next token (rows,))."""
    return match_accept(draft_tokens, counts, target_logits.argmax(-1))


def match_accept(
    draft_tokens: torch.Tensor, counts: torch.Tensor, target_choices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, keep the longest prefix of its drafts (rows, γ) equal to the target's own choices (rows, γ+1) at
    the same positions, then emit the target's choice at the first mismatch (or after the row's last draft).

    With argmax choices this is greedy verification. With choices sampled from the target's distributions with the
    row's own counter-based noise, it is drafter-invariant verification (Daliri, Musco and Suresh, arXiv
    2408.07978): every emitted token is the very token the target alone would sample at that position for that
    seed, so the output is the same for any draft, any γ and any batch. Returns (accepted (rows,), next token
    (rows,))."""
    gamma = draft_tokens.shape[1]
    matches = (draft_tokens == target_choices[:, :gamma]) & _within_counts(counts, gamma)
    accepted = matches.to(torch.int64).cumprod(1).sum(1)
    return accepted, target_choices.gather(1, accepted[:, None]).squeeze(1)


def stochastic_accept(
    draft_tokens: torch.Tensor,
    counts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling per row: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right, using
    `uniforms` (rows, γ); at the first rejection the next token comes from normalize(max(0, p_i − q_i)); if all of a
    row's drafts pass, from p at the position after them (the bonus token).

    `draft_probs` (rows, γ, V) is the exact q each draft was sampled from, or None when every proposal was
    deterministic (q one-hot at each drafted token). `target_probs` is (rows, γ+1, V). Returns (accepted (rows,),
    the distribution of the next token (rows, V)); sampling from it makes each row's output distributed exactly as
    tokens sampled from the target alone.
    """
    rows, gamma = draft_tokens.shape
    dtype = target_probs.dtype
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs[:, :gamma])
        draft_probs.scatter_(2, draft_tokens[:, :, None], 1)
    draft_probs = draft_probs.to(dtype)
    p_of_x = target_probs[:, :gamma].gather(2, draft_tokens[:, :, None]).squeeze(2)
    q_of_x = draft_probs.gather(2, draft_tokens[:, :, None]).squeeze(2)
    # u < p/q written without a division so q = 0 (never sampled) cannot produce NaN.
    accept = (uniforms.to(dtype) * q_of_x < p_of_x) & _within_counts(counts, gamma)
    accepted = accept.to(torch.int64).cumprod(1).sum(1)
    row_index = torch.arange(rows, device=target_probs.device)
    p_next = target_probs[row_index, accepted]
    # Past a row's drafts q is zero, so the residual there is p itself (the bonus token).
    q_next = torch.zeros_like(p_next)
    if gamma:
        q_at_rejection = draft_probs[row_index, accepted.clamp(max=gamma - 1)]
        q_next = torch.where((accepted < counts)[:, None], q_at_rejection, q_next)
    residual = (p_next - q_next).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # A residual of zero mass can only come from rounding when p ≈ q; then p is the right fallback.
    return accepted, torch.where(total > 0, residual / total.clamp_min(torch.finfo(dtype).tiny), p_next)
