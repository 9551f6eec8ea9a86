"""The edges of `speculor serve` a careless deployment or a hostile client reaches: settings that cannot work stop the
command before anything loads, a padded key is stripped, `--config` takes an explicit `--gamma`, completions'
log-probabilities keep the likeliest of the alternatives sharing a text (and chat's carry each token's own bytes),
error messages stay small and say what is full, connections are bounded in number and in how long their headers
may take, and a server on the loopback address answers only to loopback Host names."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from server_support import MODEL, serving, wait_for
from starlette.testclient import TestClient

from speculor import SpeculativeDecoder
from speculor.cli import main
from speculor.errors import SpeculorError
from speculor.models import shipped
from speculor.server import create_app
from speculor.server.connections import GuardedH11Protocol, guarded_protocol

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ISSUE_LOGPROBS_REQUEST = {"prompt": "é🎉", "max_tokens": 16, "temperature": 1.0, "seed": 3, "logprobs": 20}


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("SPECULOR_API_KEY", raising=False)


def serve_command(monkeypatch, *arguments: str) -> tuple[int, dict]:
    """Run `speculor serve --device cpu --port 0 ARGUMENTS` up to the point where uvicorn would serve: returns the exit
    status and what uvicorn was given (its server, and the address bound). Nothing is warmed up or served."""
    started: dict = {}

    def run(server: uvicorn.Server, sockets: list) -> None:
        started.update(server=server, app=server.config.app, address=sockets[0].getsockname())

    with monkeypatch.context() as patch:
        patch.setattr(uvicorn.Server, "run", run)
        patch.setattr(SpeculativeDecoder, "warm_up", lambda decoder, gamma: None)
        return main(["serve", "--device", "cpu", "--port", "0", *arguments]), started


# --- settings that cannot work ---------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", " \t\n"], "--api-key is only whitespace"),
    (["--api-key", "clé"], "--api-key holds U+00E9 at position 3"),
    (["--api-key-all"], "--api-key-all needs an API key"),
    (["--request-timeout", "0"], "--request-timeout must be a positive finite number of seconds, got 0.0"),
    (["--request-timeout", "-1"], "--request-timeout must be a positive finite number of seconds, got -1.0"),
    (["--request-timeout", "nan"], "--request-timeout must be a positive finite number of seconds, got nan"),
    (["--header-timeout", "inf"], "--header-timeout must be a positive finite number of seconds, got inf"),
    (["--shutdown-timeout", "0"], "--shutdown-timeout must be a positive finite number of seconds, got 0.0"),
    (["--max-queue", "-1"], "--max-queue must be at least 0, got -1"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1, got 0"),
    (["--max-connections", "0"], "--max-connections must be at least 1, got 0"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
    (["--gamma", "0"], "--gamma must be at least 1, got 0"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--model-name", "  "], "--model-name is empty"),
    (["--allowed-hosts", "localhost,,example.com"], "--allowed-hosts: '' is not a host name or address"),
    (["--allowed-hosts", "localhost:8000"], "--allowed-hosts: 'localhost:8000' is not a host name or address"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_a_setting_that_cannot_work_stops_serve_with_one_line_before_loading(arguments, message, tmp_path, capsys):
    # Were the setting let through, loading this missing target would fail with "does not exist" instead.
    assert main(["serve", "--target", str(tmp_path / "missing"), "--port", "0", *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {message}")


def test_an_unreadable_chat_template_stops_serve_before_loading(tmp_path, capsys):
    missing = tmp_path / "template.jinja"
    assert main(["serve", "--target", str(tmp_path / "missing"), "--port", "0", "--chat-template", str(missing)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --chat-template {str(missing)!r} cannot be read")


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_key_in_the_environment_is_refused_not_taken_for_no_key(value, tmp_path, monkeypatch, capsys):
    """A deployment script's `SPECULOR_API_KEY=$KEY` with $KEY unset must not serve the API to everyone."""
    monkeypatch.setenv("SPECULOR_API_KEY", value)
    assert main(["serve", "--target", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: $SPECULOR_API_KEY is")
    assert "would leave the API open" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("source", ["--api-key", "$SPECULOR_API_KEY"])
def test_whitespace_around_the_key_is_stripped_and_said(source, model_dirs, monkeypatch, capsys):
    """The issue's `--api-key ' sp aced '`, and a key read from a file with its CRLF, let clients in."""
    padded = " sp aced \r\n"
    arguments = ["--target", str(model_dirs["plain"])]
    if source == "--api-key":
        arguments += ["--api-key", padded]
    else:
        monkeypatch.setenv("SPECULOR_API_KEY", padded)
    code, started = serve_command(monkeypatch, *arguments)
    assert code == 0
    err = capsys.readouterr().err
    assert f"{source}: whitespace around the key stripped" in err
    assert "sp aced" not in err  # the key itself is never printed
    body = {"model": str(model_dirs["plain"]), "prompt": "def add(a, b):", "max_tokens": 2}
    with TestClient(started["app"], base_url="http://127.0.0.1:8000") as client:
        assert client.post("/v1/completions", json=body).status_code == 401
        for header in ("Bearer sp aced", "bearer   sp aced  "):
            assert client.post("/v1/completions", json=body, headers={"Authorization": header}).status_code == 200
        assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sp"}).status_code == 401


def test_create_app_refuses_an_empty_or_padded_key_too(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    for key in ("", "  ", " key", "key\n"):
        with pytest.raises(SpeculorError, match="api_key must be a non-empty string"):
            create_app(decoder, api_key=key)


# --- serve --config with --gamma -------------------------------------------------------------------------------------


def test_serve_takes_config_and_gamma_together_and_the_explicit_gamma_wins(model_dirs, tmp_path, monkeypatch, capsys):
    config = {"target": str(model_dirs["target"]), "draft": str(model_dirs["draft"]), "gamma": 2}
    (tmp_path / "best_config.json").write_text(json.dumps(config))
    code, started = serve_command(monkeypatch, "--config", str(tmp_path / "best_config.json"), "--gamma", "3")
    assert code == 0
    served = started["app"].state.served
    assert (served.gamma, served.decoder.draft.name) == (3, str(model_dirs["draft"]))
    err = capsys.readouterr().err
    config_line = next(line for line in err.splitlines() if line.startswith("config "))
    assert config_line.endswith("γ 3 (from --gamma, which wins; the config has γ 2)")
    serving_line = next(line for line in err.splitlines() if line.startswith("serving "))
    assert serving_line.endswith("γ 3)")


def test_a_config_gamma_that_cannot_work_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    (tmp_path / "best_config.json").write_text(json.dumps({"target": str(tmp_path / "missing"), "gamma": 0}))
    code, _ = serve_command(monkeypatch, "--config", str(tmp_path / "best_config.json"))
    assert code == 2
    assert "gamma must be an integer of at least 1, got 0" in capsys.readouterr().err


# --- log-probabilities of byte tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_target() -> SpeculativeDecoder:
    return SpeculativeDecoder(shipped().target, device="cpu")


def test_completions_logprobs_keep_the_likeliest_of_the_alternatives_sharing_a_text(shipped_target):
    """The issue's request: at position 0 six alternatives decode to "\ufffd" (bytes of a character), and the key must
    hold the likeliest of them, which is the likeliest alternative of all."""
    with serving(create_app(shipped_target, model_name=MODEL)) as running:
        answer = httpx.post(
            f"{running.url}/v1/completions", json={"model": MODEL, **ISSUE_LOGPROBS_REQUEST}, timeout=120
        )
    assert answer.status_code == 200
    served = answer.json()["choices"][0]["logprobs"]
    # Served by the target alone, so the same seed gives the same tokens offline; the worker has stopped.
    offline = shipped_target.generate(
        ISSUE_LOGPROBS_REQUEST["prompt"], max_new_tokens=16, temperature=1.0, seed=3, logprobs=20
    )
    assert served["tokens"] == [shipped_target.tokenizer.decode([token]) for token in offline.token_ids]
    text = shipped_target.tokenizer.decode
    shared = 0
    for entry, top in zip(offline.logprobs, served["top_logprobs"], strict=True):
        expected: dict[str, float] = {}
        for token, value in (*entry.top, (entry.token_id, entry.logprob)):
            expected[text([token])] = max(value, expected.get(text([token]), -math.inf))
        assert top.keys() == expected.keys()
        assert list(top.values()) == pytest.approx([expected[key] for key in top])
        assert list(top.values()) == sorted(top.values(), reverse=True)  # best first
        shared += len(entry.top) + 1 - len(top) - (entry.token_id in dict(entry.top))
    first = offline.logprobs[0]
    assert text([first.top[0][0]]) == "\ufffd"
    assert served["top_logprobs"][0]["\ufffd"] == pytest.approx(first.top[0][1])
    assert shared > 0


def test_chat_logprobs_carry_each_tokens_own_bytes(model_dirs):
    """The tiny tokenizer is byte-level BPE over ASCII code, so half its 300 tokens are single bytes of the upper half,
    each decoding to "\ufffd" alone: their `bytes` must be the byte, so that joining a completion's bytes gives its
    text, and the alternatives at a position have bytes as distinct as the tokens are."""
    decoder = SpeculativeDecoder(model_dirs["target"], device="cpu")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "é🎉"}],
        "max_tokens": 60,
        "temperature": 1.0,
        "seed": 5,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 20,
    }
    with serving(create_app(decoder, model_name=MODEL)) as running:
        answer = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=120).json()
    choice = answer["choices"][0]
    content = choice["logprobs"]["content"]
    joined = b"".join(bytes(entry["bytes"]) for entry in content)
    assert joined.decode("utf-8", errors="replace") == choice["message"]["content"]
    lone_bytes = [entry for entry in content if entry["token"] == "\ufffd"]
    assert lone_bytes, "the sample holds no byte token, so it proves nothing"
    assert all(len(entry["bytes"]) == 1 and entry["bytes"][0] >= 0x80 for entry in lone_bytes)
    assert any(character not in "\ufffd" and ord(character) > 0x7F for character in choice["message"]["content"]), (
        "the sample joins no bytes into a character, so it proves little"
    )
    for entry in content:
        alternatives = [bytes(alternative["bytes"]) for alternative in entry["top_logprobs"]]
        assert len(set(alternatives)) == len(alternatives) == 20


# --- bounded and truthful errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_url(model_dirs) -> Iterator[str]:
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    with serving(create_app(decoder, model_name=MODEL)) as running:
        yield running.url


def test_an_unknown_model_of_900_kb_gets_a_small_404(plain_url):
    name = "m" * 900_000
    for answer in (
        httpx.post(f"{plain_url}/v1/completions", json={"model": name, "prompt": "hi"}, timeout=60),
        httpx.get(f"{plain_url}/v1/models/{name[:10_000]}", timeout=60),  # a request line stays under 16 KiB
    ):
        assert answer.status_code == 404
        assert len(answer.content) < 600
        error = answer.json()["error"]
        assert error["code"] == "model_not_found"
        assert f"'{'m' * 100}'… (" in error["message"] and " characters)" in error["message"]


def test_an_unknown_parameter_with_a_huge_name_gets_a_small_400(plain_url):
    body = {"model": MODEL, "prompt": "hi", "x" * 500_000: 1}
    answer = httpx.post(f"{plain_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 400
    assert len(answer.content) < 700
    error = answer.json()["error"]
    assert (error["code"], len(error["param"])) == ("unknown_parameter", 100)
    assert "(500000 characters)" in error["message"]


@contextmanager
def held_engine(app) -> Iterator[threading.Event]:
    """Hold every engine step until the yielded event is set, so that admitted requests stay running."""
    engine = app.state.worker.engine
    release = threading.Event()
    real_step = engine.step

    def step():
        release.wait(60)
        return real_step()

    engine.step = step
    try:
        yield release
    finally:
        release.set()


def test_the_503_says_what_is_full_in_real_numbers(model_dirs):
    """The issue's case: 8 slots, --max-queue 4, one request running, 12 prompts: 11 places are open, not 0."""
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu", max_batch_size=8)
    app = create_app(decoder, model_name=MODEL, max_queue=4)
    with serving(app) as running, held_engine(app) as release, httpx.Client(base_url=running.url, timeout=60) as http:
        first = threading.Thread(
            target=http.post, args=("/v1/completions",), kwargs={"json": {"model": MODEL, "prompt": "hi"}}
        )
        first.start()
        wait_for(lambda: http.get("/health").json()["running"] == 1)
        refused = http.post("/v1/completions", json={"model": MODEL, "prompt": ["hi"] * 12})
        release.set()
        first.join(60)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["message"] == (
        "the server is busy: this request's 12 prompts need 12 places and only 11 are open now (7 of 8 batch slots "
        "free, 4 of 4 places in the waiting queue free); retry after a moment, or send fewer prompts per request"
    )


def test_a_single_prompt_refused_hears_that_slots_and_queue_are_full(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu", max_batch_size=2)
    app = create_app(decoder, model_name=MODEL, max_queue=1)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with serving(app) as running, held_engine(app) as release, httpx.Client(base_url=running.url, timeout=60) as http:
        held = [threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": body}) for _ in range(3)]
        for thread in held:
            thread.start()
        wait_for(lambda: app.state.worker.running + app.state.worker.waiting == 3)  # the worker is held in a step
        refused = http.post("/v1/completions", json=body)
        release.set()
        for thread in held:
            thread.join(60)
    assert refused.status_code == 503
    assert refused.json()["error"]["message"] == (
        "the server is busy: all 2 batch slots are taken by running or earlier requests and the waiting queue is "
        "full (1 of 1 places taken); retry after a moment"
    )


# --- connections: how many, and how long their headers may take ------------------------------------------------------

HEADER_TIMEOUT = 0.5


@contextmanager
def guarded_serving(app, max_connections: int, header_timeout: float) -> Iterator[tuple[int, uvicorn.Server]]:
    """`app` under uvicorn with the serve command's connection bounds, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="error", http=guarded_protocol(max_connections, header_timeout))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(30)


def read_until_closed(connection: socket.socket, timeout: float = 10.0) -> bytes:
    connection.settimeout(timeout)
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def read_response(connection: socket.socket) -> bytes:
    """One whole response of known length from a kept-alive connection."""
    connection.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += connection.recv(65536)
    return data


@pytest.fixture(scope="module")
def timed_port(model_dirs) -> Iterator[int]:
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    app = create_app(decoder, model_name=MODEL, request_timeout=10)
    with guarded_serving(app, max_connections=64, header_timeout=HEADER_TIMEOUT) as (port, _):
        yield port


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(timed_port):
    with socket.create_connection(("127.0.0.1", timed_port)) as connection:
        started = time.monotonic()
        assert read_until_closed(connection) == b""  # closed without an answer: there was no request to answer
        assert HEADER_TIMEOUT - 0.1 < time.monotonic() - started < HEADER_TIMEOUT + 3


def test_headers_trickled_a_line_at_a_time_get_408_at_the_header_timeout(timed_port):
    with socket.create_connection(("127.0.0.1", timed_port)) as connection:
        started = time.monotonic()
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        connection.settimeout(0.1)
        answer = b""
        while time.monotonic() - started < HEADER_TIMEOUT + 5:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                try:
                    connection.sendall(b"X-Trickle: 1\r\n")  # one more header line, never the end of them
                except OSError:
                    break
                continue
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert (error["code"], error["type"]) == ("request_timeout", "invalid_request_error")
    assert error["message"] == f"the request's headers did not all arrive within {HEADER_TIMEOUT:g} seconds"
    assert HEADER_TIMEOUT - 0.1 < elapsed < HEADER_TIMEOUT + 3


def test_each_request_on_a_kept_alive_connection_gets_the_header_timeout(timed_port):
    with socket.create_connection(("127.0.0.1", timed_port)) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(connection).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT + 0.2)  # longer than a header timeout, shorter than uvicorn's 5 s keep-alive
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(connection).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        connection.sendall(b"GET /health HTTP/1.1\r\n")
        assert read_until_closed(connection).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < HEADER_TIMEOUT + 3


def test_a_body_slower_than_the_header_timeout_is_still_served(timed_port):
    """The header timeout ends with the headers: the body has --request-timeout."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", timed_port)) as connection:
        connection.sendall(head.encode())
        time.sleep(HEADER_TIMEOUT * 2)
        connection.sendall(body)
        assert read_response(connection).startswith(b"HTTP/1.1 200")


def test_connections_past_the_limit_get_503_and_are_closed(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    with guarded_serving(create_app(decoder, model_name=MODEL), max_connections=3, header_timeout=30) as (port, server):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        wait_for(lambda: len(server.server_state.connections) == 3)
        with socket.create_connection(("127.0.0.1", port)) as refused:
            refused.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # sent before the answer is read
            answer = read_until_closed(refused)
        idle.pop().close()
        wait_for(lambda: len(server.server_state.connections) == 2)
        with socket.create_connection(("127.0.0.1", port)) as admitted:
            admitted.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(admitted).startswith(b"HTTP/1.1 200")
        for connection in idle:
            connection.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nretry-after: 1" in head and b"\r\nconnection: close" in head
    error = json.loads(body)["error"]
    assert (error["code"], error["type"]) == ("too_many_connections", "server_error")
    assert "3 connections open" in error["message"]


def test_serve_gives_uvicorn_its_connection_bounds(model_dirs, monkeypatch):
    target = ["--target", str(model_dirs["plain"])]
    code, started = serve_command(monkeypatch, *target, "--max-connections", "7", "--header-timeout", "2.5")
    assert code == 0
    protocol = started["server"].config.http
    assert issubclass(protocol, GuardedH11Protocol)
    assert (protocol.max_connections, protocol.header_timeout) == (7, 2.5)
    code, started = serve_command(monkeypatch, *target)
    assert (started["server"].config.http.max_connections, started["server"].config.http.header_timeout) == (512, 10)


# --- the Host header -------------------------------------------------------------------------------------------------


def test_a_loopback_server_refuses_a_rebound_host_by_default(model_dirs, monkeypatch, capsys):
    """A DNS-rebinding page makes the browser send its own name as the Host: the answer must be a 400."""
    code, started = serve_command(monkeypatch, "--target", str(model_dirs["plain"]))
    assert code == 0
    assert "Host header checked: localhost, 127.0.0.1, ::1 with any port" in capsys.readouterr().err
    with serving(started["app"]) as running:
        port = running.url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(f"{running.url}/v1/models", headers={"Host": host}).status_code == 200, host
        for host in (f"rebound.example:{port}", f"localhost.example:{port}", "x" * 10_000):
            refused = httpx.get(f"{running.url}/v1/models", headers={"Host": host})
            assert refused.status_code == 400, host
            assert refused.json()["error"]["code"] == "invalid_host"
            assert len(refused.content) < 600
        assert httpx.get(f"{running.url}/health", headers={"Host": "rebound.example"}).status_code == 400


def test_allowed_hosts_replaces_the_default_and_a_wildcard_turns_the_check_off(model_dirs, monkeypatch, capsys):
    target = ["--target", str(model_dirs["plain"])]
    code, started = serve_command(monkeypatch, *target, "--allowed-hosts", "api.example.com, *.corp.example")
    assert code == 0
    client = TestClient(started["app"], base_url="http://api.example.com:8000")
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Host": "a.corp.example"}).status_code == 200
    assert client.get("/v1/models", headers={"Host": "localhost"}).status_code == 400
    code, started = serve_command(monkeypatch, *target, "--allowed-hosts", "*")
    assert TestClient(started["app"], base_url="http://anything.example").get("/v1/models").status_code == 200
    assert "Host header not checked (--allowed-hosts *)" in capsys.readouterr().err


def test_a_server_bound_elsewhere_checks_no_host_unless_told_and_says_so(model_dirs, monkeypatch, capsys):
    code, started = serve_command(monkeypatch, "--target", str(model_dirs["plain"]), "--host", "0.0.0.0")
    assert code == 0
    assert "Host header not checked: bound to 0.0.0.0, not a loopback address" in capsys.readouterr().err
    assert TestClient(started["app"], base_url="http://server.lan").get("/v1/models").status_code == 200
