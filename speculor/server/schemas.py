"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

The models check shapes and declared ranges (a missing field, a string where a number belongs, a negative
temperature): failures become 422 responses naming the field. Checks that need the model (the prompt's length
against the context, the chat template) happen later and become 400s. Parsing is strict, so `"0.5"` is not a number.
Unknown fields are kept, not rejected, so clients that send newer OpenAI options still work; the few that would
silently change the meaning of the answer are refused by `unsupported_options`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI options this server does not implement, with the values that mean "not used". Any other value is refused
# rather than ignored, because the client would otherwise get an answer that silently differs from what it asked.
UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
}

TokenIds = list[Annotated[int, Field(ge=0)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. `top_k` and `ignore_eos` (generate exactly the tokens
    asked for, as vLLM's extension does; for benchmarks) are extensions: OpenAI has neither."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    ignore_eos: bool = False

    def unsupported_options(self) -> list[str]:
        """Names of unimplemented OpenAI options the request sets to something other than their neutral value."""
        extra = self.model_extra or {}
        return [name for name, neutral in UNSUPPORTED_OPTIONS.items() if name in extra and extra[name] not in neutral]


class CompletionRequest(SamplingRequest):
    """`prompt` is text or token ids; a list of several prompts (a batch) is refused, as n > 1 is."""

    prompt: str | TokenIds | list[str] | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string: text parts are joined, a missing content is empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """`max_completion_tokens` is OpenAI's newer name for `max_tokens`; when both are given it wins."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
