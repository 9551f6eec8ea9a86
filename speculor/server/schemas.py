"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

The models check shapes and declared ranges (a missing field, a string where a number belongs, a negative
temperature); `parse_body` turns any failure into a 400 naming the field. Parsing is strict, so `"0.5"` is not a
number, and a JSON `null` counts as leaving the field out (the OpenAI SDKs send null when a caller passes None).

Every number is bounded here, before anything reaches the engine that every running request shares: a `top_k`
past 64 bits, NaN or Infinity anywhere in the body (refused by the JSON reader itself), or a hundred long stop strings
must cost the sender a 400, never the batch a failed or slowed step. The bounds: `temperature` in [0, 100] (past
about 2 the distribution is near uniform already), `top_k` up to 2^31 − 1 (−1 and 0 turn it off), `seed` any signed
or unsigned 64-bit integer, `logprobs`/`top_logprobs` up to 20 (vLLM's default cap; OpenAI allows 5 for completions
and 20 for chat), at most 16 stop strings of at most 256 characters each (OpenAI allows 4; vLLM has no cap).

The sampling options beyond those (`presence_penalty`, `frequency_penalty`, `repetition_penalty`, `min_p`,
`logit_bias`, `min_tokens`, `stop_token_ids`, `bad_words`, `n`, and `echo` for completions) are bounded as OpenAI
and vLLM bound them: penalties in [-2, 2] (repetition in (0, 100]), biases in [-100, 100] for at most 1,024 tokens,
at most 64 stop token ids and 64 bad words of at most 256 characters, `n` up to 64 choices per prompt.

Every field the server cannot honour is refused by `refused_option`, never silently ignored: a client that asks
for JSON output must not get an answer that quietly lacks it. Only options that cannot change the generated text
(`user`, `metadata`, …), options set to their "off" value (`functions: []`) and the structured-output and tool
options, which `speculor.server.structured` reads and checks, pass.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError, from_json

from speculor.server.errors import APIError, echo, validation_error
from speculor.server.structured import STRUCTURED_OPTIONS

# Options that describe the caller or the bookkeeping, not the text to generate: accepted and not acted on.
HARMLESS_OPTIONS = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"}
)

# Options this server does not implement, with the one value that leaves the answer as if the option were absent.
# Any other value is refused with a 400 naming the option.
NEUTRAL_VALUES: dict[str, Any] = {
    "best_of": 1,
    "echo": False,
    "suffix": "",
    "functions": [],
    "function_call": "none",
}


def _reasoned_refusal(name: str, value: Any, options: dict[str, Any]) -> APIError | None:
    """A refusal that says why, for OpenAI's legacy `functions` and `function_call` (`tools` with a forced
    `tool_choice` are served: `speculor.server.structured`). None for other options."""
    if name == "functions" and value:
        name, value = "function_call", options.get("function_call", "auto")
    if name == "function_call" and value != "none":
        message = (
            f"function_call {echo(str(value))}: the legacy function calls are not served; send tools with "
            "tool_choice 'required' or a named function"
        )
        return APIError(400, message, param=name, code="unsupported_parameter")
    return None


# The most alternatives per token a request may ask for (OpenAI's limit for chat's `top_logprobs`).
MAX_LOGPROBS = 20

# The signed and unsigned 64-bit ranges together: what a torch generator accepts as a seed.
SEED_RANGE = {"ge": -(2**63), "le": 2**64 - 1}

# Sampling bounds (see the module's docstring for why these values).
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 100.0
MAX_BIAS = 100.0
MAX_BIASED_TOKENS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64
MAX_CHOICES = 64


Body = TypeVar("Body", bound="SamplingRequest")


def _is_neutral(value: Any, neutral: Any) -> bool:
    """Equal to the neutral value, without Python's `0 == False`: `logprobs: 0` is a request, `false` is not."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


class StreamOptions(BaseModel):
    """`include_usage` is OpenAI's final usage chunk; `continuous_usage_stats` is vLLM's extension putting the usage
    so far on every chunk, which tells a client how many tokens each chunk carried (benchmarks/serve.py uses it)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. `top_k` (0, or vLLM's -1, turns it off) and `ignore_eos`
    (generate exactly the tokens asked for, as vLLM's extension does; for benchmarks) are extensions: OpenAI has
    neither."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None
    seed: Annotated[int, Field(**SEED_RANGE)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    ignore_eos: bool = False
    presence_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=MAX_REPETITION_PENALTY)] = 1.0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    logit_bias: Annotated[
        dict[str, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]], Field(max_length=MAX_BIASED_TOKENS)
    ] = {}
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] = []
    bad_words: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]], Field(max_length=MAX_BAD_WORDS)
    ] = []

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """Each stop string is matched against every generated character, so their number and length are capped."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise PydanticCustomError(
                "stop_limits",
                "at most {count} stop strings of at most {length} characters each are accepted",
                {"count": MAX_STOP_STRINGS, "length": MAX_STOP_LENGTH},
            )
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, bias: dict[str, float]) -> dict[str, float]:
        """OpenAI's keys are token ids written as strings (JSON keys are strings); their range is checked against
        the vocabulary later."""
        if not all(key.isascii() and key.isdigit() for key in bias):
            raise PydanticCustomError("logit_bias_keys", "keys must be token ids (non-negative integers as strings)")
        return bias

    def token_bias(self) -> dict[int, float]:
        return {int(key): value for key, value in self.logit_bias.items()}

    def top_k_within(self, vocab_size: int) -> int | None:
        """The top-k filter to apply, None when it is off: 0 and -1 turn it off, and so does a k that keeps the whole
        vocabulary anyway."""
        return None if self.top_k is None or self.top_k <= 0 or self.top_k >= vocab_size else self.top_k

    @property
    def logprob_alternatives(self) -> int | None:
        """How many alternatives per token to report with each token's log-probability; None: no log-probabilities."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def refused_option(self) -> APIError | None:
        """The error for the first option this server would have to ignore to answer, or None."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in HARMLESS_OPTIONS or name in STRUCTURED_OPTIONS:
                continue
            reasoned = _reasoned_refusal(name, value, extra)
            if reasoned is not None:
                return reasoned
            if name not in NEUTRAL_VALUES:
                message = f"unrecognized parameter {echo(name)}: this server does not implement it"
                return APIError(400, message, param=name, code="unknown_parameter")
            neutral = NEUTRAL_VALUES[name]
            if not _is_neutral(value, neutral):
                message = f"{name!r} is not supported by this server; only {neutral!r} (no effect) is accepted"
                return APIError(400, message, param=name, code="unsupported_parameter")
        return None


Prompt = str | list[int]


class CompletionRequest(SamplingRequest):
    """`prompt` is text, token ids, or a list of either (several prompts: `n` choices each, in order). `logprobs: N`
    reports each token's log-probability and its N most likely alternatives. `echo` puts the prompt's text before
    each choice's completion."""

    prompt: Any
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False

    def refused_option(self) -> APIError | None:
        if self.echo and self.logprobs is not None:
            message = "echo with logprobs is not supported: the prompt's log-probabilities are not computed"
            return APIError(400, message, param="echo", code="unsupported_parameter")
        return super().refused_option()

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        if isinstance(prompt, str) or _is_token_ids(prompt):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
            return prompt
        raise PydanticCustomError(
            "prompt_shape",
            "must be a string, a list of token ids (integers), or a non-empty list of strings or of token-id lists",
        )

    @property
    def prompts(self) -> list[Prompt]:
        """The prompts of this request: one for a string or a list of ids, several for a list of those."""
        if isinstance(self.prompt, str) or _is_token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)


def _is_token_ids(value: Any) -> bool:
    """A list of integers (booleans are not token ids). Their range is checked against the vocabulary later, where
    the error can name it. An empty list counts, to be refused as an empty prompt."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    name: str
    arguments: str


class EarlierToolCall(BaseModel):
    """A call an earlier assistant turn made, as OpenAI clients send it back in the conversation."""

    model_config = ConfigDict(strict=True, extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[EarlierToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string: text parts are joined, a missing content is empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates read it: role and text, and an agent loop's history — an assistant turn's
        `tool_calls` (arguments as a mapping, as Hugging Face templates expect them) and a tool result's
        `tool_call_id` and `name` — so that the model sees the calls it made and their answers. Arguments that are
        not a JSON object are a 400 naming them."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for number, called in enumerate(self.tool_calls):
                try:
                    arguments = json.loads(called.function.arguments)
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    where = f"messages[{index}].tool_calls[{number}].function.arguments"
                    raise APIError(400, f"{where} must be a JSON object in a string", param=where)
                call = {"type": "function", "function": {"name": called.function.name, "arguments": arguments}}
                calls.append({"id": called.id, **call} if called.id is not None else call)
            message["tool_calls"] = calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    """`max_completion_tokens` is OpenAI's newer name for `max_tokens`; when both are given it wins. `logprobs: true`
    reports each token's log-probability, `top_logprobs` that many alternatives too."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def refused_option(self) -> APIError | None:
        if self.top_logprobs is not None and not self.logprobs:
            message = "top_logprobs needs logprobs: true (it says how many alternatives to show per token)"
            return APIError(400, message, param="top_logprobs", code="invalid_value")
        return super().refused_option()


def parse_body(schema: type[Body], raw: bytes) -> Body:
    """The request body as `schema`, or a 400 `APIError` naming what is wrong: unparseable JSON, an empty body (it
    names the first required field), a field of the wrong type or out of range, or an option this server refuses. The
    body is first read as plain JSON without NaN and Infinity, which the model's own reader would let into fields it
    does not type (`metadata`, `presence_penalty`)."""
    if not raw.strip():
        required = [name for name, field in schema.model_fields.items() if field.is_required()]
        raise APIError(
            400,
            f"the request body is empty: send a JSON object with {' and '.join(map(repr, required))}",
            param=required[0],
            code="missing_required_parameter",
        )
    try:
        from_json(raw, allow_inf_nan=False)
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as error:
        raise validation_error(error.errors()) from error
    refused = body.refused_option()
    if refused is not None:
        raise refused
    return body
