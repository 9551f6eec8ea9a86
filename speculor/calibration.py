"""Measuring what a step costs on this machine, for the load-aware γ policy (`speculor.adaptive.LoadAwareGamma`).

Run before any request is in flight: it borrows slots 0..B-1 of the runners, holding one token each, and leaves
them empty. Each shape is run once untimed first, so graph captures and kernel compilations are not measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from speculor.adaptive import StepCosts
from speculor.runners.base import Runner


def batch_buckets(slots: int) -> list[int]:
    """The batch sizes to measure: powers of two up to `slots`, and `slots` itself."""
    buckets = [1]
    while buckets[-1] * 2 <= slots:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != slots:
        buckets.append(slots)
    return buckets


def step_seconds(runner: Runner, batch: int, width: int, repeats: int) -> float:
    """Median seconds of a step of `width` tokens on `batch` rows (slots 0..batch-1, one cached token each)."""
    device = runner.device
    slots = list(range(batch))
    tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
    samples = []
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        runner.step(slots, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            samples.append(time.perf_counter() - began)
        for slot in slots:
            runner.rollback(slot, 1)
    return statistics.median(samples)


def measure_step_costs(target: Runner, draft: Runner | None, widths: Sequence[int], repeats: int = 3) -> StepCosts:
    """Target steps of every width in `widths` and one-token draft steps, at every batch bucket of the target's
    slots."""
    costs = StepCosts(target={})
    buckets = batch_buckets(target.slots)
    for runner in (target, draft):
        if runner is None:
            continue
        start = torch.zeros(1, dtype=torch.long, device=runner.device)
        for slot in range(min(runner.slots, buckets[-1])):
            runner.reset(slot)
            runner.extend(slot, start)
    for bucket in buckets:
        for width in widths:
            costs.target[(bucket, width)] = step_seconds(target, bucket, width, repeats)
        if draft is not None:
            costs.draft[bucket] = step_seconds(draft, bucket, 1, repeats)
    for runner in (target, draft):
        if runner is not None:
            for slot in range(min(runner.slots, buckets[-1])):
                runner.reset(slot)
    return costs
