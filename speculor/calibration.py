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


def step_seconds(runner: Runner, batch: int, width: int, repeats: int) -> tuple[float, float]:
    """Seconds of a step of `width` tokens on `batch` rows (slots 0..batch-1, one cached token each), measured two
    ways: back to back (`repeats` steps queued, one sync at the end: what each of a step's draft passes costs, since
    the engine does not wait between them) and alone (one step, then a sync: that plus the wait for the device,
    which an engine step pays once, at its host read)."""
    device = runner.device
    slots = list(range(batch))
    tokens = torch.zeros(batch, width, dtype=torch.long, device=device)

    def run_once() -> None:
        runner.step(slots, tokens)
        for slot in slots:
            runner.rollback(slot, 1)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run_once()
    synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        run_once()
    synchronize()
    back_to_back = (time.perf_counter() - began) / repeats
    alone = []
    for _ in range(3):
        began = time.perf_counter()
        run_once()
        synchronize()
        alone.append(time.perf_counter() - began)
    return back_to_back, statistics.median(alone)


def measure_step_costs(target: Runner, draft: Runner | None, widths: Sequence[int], repeats: int = 5) -> StepCosts:
    """Target steps of every width in `widths` and one-token draft steps, at every batch bucket of the target's
    slots, plus the per-step wait for the device (a one-token step alone minus back to back)."""
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
            back_to_back, alone = step_seconds(target, bucket, width, repeats)
            costs.target[(bucket, width)] = back_to_back
            if width == 1:
                costs.overhead[bucket] = max(0.0, alone - back_to_back)
        if draft is not None:
            costs.draft[bucket] = step_seconds(draft, bucket, 1, repeats)[0]
    for runner in (target, draft):
        if runner is not None:
            for slot in range(min(runner.slots, buckets[-1])):
                runner.reset(slot)
    return costs
