"""The one thread that runs the model: generations are served whole, one after another, in arrival order.

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

from speculor.engine import Decoding, Delta, GenerationResult, GenerationStats
from speculor.server.errors import APIError
from speculor.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# The engine's finish reasons in OpenAI's words: end-of-sequence and stop strings are both "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}

Event = Delta | GenerationResult | BaseException


class Job:
    """One generation waiting for or running on the worker, with the channel its events come back on.

    Created on the event loop; the worker posts each `Delta`, then the `GenerationResult` (or the exception that
    ended the generation) back to that loop.
    """

    def __init__(self, decoding: Decoding, prompt_tokens: int, arrived: float) -> None:
        self.decoding = decoding
        self.prompt_tokens = prompt_tokens
        self.arrived = arrived
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to stop this generation (or skip it if it has not started). Safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Event) -> None:
        """Hand an event to the waiting request (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            logger.debug("event loop closed; dropping an event of a generation nobody awaits")

    async def next_event(self) -> Delta | GenerationResult:
        """The next `Delta`, or the final `GenerationResult`; raises the error that ended the generation."""
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    async def result(self) -> GenerationResult:
        """Wait for the whole generation, skipping the streamed pieces."""
        while not isinstance(event := await self.next_event(), GenerationResult):
            pass
        return event


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

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            if self._waiting >= self.max_waiting:
                raise APIError(
                    503, f"the server is busy: {self._waiting} requests are already waiting", code="server_overloaded"
                )
            self._waiting += 1
            self.metrics.queued.set(self._waiting)
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
