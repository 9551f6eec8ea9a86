"""Prometheus metrics of one server app, kept in the app's own `CollectorRegistry` so several apps (tests, or two
servers in one process) never share or collide on counters.

Acceptance by position is exported as two counters labelled by draft position (0 = the first drafted token):
`rate(accepted_by_position) / rate(drafted_by_position)` is the acceptance rate at that depth, which shows how far
ahead the draft stays useful.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from speculor.engine import GenerationStats

# Seconds, from milliseconds (a tiny model on a GPU) to minutes (a long completion on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GAMMA_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        def histogram(name: str, documentation: str) -> Histogram:
            return Histogram(name, documentation, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.requests = counter(
            "speculor_requests", "HTTP requests answered, by endpoint and status", ("endpoint", "status")
        )
        self.finished = counter(
            "speculor_generations",
            "Generations run, by how they ended: stop, length, cancelled, error",
            ("finish_reason",),
        )
        self.prompt_tokens = counter("speculor_prompt_tokens", "Prompt tokens of the generations run")
        self.generated_tokens = counter("speculor_generated_tokens", "Tokens generated")
        self.drafted_tokens = counter("speculor_drafted_tokens", "Tokens proposed by the drafter")
        self.accepted_tokens = counter("speculor_accepted_tokens", "Drafted tokens the target accepted")
        self.target_forwards = counter("speculor_target_forwards", "Forward passes of the target model")
        self.drafted_by_position = counter("speculor_drafted_by_position", "Drafted tokens by position", ("position",))
        self.accepted_by_position = counter(
            "speculor_accepted_by_position", "Accepted drafted tokens by position", ("position",)
        )
        self.time_to_first_token = histogram(
            "speculor_time_to_first_token_seconds", "From a request's arrival to its first token, queueing included"
        )
        self.request_latency = histogram(
            "speculor_request_latency_seconds", "From a request's arrival to its last token, queueing included"
        )
        self.waiting = Gauge(
            "speculor_requests_waiting", "Generations waiting for a batch slot", registry=self.registry
        )
        self.running = Gauge("speculor_requests_running", "Generations in the running batch", registry=self.registry)
        self.batch_size = Histogram(
            "speculor_batch_size",
            "Rows decoded together per engine step",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.gamma = Histogram(
            "speculor_step_gamma",
            "γ per engine step: the most tokens any row drafted (0: the target alone)",
            buckets=GAMMA_BUCKETS,
            registry=self.registry,
        )

    def record_generation(
        self, stats: GenerationStats, prompt_tokens: int, finish_reason: str, latency: float | None
    ) -> None:
        """Count one finished (or cancelled, or failed) generation."""
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(stats.new_tokens)
        self.drafted_tokens.inc(stats.drafted)
        self.accepted_tokens.inc(stats.accepted)
        self.target_forwards.inc(stats.target_forwards)
        for position, count in enumerate(stats.drafted_by_position):
            self.drafted_by_position.labels(str(position)).inc(count)
        for position, count in enumerate(stats.accepted_by_position):
            self.accepted_by_position.labels(str(position)).inc(count)
        if latency is not None:
            self.request_latency.observe(latency)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
