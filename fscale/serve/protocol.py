"""Request and response bodies of the OpenAI-compatible API subset that fscale serves.

Requests are pydantic models: unknown fields are ignored (clients send many), known
but unsupported ones are accepted only at their no-op value and refused otherwise
(``n=2``, ``echo=true``...), so a client never silently gets less than it asked for.

Usage::

    from fscale.serve.protocol import CompletionRequest
    req = CompletionRequest.model_validate({"prompt": "def f(", "max_tokens": 8})
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenIds = list[int]


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    """Fields shared by both endpoints; sampling extensions (top_k...) follow vLLM's names."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension; -1 also means "off"
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """``(param, why)`` for each field set to a value this server cannot honour."""
        bad = []
        if self.n != 1:
            bad.append(("n", f"n={self.n}: only n=1 is supported; send the request n times"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                bad.append((name, f"{name} is not supported; leave it at 0"))
        if self.logit_bias:
            bad.append(("logit_bias", "logit_bias is not supported; leave it out"))
        return bad

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt (text or token ids) or a list of them."""

    prompt: str | TokenIds | list[str | TokenIds]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | TokenIds]:
        """The prompts as a list: a bare string or one list of ids is one prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)

    def unsupported(self) -> list[tuple[str, str]]:
        bad = super().unsupported()
        if self.echo:
            bad.append(("echo", "echo=true is not supported; prepend the prompt yourself"))
        if self.logprobs is not None:
            bad.append(("logprobs", "logprobs are not supported; leave logprobs out"))
        if self.best_of not in (None, 1):
            bad.append(("best_of", f"best_of={self.best_of}: only 1 is supported"))
        if self.suffix:
            bad.append(("suffix", "suffix is not supported; leave it out"))
        return bad


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages rendered by the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False
    tools: list[Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        bad = super().unsupported()
        if self.logprobs:
            bad.append(("logprobs", "logprobs are not supported; leave logprobs out"))
        if self.tools:
            bad.append(("tools", "tool calls are not supported; leave tools out"))
        return bad


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fscale"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
