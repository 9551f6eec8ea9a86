"""Helpers shared by the server tests: tiny model directories with a chat template, a real uvicorn server on a free
local port, and readers for server-sent events and Prometheus metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn
from conftest import build, tiny_llama_config, train_tiny_tokenizer
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaForCausalLM

MODEL = "tiny-pair"
GAMMA = 3
CONTEXT = 256  # max_position_embeddings of tiny_llama_config
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_model_dirs(root: Path) -> dict[str, Path]:
    """A target and a draft whose tokenizer has a chat template, and a target ("plain") whose tokenizer has none."""
    tokenizer = train_tiny_tokenizer()
    target = build(LlamaForCausalLM, tiny_llama_config(vocab_size=len(tokenizer), layers=2), 20, torch.float32)
    draft = build(LlamaForCausalLM, tiny_llama_config(vocab_size=len(tokenizer), layers=1), 21, torch.float32)
    target.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    tokenizer.chat_template = CHAT_TEMPLATE
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"target": root / "target", "draft": root / "draft", "plain": root / "plain"}


@dataclass
class Running:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextmanager
def serving(app) -> Iterator[Running]:
    """Run `app` under uvicorn on a free 127.0.0.1 port in a background thread; stop it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread)
    finally:
        server.should_exit = True
        thread.join(30)


def sse_events(response: httpx.Response) -> list:
    """Parsed `data:` payloads of a server-sent event stream; `[DONE]` stays a string."""
    lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def metric_samples(base_url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)
