"""`speculor serve` over two gloo ranks on the CPU: rank 0 serves over HTTP and the follower replays its engine, so
completions equal one process's; a rank that dies ends the other with an error, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import train_tiny_tokenizer
from server_support import metric_samples, wait_for
from test_tensor_parallel import RANKS, free_port, make_decoder, save_model

GAMMA = 3
NEW_TOKENS = 20
PROMPTS = ["def add(a, b):", "for item in items:", "class Point:", "import os"]
# Short, so a lost rank is noticed within the test; the heartbeat rank 0 sends while idle is a quarter of it.
GROUP_TIMEOUT_SECONDS = 8
START_TIMEOUT_SECONDS = 60
EXIT_TIMEOUT_SECONDS = 30


@pytest.fixture(scope="module")
def served_pair(tmp_path_factory) -> dict[str, str]:
    """A float32 target and a noisy copy of it as the draft (so steps both accept and roll back), with a tokenizer."""
    root = tmp_path_factory.mktemp("tensor_parallel_serve")
    tokenizer = train_tiny_tokenizer()
    target = save_model(root / "target", seed=60, vocab_size=len(tokenizer))
    draft = save_model(root / "draft", seed=61, noise_from=Path(target))
    for path in (target, draft):
        tokenizer.save_pretrained(path)
    return {"target": target, "draft": draft}


@pytest.fixture(scope="module")
def expected(served_pair) -> dict:
    """What one process generates: greedy per prompt, and a seeded sample."""
    decoder = make_decoder(served_pair["target"], served_pair["draft"], 1)
    greedy = {prompt: decoder.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=GAMMA) for prompt in PROMPTS}
    for result in greedy.values():
        assert len(set(result.token_ids)) > 4, f"a random model repeating itself proves little: {result.token_ids}"
    sampled = decoder.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, gamma=GAMMA, temperature=0.9, seed=7)
    return {"greedy": {prompt: result.text for prompt, result in greedy.items()}, "sampled": sampled.text}


class Server:
    """`python -m speculor serve` on a free port, its output collected as it comes (a full pipe would block it)."""

    def __init__(self, served_pair: dict[str, str], extra: list[str], env: dict[str, str], port: int) -> None:
        self.port = str(port)
        command = [
            *(sys.executable, "-m", "speculor", "serve", "--target", served_pair["target"], "--draft"),
            *(served_pair["draft"], "--device", "cpu", "--runner", "fast", "--threads", "1", "--port", self.port),
            *("--max-batch-size", "4", "--tensor-parallel", str(RANKS), "--log-level", "warning", *extra),
        ]
        environment = dict(os.environ, OMP_NUM_THREADS="1", SPECULOR_TP_TIMEOUT=str(GROUP_TIMEOUT_SECONDS), **env)
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            assert self.process.poll() is None, f"the server exited: {self.output[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start: {self.output[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def wait_for_exit(self) -> int:
        """The exit code, once the process and everything writing to its output (the followers it started) ended."""
        try:
            code = self.process.wait(EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"it did not exit within {EXIT_TIMEOUT_SECONDS} s (a hang): {self.output[-3000:]}")
        self._reader.join(EXIT_TIMEOUT_SECONDS)
        assert not self._reader.is_alive(), f"a rank it started outlived it: {self.output[-3000:]}"
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def leave_mid_stream(self, prompt: str) -> None:
        """Start a long streamed completion and hang up after its first piece, so rank 0 aborts it."""
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 200, "temperature": 0.0, "stream": True}
        with httpx.stream("POST", f"{self.url}/completions", json=body, timeout=60) as stream:
            next(line for line in stream.iter_lines() if line.startswith("data: "))

    def cancelled(self) -> float:
        samples = metric_samples(f"http://127.0.0.1:{self.port}")
        return samples.get(("speculor_generations_total", frozenset({("finish_reason", "cancelled")})), 0)

    def complete(self, prompt: str, **options) -> dict:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0, **options}
        response = httpx.post(f"{self.url}/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()


def launched_ranks(served_pair: dict[str, str]) -> list[Server]:
    """Both ranks started as torchrun would start them."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(RANKS)}
    extra = ["--model-name", "tiny", "--gamma", str(GAMMA)]
    port = free_port()
    return [
        Server(served_pair, extra, dict(rendezvous, RANK=str(rank), LOCAL_RANK=str(rank)), port)
        for rank in range(RANKS)
    ]


def test_two_ranks_serve_what_one_process_generates_and_stop_when_the_follower_dies(
    served_pair, expected, one_torch_thread
):
    ranks = launched_ranks(served_pair)
    server, follower = ranks
    try:
        server.wait_until_serving()
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(server.complete, PROMPTS))
        assert [answer["choices"][0]["text"] for answer in answers] == [expected["greedy"][p] for p in PROMPTS]
        drafted = sum(answer["speculative"]["drafted"] for answer in answers)
        accepted = sum(answer["speculative"]["accepted"] for answer in answers)
        assert 0 < accepted < drafted, "the draft must both agree and disagree (rollbacks)"

        assert server.complete(PROMPTS[0], temperature=0.9, seed=7)["choices"][0]["text"] == expected["sampled"]
        unseeded = server.complete(PROMPTS[1], temperature=0.9)
        assert unseeded["usage"]["completion_tokens"] == NEW_TOKENS
        # Had the ranks drawn different seeds, they would now run different steps and this would hang.
        assert server.complete(PROMPTS[2])["choices"][0]["text"] == expected["greedy"][PROMPTS[2]]
        # An abort must reach the follower too, or its batch would differ from rank 0's from then on.
        server.leave_mid_stream(PROMPTS[0])
        wait_for(lambda: server.cancelled() == 1)
        assert server.complete(PROMPTS[3])["choices"][0]["text"] == expected["greedy"][PROMPTS[3]]
        assert follower.process.poll() is None
        assert "serving" not in follower.output, "only rank 0 serves"

        follower.process.kill()
        assert server.wait_for_exit() != 0
        assert "lost the group" in server.output, server.output[-3000:]
    finally:
        for rank in ranks:
            rank.stop()


def test_serve_starts_its_own_follower_which_stops_when_rank_zero_dies(served_pair, expected, one_torch_thread):
    server = Server(served_pair, ["--model-name", "tiny"], {}, free_port())
    try:
        server.wait_until_serving()
        assert "started tensor-parallel rank 1" in server.output
        assert server.complete(PROMPTS[3])["choices"][0]["text"] == expected["greedy"][PROMPTS[3]]
        server.process.send_signal(signal.SIGKILL)
        server.wait_for_exit()
        assert "lost rank 0" in server.output, server.output[-3000:]
    finally:
        server.stop()


def test_serve_called_from_python_cannot_start_its_own_followers(served_pair, capsys):
    """Its followers rerun the process's command line, which here is pytest's: it must refuse, not wait for ranks
    that never come."""
    from speculor.cli import main

    assert main(["serve", "--target", served_pair["target"], "--tensor-parallel", "2", "--port", "0"]) == 2
    assert "torchrun --nproc-per-node 2 -m speculor serve" in capsys.readouterr().err
