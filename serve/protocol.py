"""The OpenAI-compatible wire format: request bodies, responses, stream chunks and errors.

Request models describe what the API accepts (FastAPI turns them into the OpenAPI schema). Unknown
fields are ignored, as the official client sends fields of its own; the few OpenAI fields this server
does not implement (UNSUPPORTED, `echo`, `best_of`) are refused with a 400 unless left at their default: an
answer that silently ignored a penalty, a logit bias or a tool list would not be the answer asked for.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.grammar import check_schema

MAX_STOP = 4  # as OpenAI
MAX_N = 16  # choices per request (OpenAI allows 128; each is a full generation here)
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "tools", "functions", "suffix")


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "contains an unpaired UTF-16 surrogate (e.g. \\ud800), which is not text; send valid Unicode"
        ) from None
    return text


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=64, description="The schema's name (OpenAI requires one).")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema the answer follows.")
    strict: bool | None = Field(None, description="Accepted; answers always follow the schema.")

    @field_validator("schema_")
    @classmethod
    def _compiles(cls, value):
        check_schema(value)
        return value


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name: ..., schema: {...}}")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


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
    n: int = Field(1, ge=1, le=MAX_N, description=f"Choices to generate (1 to {MAX_N}).")
    seed: int | None = Field(None, description="Seed for sampling; the same seed repeats a sampled answer.")
    user: str | None = Field(
        None, max_length=256, description="End-user id (logged by nobody, accepted for compatibility)."
    )
    response_format: ResponseFormat | None = Field(
        None, description="{type: json_object} or {type: json_schema, json_schema: {name, schema}}: the answer is JSON."
    )
    stream_options: StreamOptions | None = Field(None, description="With stream: {include_usage: true} adds usage.")
    return_token_ids: bool = Field(
        False, description="vLLM's extension: add the prompt's token ids to a non-streamed answer."
    )

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        """A field of UNSUPPORTED is accepted only at its default (absent, null, 0 or empty), as some clients send."""
        if isinstance(data, dict):
            given = [name for name in UNSUPPORTED if data.get(name) not in (None, 0, "", [], {})]
            if given:
                raise ValueError(f"{', '.join(given)}: not supported by this server; leave it out")
        return data

    def structured(self) -> dict | None:
        """The response format as the engines take it (None: free text)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        return (
            {"type": "json_object"}
            if fmt.type == "json_object"
            else {"type": "json_schema", "schema": fmt.json_schema.schema_}
        )

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

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
    echo: Literal[False] = Field(False, description="Not supported: must be false.")
    best_of: int = Field(1, ge=1, le=1, description="Not supported: must be 1.")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Log probabilities of the chosen and up to 5 likeliest tokens."
    )

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

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

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=64, description="An assistant's tool calls.")
    tool_call_id: str | None = Field(None, max_length=256, description="The call a tool message answers.")
    name: str | None = Field(None, max_length=256, description="The speaker's or tool's name.")

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        if value is None:
            return value
        if isinstance(value, list):  # the content-parts form: text parts only
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
                raise ValueError("only text content parts ({type: text, text: ...}) are supported")
            value = "".join(part["text"] for part in value)
        return _utf8(value)

    @model_validator(mode="after")
    def _content_or_tool_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant's tool call may go without)")
        return self

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates (and the training examples, jobs.conversations) take it."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}
        extra = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id, "name": self.name}
        return message | {k: v for k, v in extra.items() if v is not None}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256, description="The conversation so far.")
    logprobs: bool = Field(False, description="Return the chosen tokens' log probabilities.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: also the likeliest tokens at each position."
    )

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("messages")
    @classmethod
    def _has_content(cls, value):
        if not any((m.content or "").strip() or m.tool_calls for m in value):
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


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None
    content = [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "bytes": _token_bytes(e["token"]),
            "top_logprobs": [{"token": t, "logprob": p, "bytes": _token_bytes(t)} for t, p in e["top"]],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def text_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    if entries is None:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"]) for e in entries],
        "text_offset": offsets,
    }


def completion(model: str, choices: list[dict], prompt_tokens: int, chat: bool, fingerprint: str | None = None) -> dict:
    """A whole answer; `choices` as the engines' `complete` returns them."""
    if chat:
        out = [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish"],
                "logprobs": chat_logprobs(c["logprobs"]),
            }
            for c in choices
        ]
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        out = [
            {
                "index": c["index"],
                "text": c["text"],
                "finish_reason": c["finish"],
                "logprobs": text_logprobs(c["logprobs"]),
            }
            for c in choices
        ]
        kind, prefix = "text_completion", "cmpl"
    return {
        "id": new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,  # the adapter version that answered: NAME@VERSION
        "choices": out,
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


def chunk(
    stream_id: str,
    model: str,
    delta,
    chat: bool,
    first: bool = False,
    with_usage: bool = False,
    text_offset: int = 0,
    fingerprint: str | None = None,
) -> str:
    """One server-sent event of a streamed answer; `delta` is an engine's Delta."""
    body: dict[str, Any] = {
        "id": stream_id,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
    }
    text, finish, index = delta.text, delta.finish, delta.index
    if chat:
        message = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": message, "finish_reason": finish, "logprobs": chat_logprobs(delta.logprobs)}
        body.update(object="chat.completion.chunk", choices=[choice])
    else:
        choice = {
            "index": index,
            "text": text,
            "finish_reason": finish,
            "logprobs": text_logprobs(delta.logprobs, text_offset),
        }
        body.update(object="text_completion", choices=[choice])
    if with_usage:
        body["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
    return f"data: {json.dumps(body)}\n\n"


def usage_chunk(
    stream_id: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int, fingerprint: str | None = None
) -> str:
    """The extra last event of stream_options.include_usage: no choices, the request's usage."""
    body = {
        "id": stream_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    return f"data: {json.dumps(body)}\n\n"


def error_event(message: str) -> str:
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"


DONE = "data: [DONE]\n\n"
