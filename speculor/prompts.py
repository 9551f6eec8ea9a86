"""Prompt sets for benchmarks: the shipped HumanEval, Spec-Bench and MT-Bench copies, or a user's JSONL file.

Stable API:
- `load_prompts(name_or_path, *, limit=None) -> list[str]`: the prompt texts, unrendered.
- `load_prompt_set(name_or_path, *, limit=None) -> list[Prompt]`: the same prompts with id, category and whether
  they are chat messages.
- `render_prompt(prompt, tokenizer) -> str`: the text to feed a model (chat template for chat prompts).

HumanEval prompts are code to complete and are used as they are. Spec-Bench and MT-Bench records are
conversations (`turns`); only the first user turn is used, because later turns refer to an answer the model has
not written. A JSONL file may hold either shape per line: a `prompt` string, or a `turns` list.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from itertools import chain, islice, zip_longest
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from speculor.errors import SpeculorError

# Shipped sets: name -> file inside the package's `data` directory.
SHIPPED_SETS = {
    "humaneval": "humaneval/HumanEval.jsonl.gz",
    "spec-bench": "spec_bench/question.jsonl.gz",
    "mt-bench": "mt_bench/question.jsonl.gz",
}


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt. `chat` is True for a user message that should go through a chat template."""

    id: str
    text: str
    category: str | None = None
    chat: bool = False


def load_prompts(name_or_path: str | os.PathLike, *, limit: int | None = None) -> list[str]:
    """The prompt texts of a shipped set ("humaneval", "spec-bench", "mt-bench") or a JSONL file (see
    `load_prompt_set` for `limit`). Chat prompts come back as the raw user message; see `render_prompt`."""
    return [prompt.text for prompt in load_prompt_set(name_or_path, limit=limit)]


def load_prompt_set(name_or_path: str | os.PathLike, *, limit: int | None = None) -> list[Prompt]:
    """Prompts of a shipped set or a `.jsonl` / `.jsonl.gz` file, in file order.

    `limit` keeps that many, taken round-robin over categories (first of each category, then second, …) so that a
    small sample of Spec-Bench still covers every task; for a set without categories that is simply the first N.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise SpeculorError(f"the prompt limit must be an integer ≥ 1, got {limit!r}")
    prompts = list(_parse_records(*_open_prompt_source(name_or_path)))
    if not prompts:
        raise SpeculorError(f"prompt set {os.fspath(name_or_path)!r} holds no prompts")
    return prompts if limit is None else _spread_over_categories(prompts, limit)


def render_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The text to tokenize: chat prompts go through the tokenizer's chat template (with the assistant turn
    opened) when it has one; everything else is returned unchanged.

    A template that writes the BOS token itself would get a second one from `encode(add_special_tokens=True)`, so
    a leading BOS is dropped when the tokenizer adds one on its own.
    """
    if not prompt.chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return prompt.text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
    )
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos) and _adds_bos(tokenizer):
        rendered = rendered[len(bos) :]
    return rendered


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _open_prompt_source(name_or_path: str | os.PathLike) -> tuple[str, list[str]]:
    """(display name, lines) of a shipped set or a file."""
    text_name = os.fspath(name_or_path)
    key = text_name.lower().replace("_", "-")
    if key in SHIPPED_SETS:
        resource = resources.files("speculor").joinpath("data", *SHIPPED_SETS[key].split("/"))
        return key, gzip.decompress(resource.read_bytes()).decode("utf-8").splitlines()
    path = Path(text_name).expanduser()
    if not path.is_file():
        raise SpeculorError(
            f"unknown prompt set {text_name!r}: choose one of {', '.join(SHIPPED_SETS)} or give a .jsonl file"
        )
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return text_name, data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise SpeculorError(f"prompt file {text_name!r} is not UTF-8 text: {error}") from error


def _parse_records(source: str, lines: list[str]) -> Iterator[Prompt]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpeculorError(f"{source}, line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise SpeculorError(f"{source}, line {number}: expected a JSON object")
        yield _prompt_from_record(record, source, number)


def _prompt_from_record(record: dict, source: str, number: int) -> Prompt:
    identifier = next((record[key] for key in ("id", "task_id", "question_id") if key in record), number)
    category = record.get("category")
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return Prompt(str(identifier), record["prompt"], category, chat=False)
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0]:
        return Prompt(str(identifier), turns[0], category, chat=True)
    raise SpeculorError(f"{source}, line {number}: needs a non-empty 'prompt' string or a 'turns' list of strings")


def _spread_over_categories(prompts: list[Prompt], limit: int) -> list[Prompt]:
    by_category: dict[str | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_category.setdefault(prompt.category, []).append(index)
    round_robin = (i for i in chain.from_iterable(zip_longest(*by_category.values())) if i is not None)
    chosen = sorted(islice(round_robin, limit))
    return [prompts[index] for index in chosen]
