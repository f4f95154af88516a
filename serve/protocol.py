"""The OpenAI-compatible wire format: request bodies, responses, stream chunks and errors.

Request models describe what the API accepts (FastAPI turns them into the OpenAPI schema);
fields OpenAI defines but this server does not implement are refused with a 400 that says so,
instead of being silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # as OpenAI


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "contains an unpaired UTF-16 surrogate (e.g. \\ud800), which is not text; send valid Unicode"
        ) from None
    return text


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the official client sends fields of its own

    model: str = Field(min_length=1, max_length=256, description="Adapter name, or the base model's name.")
    max_tokens: int | None = Field(None, description="Tokens to generate at most (bounded by the server's limit).")
    max_completion_tokens: int | None = Field(None, description="Newer name for max_tokens (chat).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or below 0.001) is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings that end the generation (cut from the output)."
    )
    stream: bool = Field(False, description="Answer as server-sent events.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is generated.")
    seed: int | None = Field(None, description="Seed for sampling; the same seed repeats a sampled answer.")
    user: str | None = Field(
        None, max_length=256, description="End-user id (logged by nobody, accepted for compatibility)."
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings (got {len(stops)})")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("each stop string needs 1-64 characters")
        return [_utf8(s) for s in stops]


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(description="The text to continue (one prompt per request).")
    echo: bool = Field(False, description="Not supported: must be false.")
    best_of: int = Field(1, ge=1, le=1, description="Not supported: must be 1.")
    logprobs: int | None = Field(None, le=0, description="Not supported: must be null.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"send one prompt per request (got a list of {len(value)})")
            value = value[0]
        if not value.strip():
            raise ValueError("the prompt is empty; send the text to continue")
        return _utf8(value)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, list):  # the content-parts form: text parts only
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
                raise ValueError("only text content parts ({type: text, text: ...}) are supported")
            value = "".join(part["text"] for part in value)
        return _utf8(value)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256, description="The conversation so far.")
    logprobs: bool = Field(False, description="Not supported: must be false.")

    @field_validator("messages")
    @classmethod
    def _has_content(cls, value):
        if not any(m.content.strip() for m in value):
            raise ValueError("every message is empty; send at least one message with text")
        return value


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, chat: bool) -> dict:
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind, prefix = "text_completion", "cmpl"
    return {
        "id": new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(stream_id: str, model: str, text: str, finish: str | None, chat: bool, first: bool = False) -> str:
    """One server-sent event of a streamed answer."""
    body = {"id": stream_id, "created": int(time.time()), "model": model}
    if chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        body.update(
            object="chat.completion.chunk",
            choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        )
    else:
        body.update(
            object="text_completion", choices=[{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
        )
    return f"data: {json.dumps(body)}\n\n"


def error_event(message: str) -> str:
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"


DONE = "data: [DONE]\n\n"
