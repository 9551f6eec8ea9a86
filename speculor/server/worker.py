"""The one thread that runs the model: generations are served whole, one after another, in arrival order (the
prompts of one request too, in their order).

Every `Decoding` of a `SpeculativeDecoder` steps the decoder's shared runners (their KV caches), so two
generations must never interleave their steps. Serializing whole requests on a single worker thread is the
simplest way to guarantee that, and it keeps model work off the event loop: the loop only parses requests,
queues them, and relays the `Delta`s the worker posts back. A request whose client goes away is flagged; the
worker notices after the current step, stops that generation and moves on to the next.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from speculor.engine import Decoding, Delta, GenerationResult, GenerationStats
from speculor.server.errors import APIError
from speculor.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# The engine's finish reasons in OpenAI's words: end-of-sequence and stop strings are both "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}

Event = Delta | GenerationResult | BaseException


class Job:
    """One generation (one prompt) of a `Generations`, waiting for or running on the worker."""

    def __init__(self, owner: Generations, index: int, decoding: Decoding, prompt_tokens: int) -> None:
        self.owner = owner
        self.index = index
        self.decoding = decoding
        self.prompt_tokens = prompt_tokens
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
    the exception that ended it) back to that loop, tagged with the job's index."""

    def __init__(self, decodings: list[tuple[Decoding, int]], arrived: float) -> None:
        self.arrived = arrived
        self.jobs = [Job(self, index, decoding, tokens) for index, (decoding, tokens) in enumerate(decodings)]
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
            yield index, event

    async def results(self) -> list[GenerationResult]:
        """Wait for every job's whole generation, skipping the streamed pieces; in job order."""
        results: dict[int, GenerationResult] = {}
        async for index, event in self.events():
            if isinstance(event, GenerationResult):
                results[index] = event
        return [results[index] for index in range(len(self.jobs))]


class GenerationWorker:
    """Runs submitted jobs one at a time on a dedicated thread and records their metrics.

    At most `max_waiting` jobs may wait; past that, and while shutting down, `submit` refuses with a 503.
    """

    def __init__(self, metrics: ServerMetrics, max_waiting: int) -> None:
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="speculor-generation", daemon=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        self._thread.start()

    def submit(self, generations: Generations) -> None:
        """Queue every job of `generations`, or none of them (503) when the queue has no room for all."""
        with self._lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            if self._waiting + len(generations.jobs) > self.max_waiting:
                raise APIError(
                    503, f"the server is busy: {self._waiting} requests are already waiting", code="server_overloaded"
                )
            self._waiting += len(generations.jobs)
            self.metrics.queued.set(self._waiting)
            for job in generations.jobs:
                self._jobs.put(job)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, fail the ones still waiting, let the running one end, and stop the thread."""
        with self._lock:
            self._closing = True
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self.metrics.queued.set(self._waiting)
            if self._closing:
                job.post(APIError(503, "the server shut down before this request ran", code="server_shutting_down"))
            elif job.cancelled:
                self.metrics.finished.labels("cancelled").inc()
            else:
                self.metrics.running.inc()
                try:
                    self._run(job)
                finally:
                    self.metrics.running.dec()

    def _run(self, job: Job) -> None:
        steps = iter(job.decoding)
        outcome = None
        first_token_seen = False
        try:
            for delta in steps:
                if not first_token_seen:
                    first_token_seen = True
                    self.metrics.time_to_first_token.observe(time.perf_counter() - job.arrived)
                job.post(delta)
                if job.cancelled:
                    outcome = "cancelled"
                    break
        except Exception as error:
            logger.exception("generation failed")
            outcome = "error"
            job.post(APIError(500, f"generation failed: {type(error).__name__}: {error}", code="generation_failed"))
        finally:
            steps.close()
        result = job.decoding.result
        if outcome is not None or result is None:
            stats = result.stats if result is not None else GenerationStats()
            self.metrics.record_generation(stats, job.prompt_tokens, outcome or "error", latency=None)
            return
        latency = time.perf_counter() - job.arrived
        self.metrics.record_generation(result.stats, job.prompt_tokens, FINISH_REASONS[result.finish_reason], latency)
        job.post(result)
