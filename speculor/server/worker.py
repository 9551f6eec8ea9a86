"""The one thread that runs the model: continuous batching over the decoder's `BatchEngine`.

The engine may be called from one thread only, so a single worker thread owns it; the event loop only parses
requests, queues their jobs and relays the events the worker posts back. Between two engine steps the worker
  1. aborts the rows whose client went away, so their slots are free for this very step;
  2. admits waiting jobs into free slots, first come first served (the prompts of one request go in together);
  3. steps the engine — one target forward for every running row; new rows' prompts are prefilled inside the step
     in bounded chunks — or, with nothing running, sleeps until a job arrives.
Admission counts slots: a request is queued when the free slots plus `max_queue` more waiting jobs hold all its jobs
(waiting jobs take the free slots first, as the worker will give them those); past that `submit` answers 503 at once,
with a Retry-After header, and a request with more jobs than the slots and the queue together could ever hold gets a
400, since retrying cannot help it.

One request must not hurt the others: a row the engine ends with finish reason "error" fails only its own request
(500), and should a step raise all the same, only the rows then running fail; the worker itself goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from speculor.distributed import GroupLostError
from speculor.engine import BatchEngine, DecodeRequest, Delta, GenerationResult, GenerationStats, TokenLogprob
from speculor.errors import SpeculorError
from speculor.server.errors import APIError
from speculor.server.metrics import ServerMetrics


class Leader(Protocol):
    """What the worker needs of an engine front that also drives follower ranks (tensor-parallel serving,
    `speculor.server.replicas.Leader`): it steps like the engine, is told when to keep idle followers alive, and when
    to let them go."""

    heartbeat_seconds: float

    def heartbeat(self) -> None: ...

    def stop(self) -> None: ...


logger = logging.getLogger(__name__)

# The engine's finish reasons in OpenAI's words: end-of-sequence and stop strings are both "stop". An aborted row's
# client has gone, so "abort" never reaches one; a row ending in "error" reaches its client as an error instead.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ROW_FAILED = "error"

# Seconds a client refused with 503 is told to wait before trying again.
RETRY_AFTER_SECONDS = 1

Event = Delta | GenerationResult | BaseException


class Job:
    """One generation (one prompt) of a `Generations`, waiting for a slot or running in the engine."""

    def __init__(self, owner: Generations, index: int, request: DecodeRequest, prompt_tokens: int) -> None:
        self.owner = owner
        self.index = index
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.first_token_seen = False
        self._cancelled = threading.Event()

    @property
    def arrived(self) -> float:
        return self.owner.arrived

    def cancel(self) -> None:
        """Ask the worker to stop this generation (or skip it if it has not started). Safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Event) -> None:
        """Hand an event to the waiting request (called from the worker thread)."""
        self.owner.post(self.index, event)


class Generations:
    """The generations one HTTP request asked for — one per prompt, in prompt order — and the channel their events
    come back on. Created on the event loop; the worker posts each job's `Delta`s, then its `GenerationResult` (or
    the exception that ended it) back to that loop, tagged with the job's index. The log-probabilities the deltas
    carry are kept per job, for answers that are not streamed."""

    def __init__(self, requests: list[tuple[DecodeRequest, int]], arrived: float) -> None:
        self.arrived = arrived
        self.jobs = [Job(self, index, request, tokens) for index, (request, tokens) in enumerate(requests)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in self.jobs]
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> list[int]:
        return [job.prompt_tokens for job in self.jobs]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def post(self, index: int, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (index, event))
        except RuntimeError:
            logger.debug("event loop closed; dropping an event of a generation nobody awaits")

    async def events(self) -> AsyncIterator[tuple[int, Delta | GenerationResult]]:
        """Every job's events as they come, as (job index, event), until each job has delivered its result; raises
        the error that ended a job (the others are then cancelled)."""
        unfinished = len(self.jobs)
        while unfinished:
            index, event = await self._events.get()
            if isinstance(event, BaseException):
                self.cancel()
                raise event
            if isinstance(event, GenerationResult):
                unfinished -= 1
            elif event.logprobs:
                self.logprobs[index].extend(event.logprobs)
            yield index, event

    async def results(self) -> list[GenerationResult]:
        """Wait for every job's whole generation, skipping the streamed pieces; in job order."""
        results: dict[int, GenerationResult] = {}
        async for index, event in self.events():
            if isinstance(event, GenerationResult):
                results[index] = event
        return [results[index] for index in range(len(self.jobs))]


class GenerationWorker:
    """Steps `engine` on a dedicated thread for every admitted job, and records the metrics."""

    def __init__(self, engine: BatchEngine, metrics: ServerMetrics, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        # Jobs the worker has taken for a slot and not yet finished, counted under the lock (the running dict is the
        # worker thread's own, and a job is in neither it nor the queue while it is being added to the engine).
        self._occupied = 0
        self._wake = threading.Condition()
        self._closing = False
        # Set by `lead` on a tensor-parallel rank 0 (speculor.server.replicas).
        self._leader: Leader | None = None
        self._on_group_lost: Callable[[GroupLostError], None] | None = None
        self._thread = threading.Thread(target=self._serve, name="speculor-generation", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def capacity(self) -> int:
        """The most jobs one request can have: every slot plus a full queue."""
        return self.engine.capacity + self.max_queue

    def start(self) -> None:
        self._thread.start()

    def lead(self, leader: Leader, on_group_lost: Callable[[GroupLostError], None]) -> None:
        """Step the engine through `leader` (a `speculor.server.replicas.Leader`), which sends every engine operation
        to the other tensor-parallel ranks, and beats its heartbeat while idle. When the group is lost the worker
        fails every request, refuses new ones, stops, and calls `on_group_lost`: a server without its other ranks
        cannot generate anything."""
        self.engine = leader
        self._leader = leader
        self._on_group_lost = on_group_lost

    @property
    def _idle(self) -> bool:
        return not self._running and not self._waiting and not self._closing

    def check_fits(self, jobs: int, param: str = "prompt") -> None:
        """400 for a request of more jobs (prompts × n) than the slots and the queue together could ever hold:
        unlike a 503, no retry would help it. `param` names what to reduce."""
        if jobs > self.capacity:
            raise APIError(
                400,
                f"{jobs} generations (prompts × n) are more than this server can ever hold at once "
                f"({self.engine.capacity} slots and {self.max_queue} waiting): "
                f"send at most {self.capacity} per request",
                param=param,
                code="too_many_prompts",
            )

    def submit(self, generations: Generations) -> None:
        """Queue every job of `generations`, or none of them: 503 when the free slots and the queue's room cannot hold
        them all now, 400 when they never could."""
        jobs = len(generations.jobs)
        self.check_fits(jobs)
        with self._wake:
            if self._closing:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            free_slots = self.engine.capacity - self._occupied
            if len(self._waiting) + jobs > free_slots + self.max_queue:
                raise APIError(
                    503,
                    self._busy_message(jobs, free_slots),
                    code="server_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self._waiting.extend(generations.jobs)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    def _busy_message(self, jobs: int, free_slots: int) -> str:
        """Why a request of `jobs` prompts is refused now, in the numbers that refused it: the waiting jobs take the
        free slots first, the rest of them fill the queue, and the request's prompts must fit what is left of both."""
        waiting = len(self._waiting)
        open_slots = max(0, free_slots - waiting)
        queued = max(0, waiting - free_slots)
        open_places = self.max_queue - queued
        capacity = self.engine.capacity
        if jobs == 1:
            queue = (
                f"the waiting queue is full ({queued} of {self.max_queue} places taken)"
                if self.max_queue
                else "this server keeps no waiting queue"
            )
            return (
                f"the server is busy: all {capacity} batch slots are taken by running or earlier requests and {queue}; "
                "retry after a moment"
            )
        return (
            f"the server is busy: this request's {jobs} prompts need {jobs} places and only "
            f"{open_slots + open_places} are open now ({open_slots} of {capacity} batch slots free, {open_places} of "
            f"{self.max_queue} places in the waiting queue free); retry after a moment, or send fewer prompts per "
            "request"
        )

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, fail the ones still waiting, let the running ones end, and stop the thread."""
        with self._wake:
            self._closing = True
            while self._waiting:
                job = self._waiting.popleft()
                job.post(APIError(503, "the server shut down before this request ran", code="server_shutting_down"))
            self.metrics.waiting.set(0)
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        try:
            self._serve_until_closed()
            if self._leader is not None:
                self._leader.stop()
        except GroupLostError as error:
            self._abandon(error)

    def _serve_until_closed(self) -> None:
        heartbeat_seconds = self._leader.heartbeat_seconds if self._leader is not None else None
        while True:
            with self._wake:
                while self._idle:
                    if not self._wake.wait(heartbeat_seconds) and self._idle:
                        break
                if self._closing and not self._running:
                    return
            if self._idle:
                assert self._leader is not None, "only a leader's idle wait times out"
                self._leader.heartbeat()
                continue
            try:
                self._abort_cancelled()
                with self._wake:
                    admitted = self._take_admissible()
                self._admit(admitted)
                if self._running:
                    self._step()
            except GroupLostError:
                raise
            except Exception as error:
                # A bug in the bookkeeping around the step: without this the thread would end and every request,
                # present and future, would wait forever.
                logger.exception("the generation worker failed")
                self._fail_running(
                    APIError(500, f"generation failed: {type(error).__name__}", code="generation_failed")
                )

    def _release_slots(self, count: int) -> None:
        with self._wake:
            self._occupied -= count

    def _take_admissible(self) -> list[Job]:
        """Pop the waiting jobs that fit the free slots, in arrival order (the caller holds the lock)."""
        room = self.engine.free_slots
        taken = []
        while self._waiting and len(taken) < room:
            job = self._waiting.popleft()
            if job.cancelled:
                self.metrics.finished.labels("cancelled").inc()
            else:
                taken.append(job)
        self._occupied += len(taken)
        self.metrics.waiting.set(len(self._waiting))
        return taken

    def _abort_cancelled(self) -> None:
        for request_id, job in list(self._running.items()):
            if job.cancelled:
                result = self.engine.abort(request_id)
                del self._running[request_id]
                self._release_slots(1)
                self.metrics.record_generation(result.stats, job.prompt_tokens, "cancelled", latency=None)

    def _admit(self, jobs: list[Job]) -> None:
        for position, job in enumerate(jobs):
            try:
                self._running[self.engine.add(job.request)] = job
            except SpeculorError as error:
                self._release_slots(1)
                job.post(APIError(400, str(error), code="invalid_value"))
            except Exception:
                # The taken jobs not yet in the engine would otherwise hold their slots forever.
                self._release_slots(len(jobs) - position)
                for lost in jobs[position:]:
                    lost.post(APIError(500, "the request could not be started", code="generation_failed"))
                raise
        self.metrics.running.set(len(self._running))

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except GroupLostError:
            raise
        except Exception as error:
            logger.exception("engine step failed")
            self._fail_running(
                APIError(500, f"generation failed: {type(error).__name__}: {error}", code="generation_failed")
            )
            return
        if events:
            self.metrics.batch_size.observe(self.engine.last_batch_size)
            self.metrics.gamma.observe(self.engine.last_gamma)
        for event in events:
            job = self._running[event.request_id]
            if event.delta.token_ids and not job.first_token_seen:
                job.first_token_seen = True
                self.metrics.time_to_first_token.observe(time.perf_counter() - job.arrived)
            job.post(event.delta)
            if event.result is not None:
                del self._running[event.request_id]
                self._release_slots(1)
                self._finish(job, event.result)
        self.metrics.running.set(len(self._running))

    def _finish(self, job: Job, result: GenerationResult) -> None:
        if result.finish_reason == ROW_FAILED:
            self.metrics.record_generation(result.stats, job.prompt_tokens, "error", latency=None)
            job.post(APIError(500, f"generation failed: {result.error}", code="generation_failed"))
            return
        latency = time.perf_counter() - job.arrived
        self.metrics.record_generation(result.stats, job.prompt_tokens, FINISH_REASONS[result.finish_reason], latency)
        job.post(result)

    def _abandon(self, error: GroupLostError) -> None:
        """After the tensor-parallel group is lost: fail every request, running or waiting, refuse new ones, and
        report the loss."""
        lost = APIError(503, "the server lost one of its tensor-parallel ranks", code="server_shutting_down")
        with self._wake:
            self._closing = True
            while self._waiting:
                self._waiting.popleft().post(lost)
            self.metrics.waiting.set(0)
        self._fail_running(lost)
        assert self._on_group_lost is not None
        self._on_group_lost(error)

    def _fail_running(self, error: APIError) -> None:
        """After a failed step: end every running row, tell its client, and go on serving the queue."""
        for request_id, job in list(self._running.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("could not free the slot of a failed generation")
            self.metrics.record_generation(GenerationStats(), job.prompt_tokens, "error", latency=None)
            job.post(error)
        self._release_slots(len(self._running))
        self._running.clear()
        self.metrics.running.set(0)
