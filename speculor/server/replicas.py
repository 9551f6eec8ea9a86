"""`speculor serve` over a tensor-parallel group: rank 0 serves, the other ranks replay its engine.

Every rank holds a shard of the target, so every rank must run the very same engine steps — the sharded layers
all-reduce inside each one. Only rank 0 hears clients, so only it knows which requests start and which end early.
Before each engine step it broadcasts what it did to its engine since the last one — the requests it added (whole,
a drawn seed included) and the ids it aborted — and the followers (`follow`) do the same to theirs, in the same
order, then step with it. Their engines hand out request ids in the same order, so the ids agree (checked).

While nothing runs, rank 0 broadcasts a heartbeat every few seconds, so followers blocked waiting for the next
message do not reach the group's timeout. A rank that dies ends the group: rank 0's next collective fails, and the
server stops with one error line; followers whose rank 0 went away exit with their own.

`speculor serve --tensor-parallel N` run without torchrun starts the N − 1 followers itself (`spawned_followers`),
with the environment torchrun would give them, and stops them when it exits.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from speculor.api import SpeculativeDecoder
from speculor.cli import console
from speculor.distributed import GroupLostError, TensorParallelGroup, collectives, group_timeout, launched_world_size
from speculor.engine import BatchEngine, DecodeRequest, GenerationResult, RowEvent
from speculor.errors import SpeculorError
from speculor.server.worker import GenerationWorker

# The longest a follower waits between two messages while rank 0 is idle (a quarter of the group's timeout where
# that is shorter than 20 s).
HEARTBEAT_SECONDS = 5.0
# Seconds a follower rank 0 started gets to exit on its own after rank 0 stops, before it is killed.
FOLLOWER_EXIT_SECONDS = 10.0

STEP, IDLE, STOP = "step", "idle", "stop"


@dataclass
class Added:
    """A request rank 0 added to its engine, and the id its engine gave it."""

    request: DecodeRequest
    request_id: int


@dataclass
class Aborted:
    request_id: int


@dataclass
class Message:
    """What rank 0 did to its engine since its last message, then what to do next: STEP, IDLE (only keep the group
    alive) or STOP (the server has stopped)."""

    operations: list[Added | Aborted] = field(default_factory=list)
    command: str = IDLE


def heartbeat_seconds() -> float:
    return min(HEARTBEAT_SECONDS, group_timeout().total_seconds() / 4)


def control_group(group: TensorParallelGroup) -> TensorParallelGroup:
    """A gloo group of the same ranks for rank 0's messages, made by every rank at the same point. On CUDA the
    model's group is NCCL, where a dead peer leaves a collective waiting for the group's timeout; gloo sees the
    closed connection at once. And the pickled messages need no trip through the GPU."""
    return replace(group, device=torch.device("cpu"), group=dist.new_group(backend="gloo", timeout=group_timeout()))


def broadcast(message: Message | None, group: TensorParallelGroup) -> Message:
    """Rank 0's `message` on every rank (the others pass None)."""
    box = [message]
    with collectives(group):
        dist.broadcast_object_list(box, src=0, group=group.group)
    received = box[0]
    assert isinstance(received, Message)
    return received


class Leader:
    """Rank 0's engine as the generation worker sees it: the `BatchEngine`, whose every add and abort is recorded and
    sent to the followers before the next step. Anything else (slots, the last step's batch size and γ) is read
    straight off the engine."""

    def __init__(self, engine: BatchEngine, group: TensorParallelGroup) -> None:
        self.engine = engine
        self.group = group
        self.heartbeat_seconds = heartbeat_seconds()
        self._since_last = Message()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def add(self, request: DecodeRequest) -> int:
        """Add `request` with a seed of rank 0's drawing where it has none (every rank must sample alike), leaving
        `reproducible` as the client asked: an unseeded request is still not reproducible."""
        if request.seed is None:
            request = replace(request, seed=secrets.randbits(63))
        request_id = self.engine.add(request)
        self._since_last.operations.append(Added(request, request_id))
        return request_id

    def abort(self, request_id: int) -> GenerationResult:
        result = self.engine.abort(request_id)
        self._since_last.operations.append(Aborted(request_id))
        return result

    def step(self) -> list[RowEvent]:
        self._send(STEP)
        events = self.engine.step()
        # The engine confines a failed step to its rows; a lost group fails every row and must end the server.
        for event in events:
            error = event.result.error if event.result is not None else None
            if error is not None and error.startswith(f"{GroupLostError.__name__}:"):
                raise GroupLostError(error.removeprefix(f"{GroupLostError.__name__}: "))
        return events

    def heartbeat(self) -> None:
        """Tell the followers rank 0 is alive (and what it aborted while idle)."""
        self._send(IDLE)

    def stop(self) -> None:
        self._send(STOP)

    def _send(self, command: str) -> None:
        message, self._since_last = self._since_last, Message()
        message.command = command
        broadcast(message, self.group)


def follow(decoder: SpeculativeDecoder) -> int:
    """A follower rank's serving: replay rank 0's engine operations and steps until it stops (0), or raise a
    `SpeculorError` when rank 0 goes away."""
    assert decoder.tensor_parallel is not None and not decoder.tensor_parallel.is_main
    group = control_group(decoder.tensor_parallel)
    engine = decoder.new_engine()
    while True:
        try:
            message = broadcast(None, group)
        except GroupLostError as error:
            reason = str(error.__cause__ or error).splitlines()[0]
            raise SpeculorError(
                f"tensor-parallel rank {group.rank} lost rank 0, which serves: it died or stopped answering ({reason})"
            ) from error
        for operation in message.operations:
            if isinstance(operation, Added):
                request_id = engine.add(operation.request)
                if request_id != operation.request_id:
                    raise SpeculorError(
                        f"tensor-parallel rank {group.rank} gave request id {request_id} where rank 0 gave "
                        f"{operation.request_id}: the ranks' engines diverged"
                    )
            else:
                engine.abort(operation.request_id)
        if message.command == STEP:
            engine.step()
        elif message.command == STOP:
            return 0


def lead(worker: GenerationWorker, decoder: SpeculativeDecoder, on_lost: Callable[[GroupLostError], None]) -> None:
    """Make rank 0's generation `worker` send its engine's operations to the followers; `on_lost` is called (from the
    worker's thread) when the group is lost and the worker has stopped."""
    assert decoder.tensor_parallel is not None and decoder.tensor_parallel.is_main
    group = control_group(decoder.tensor_parallel)
    # Requests are built on the server's event loop, beside the worker's collectives: rank 0 draws their seeds.
    decoder.agree_on_seeds = False
    worker.lead(Leader(worker.engine, group), on_lost)


def serving_rank() -> int:
    """This process's rank in the group it was launched into (0 when not launched by torchrun or by rank 0)."""
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def spawned_followers(size: int) -> Iterator[None]:
    """Under `speculor serve --tensor-parallel SIZE` run without a launcher, start ranks 1 … SIZE − 1 as this very
    command with torchrun's environment, make this process rank 0, and stop the followers on the way out. Does
    nothing for SIZE 1 or when a launcher already started every rank."""
    if size <= 1 or launched_world_size() > 1:
        yield
        return
    if sys.argv[1:2] != ["serve"]:
        raise SpeculorError(
            "`speculor serve --tensor-parallel` starts its other ranks by running its own command line again, and "
            f"this process was not started as `speculor serve …`: launch every rank with `torchrun --nproc-per-node "
            f"{size} -m speculor serve …`"
        )
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(size)}
    os.environ.update(rendezvous, RANK="0", LOCAL_RANK="0")
    followers = []
    try:
        for rank in range(1, size):
            environment = dict(os.environ, **rendezvous, RANK=str(rank), LOCAL_RANK=str(rank))
            process = subprocess.Popen([sys.executable, "-m", "speculor", *sys.argv[1:]], env=environment)
            followers.append(process)
            console.print(f"[dim]started tensor-parallel rank {rank} (pid {process.pid})[/dim]", soft_wrap=True)
        yield
    finally:
        for process in followers:
            if process.poll() is None:
                process.terminate()
        for process in followers:
            try:
                process.wait(FOLLOWER_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
