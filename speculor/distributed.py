"""Joining a tensor-parallel group, and the few decisions its ranks must share.

A tensor-parallel decoder runs one process per rank (`torchrun --nproc-per-node N -m speculor ...`). Every rank
runs the same engine on the same logits — the sharded target's logits are whole on every rank after its last
all-reduce — so greedy and seeded choices agree without sending tokens around. Only what a rank would otherwise
pick on its own must be agreed on: a fresh random seed (`agreed_seed`) and the load-aware γ, which learns from wall
time that differs between ranks (`RankAgreedGamma`). Anything else that differs would make the ranks run different
steps, and their collectives would then wait for each other until the group's timeout ends the run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from speculor.adaptive import AUTO_MAX_GAMMA, LoadAwareGamma
from speculor.errors import SpeculorError

# How long a collective waits for the other ranks before the run fails: a dead or stuck rank must end the group
# with an error rather than hang it. Generous, since the first collective also waits for the slowest rank to load
# its shard. SPECULOR_TP_TIMEOUT (seconds) overrides it.
DEFAULT_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in the group: its `rank` of `size`, the `device` it computes on (cuda:LOCAL_RANK on a
    GPU) and the process group the sharded layers all-reduce over."""

    rank: int
    size: int
    device: torch.device
    group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, serves and decides what the others replay."""
        return self.rank == 0


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE; 1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def group_timeout() -> timedelta:
    value = os.environ.get("SPECULOR_TP_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError as error:
        raise SpeculorError(f"SPECULOR_TP_TIMEOUT must be a number of seconds, got {value!r}") from error
    return timedelta(seconds=seconds)


def join_group(size: int, device: torch.device) -> TensorParallelGroup:
    """Join (initializing where this process has not yet) the default process group of `size` ranks: NCCL on CUDA,
    gloo on the CPU, with the `group_timeout` on every collective. Each rank computes on cuda:LOCAL_RANK on a GPU."""
    if not dist.is_available():
        raise SpeculorError("tensor parallelism needs torch.distributed, which this torch build lacks")
    world = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    if world != size:
        raise SpeculorError(
            f"tensor_parallel={size} needs {size} processes, one per rank, but this one is one of {world}: launch "
            f"with `torchrun --nproc-per-node {size} -m speculor ...`"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Binding NCCL to the device up front creates its communicator now, not inside a CUDA graph capture.
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend, timeout=group_timeout(), device_id=device_id)
    return TensorParallelGroup(dist.get_rank(), size, device, dist.group.WORLD)


def tensor_parallel_group(size: int, device: torch.device, runner: str) -> TensorParallelGroup | None:
    """The group a decoder of `tensor_parallel=size` runs in (None for 1, an unsharded decoder). Only the fast
    runner shards a model: the Hugging Face runner is refused rather than silently loading the whole model per
    rank."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise SpeculorError(f"tensor_parallel must be an integer ≥ 1, got {size!r}")
    if size == 1:
        return None
    if runner == "hf":
        raise SpeculorError(
            "the Hugging Face runner does not shard models: tensor_parallel > 1 needs runner='fast' (or 'auto')"
        )
    return join_group(size, device)


class GroupLostError(SpeculorError):
    """A collective failed: another rank died or stopped answering, and the group cannot go on without it."""


# Words in the message of a failed collective: gloo reports a dead peer as a plain RuntimeError.
COLLECTIVE_FAILURE_MARKS = ("gloo", "nccl", "connection", "timed out", "timeout")


@contextmanager
def collectives(group: TensorParallelGroup) -> Iterator[None]:
    """Turn a failed collective into one clear error: it fails when another rank has died (its connection closes)
    or stopped answering (the group's timeout), and the ranks cannot go on without it."""
    try:
        yield
    except RuntimeError as error:
        message = str(error)
        if not isinstance(error, dist.DistError) and not any(
            mark in message.lower() for mark in COLLECTIVE_FAILURE_MARKS
        ):
            raise
        reason = message.splitlines()[0] if message else type(error).__name__
        raise GroupLostError(
            f"tensor-parallel rank {group.rank} of {group.size} lost the group: another rank died or stopped "
            f"answering ({reason})"
        ) from error


def broadcast_ints(values: Sequence[int], group: TensorParallelGroup) -> list[int]:
    """Rank 0's `values` on every rank (each rank passes as many)."""
    tensor = torch.tensor(list(values), dtype=torch.long, device=group.device)
    with collectives(group):
        dist.broadcast(tensor, src=0, group=group.group)
    return tensor.tolist()


def agreed_seed(group: TensorParallelGroup) -> int:
    """A fresh random seed, rank 0's, so that every rank samples the same tokens."""
    return broadcast_ints([secrets.randbits(63)], group)[0]


class RankAgreedGamma(LoadAwareGamma):
    """The load-aware γ policy with rank 0's choice on every rank: each rank learns from its own step times, which
    differ slightly, and ranks drafting different γ would run different steps."""

    def __init__(self, group: TensorParallelGroup, max_gamma: int = AUTO_MAX_GAMMA) -> None:
        super().__init__(max_gamma)
        self.group = group

    def choose(self, kinds: Sequence[str], caps: Sequence[int]) -> int:
        return broadcast_ints([super().choose(kinds, caps)], self.group)[0]
