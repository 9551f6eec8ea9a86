"""No request can hurt another, and the server's edges are closed: out-of-range parameters stop at the HTTP boundary
while other streams go on, admission counts free slots, a row the engine fails (or a step that raises) fails only
the requests it concerns, an API key guards the endpoints, slow bodies time out, docs are off by default, and
`speculor serve` checks its port before it loads anything."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from server_support import GAMMA, MODEL, serving, sse_events

from speculor import SpeculativeDecoder
from speculor.cli import main
from speculor.engine import Delta, GenerationResult, GenerationStats, RowEvent
from speculor.server import create_app
from speculor.server.errors import APIError
from speculor.server.metrics import ServerMetrics
from speculor.server.worker import Generations, GenerationWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "test-key"
SLOTS, QUEUE = 8, 4
REQUEST_TIMEOUT = 1.0
# Requests with these seeds meet a broken engine: the first has its row ended with finish reason "error" (what the
# engine does to a row it cannot go on with), the second makes the whole step raise.
ROW_FAILS_SEED, STEP_RAISES_SEED = 666, 667


def break_engine_for_marked_requests(engine) -> None:
    """Wrap `engine.add` and `engine.step` so that the requests seeded as above fail in the two ways."""
    row_fails, step_raises = set(), set()
    real_add, real_step = engine.add, engine.step

    def add(request):
        request_id = real_add(request)
        {ROW_FAILS_SEED: row_fails, STEP_RAISES_SEED: step_raises}.get(request.seed, set()).add(request_id)
        return request_id

    def step():
        if step_raises & engine._rows.keys():
            step_raises.clear()
            raise RuntimeError("a step that blows up")
        events = real_step()
        for position, event in enumerate(events):
            if event.request_id in row_fails:
                row_fails.discard(event.request_id)
                if event.result is None:
                    engine.abort(event.request_id)
                failed = GenerationResult(
                    None, [], GenerationStats(), "error", error="RuntimeError: a row that blows up"
                )
                events[position] = RowEvent(event.request_id, Delta([], ""), failed)
        return events

    engine.add, engine.step = add, step


@pytest.fixture(scope="module")
def decoder(model_dirs) -> SpeculativeDecoder:
    return SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu", max_batch_size=SLOTS)


@pytest.fixture(scope="module")
def url(decoder) -> Iterator[str]:
    app = create_app(
        decoder, gamma=GAMMA, model_name=MODEL, max_queue=QUEUE, api_key=KEY, request_timeout=REQUEST_TIMEOUT
    )
    break_engine_for_marked_requests(app.state.worker.engine)
    with serving(app) as running:
        yield running.url


@pytest.fixture
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def completion(**options) -> dict:
    return {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0, **options}


def test_a_top_k_past_64_bits_gets_400_while_a_concurrent_stream_completes(http):
    body = completion(max_tokens=60, stream=True)
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the stream is running
        for top_k in (2**63, 10**30):
            refused = http.post("/v1/completions", json=completion(top_k=top_k, temperature=1.0))
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "top_k"
        # The largest accepted top_k keeps the whole vocabulary: the engine sees no filter.
        widest = http.post("/v1/completions", json=completion(top_k=2**31 - 1, temperature=1.0, seed=1))
        assert widest.status_code == 200
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("error" in event for event in events)
    text = "".join(choice["text"] for event in events for choice in event["choices"])
    assert len(set(text)) > 5, "a degenerate model proves nothing"


def test_the_worker_admits_a_burst_into_free_slots_plus_the_queue(decoder):
    """The worker is not started, so nothing leaves the queue: all 8 free slots and 4 queue places are taken."""

    async def burst() -> list[int]:
        worker = GenerationWorker(decoder.new_engine(), ServerMetrics(), max_queue=QUEUE)
        statuses = []
        for _ in range(24):
            try:
                worker.submit(Generations([(decoder.request("hi", max_new_tokens=2), 1)], time.perf_counter()))
                statuses.append(200)
            except APIError as error:
                statuses.append(error.status)
        return statuses

    assert asyncio.run(burst()) == [200] * (SLOTS + QUEUE) + [503] * (24 - SLOTS - QUEUE)


def test_a_burst_that_fits_the_slots_and_queue_is_served_whole(http):
    with ThreadPoolExecutor(SLOTS + QUEUE) as pool:
        statuses = list(pool.map(lambda _: http.post("/v1/completions", json=completion()).status_code, range(12)))
    assert statuses == [200] * (SLOTS + QUEUE)


def test_more_prompts_than_slots_and_queue_can_hold_is_a_400_not_a_503(http):
    too_many = http.post("/v1/completions", json=completion(prompt=["hi"] * (SLOTS + QUEUE + 1)))
    assert too_many.status_code == 400
    assert (too_many.json()["error"]["code"], too_many.json()["error"]["param"]) == ("too_many_prompts", "prompt")
    assert http.post("/v1/completions", json=completion(prompt=["hi"] * (SLOTS + QUEUE))).status_code == 200


def test_a_row_the_engine_fails_fails_only_its_own_request(http):
    good = completion(max_tokens=30)
    with ThreadPoolExecutor(3) as pool:
        neighbour = pool.submit(http.post, "/v1/completions", json=good)
        plain = pool.submit(http.post, "/v1/completions", json=completion(seed=ROW_FAILS_SEED))
        streamed = pool.submit(http.post, "/v1/completions", json=completion(seed=ROW_FAILS_SEED, stream=True))
    assert plain.result().status_code == 500
    assert plain.result().json()["error"]["code"] == "generation_failed"
    assert "a row that blows up" in plain.result().json()["error"]["message"]
    *_, error_event, done = sse_events(streamed.result())
    assert (error_event["error"]["code"], done) == ("generation_failed", "[DONE]")
    assert neighbour.result().status_code == 200
    assert neighbour.result().json()["usage"]["completion_tokens"] == 30


def test_a_step_that_raises_fails_the_running_requests_and_the_worker_serves_on(http):
    failed = http.post("/v1/completions", json=completion(seed=STEP_RAISES_SEED))
    assert failed.status_code == 500
    assert "RuntimeError" in failed.json()["error"]["message"]
    after = http.post("/v1/completions", json=completion())
    assert after.status_code == 200
    assert after.json()["usage"]["completion_tokens"] == 8


def test_the_api_key_guards_the_api_but_not_health_and_metrics(url):
    missing = httpx.post(f"{url}/v1/completions", json=completion())
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(**completion()).usage.completion_tokens == 8
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_the_api_key_can_guard_health_and_metrics_too(decoder):
    client = TestClient(create_app(decoder, model_name=MODEL, api_key=KEY, api_key_everywhere=True))
    assert client.get("/health").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_health_names_models_without_their_paths(http, model_dirs):
    health = http.get("/health").json()
    assert (health["model"], health["draft"]) == (MODEL, model_dirs["draft"].name)
    assert not any(isinstance(value, str) and "/" in value for value in health.values())


def test_docs_are_off_unless_asked_for(http, decoder):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path).status_code == 404
    assert TestClient(create_app(decoder, docs=True)).get("/openapi.json").status_code == 200


def test_every_get_route_answers_head(http):
    for path in ("/v1/models", f"/v1/models/{MODEL}", "/health", "/metrics"):
        response = http.head(path)
        assert (response.status_code, response.content) == (200, b"")


def test_a_body_that_never_finishes_arriving_gets_408(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        connection.sendall(head.encode() + b'{"model": ')
        started = time.monotonic()
        answer = ""
        while '"request_timeout"' not in answer and (chunk := connection.recv(4096)):  # headers and body may split
            answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 408")
    assert '"request_timeout"' in answer
    assert time.monotonic() - started < REQUEST_TIMEOUT + 5


def test_serve_fails_cleanly_on_a_taken_port_before_loading_anything(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--target", str(tmp_path / "missing"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err
    assert "does not exist" not in err and "loading" not in err  # the models were never touched
