"""The HTTP front: OpenAI-compatible routes, auth, request checks and limits.

It holds a tokenizer but no model: it turns a request into prompt token ids, checks every
limit (so bad input is a 4xx that says what to fix, never a 5xx from deep inside generate),
and hands the request to an engine replica chosen by Serve for the adapter
(`multiplexed_model_id`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from jobs import conversations
from jobs.config import RunConfig
from jobs.model import model_config
from jobs.prompting import Prompting
from serve import adapters, protocol
from serve import metrics as gateway_metrics
from serve.adapters import AdapterLoadError
from serve.contract import EngineReplica
from serve.drain import DrainWatch
from serve.generation import EngineDead, GenRequest, Rejected

log = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 2 * 1024**2
VERSION_HEADER = "X-Lorafleet-Adapter-Version"  # the adapter version that answered
ROUTES = "/v1/completions, /v1/chat/completions, /v1/models, /metrics, /healthz"
FALLBACK_CONTEXT = 2048  # models that state no context size (T5's relative positions)

api = FastAPI(title="lorafleet", description="OpenAI-compatible completions over a base model and its LoRA adapters.")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, kind, param, code)


def _error_response(body: dict, status: int) -> Response:
    # ASCII-escaped JSON: an echoed path or value with a lone surrogate must not break the encoder
    return Response(json.dumps(body), status_code=status, media_type="application/json")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    gateway_metrics.count_refused(exc.status)
    return _error_response(exc.body, exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    hint = {
        404: f"no route {request.url.path}; routes: {ROUTES}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    gateway_metrics.count_refused(exc.status_code)
    return _error_response(protocol.error_body(hint, "invalid_request_error"), exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    gateway_metrics.count_refused(400)
    return _error_response(protocol.error_body(_describe(exc.errors())), 400)


def _describe(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Answering:
    """Who answers a request: the model as metrics name it, its version ("": none), the engines' key ("": the
    base). Clients see the key as `system_fingerprint` and the version in a header."""

    model: str
    version: str
    key: str

    @classmethod
    def of(cls, ref: adapters.Ref | None, base_name: str) -> Answering:
        if ref is None:
            return cls(base_name, "", "")
        return cls(ref.name, "" if ref.version is None else str(ref.version), ref.key)

    @property
    def fingerprint(self) -> str:
        return self.key or self.model

    def headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.version} if self.version else {}


def base_model_name(run: RunConfig) -> str:
    return run.serve.model_name or run.model.name.rstrip("/").split("/")[-1]


def context_length(run: RunConfig, tokenizer) -> int:
    hf = model_config(run.model)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(hf, attr, None), int):
            return getattr(hf, attr)
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else FALLBACK_CONTEXT


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(
        self, engine: DeploymentHandle[EngineReplica], run: dict, engine_name: str, api_key: str | None = None
    ):
        run = RunConfig.model_validate(run)
        self.engine, self.cfg = engine, run.serve
        self.versions = adapters.CurrentVersions(run.serve)
        self.metrics = gateway_metrics.start(engine_name)
        self.prompting = Prompting.load(run.model)
        self.context = context_length(run, self.prompting.tokenizer)
        self.base_name = base_model_name(run)
        self.system_prompt = run.data.system_prompt
        self.api_key = api_key or os.environ.get(run.serve.api_key_env) or None
        self.slots = asyncio.Semaphore(run.serve.max_concurrent_requests)
        self.accepted = 0  # requests past _enter and not yet left: what a drain waits for
        self.drain = DrainWatch(run.serve.name, lambda: self.accepted)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        self._refuse_when_draining()  # load balancers take a stopping server out of rotation
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._authorize(request)
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        base = {"id": self.base_name, "object": "model", "created": 0, "owned_by": "lorafleet", "root": self.base_name}
        served = [
            {**base, "id": ref.name, "version": ref.version, "parent": self.base_name}
            for ref in self.versions.listing()
        ]
        return {"object": "list", "data": [base, *served]}

    @api.post("/v1/completions")
    async def completions(self, request: Request, response: Response):
        self._authorize(request)
        body = await self._parse(request, protocol.CompletionRequest)
        prompt_ids = self.prompting.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await self._answer(body, prompt_ids, False, response)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request, response: Response):
        self._authorize(request)
        body = await self._parse(request, protocol.ChatRequest)
        return await self._answer(body, self._chat_prompt(body), True, response)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def _parse(self, request: Request, model):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(
                400, f'the body is not valid JSON ({exc}); send a JSON object such as {{"model": ..., ...}}'
            ) from None
        except RecursionError:  # e.g. 10,000 nested brackets
            raise ApiError(400, "the body's JSON is nested too deeply; send a flat request object") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the body is a JSON {type(data).__name__}; send a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise ApiError(400, _describe(exc.errors()), param=first or None) from None

    def _chat_prompt(self, body: protocol.ChatRequest) -> list[int]:
        messages = [m.as_template_input() for m in body.messages]
        if not self.prompting.use_chat:
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise ApiError(
                    400,
                    "this model has no chat template: send exactly one user message, or use /v1/completions",
                    param="messages",
                )
            return self.prompting.tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
        try:  # the same system prompt rule and tokenization as the training examples (jobs.conversations)
            return conversations.prompt_ids(
                self.prompting.tokenizer, conversations.with_system(messages, self.system_prompt)
            )
        except Exception as exc:  # templates may refuse role orders (e.g. two system messages)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None

    def _adapter(self, model: str) -> adapters.Ref | None:
        if model == self.base_name:
            return None
        try:
            return self.versions.ref(model)
        except adapters.UnknownAdapter as exc:
            raise ApiError(
                404, f"{exc}; base model: {self.base_name!r}", param="model", code="model_not_found"
            ) from None

    def _limits(self, body: protocol.Sampling, prompt_tokens: int) -> int:
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_tokens = self.cfg.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens = {max_tokens}: ask for 1 to {self.cfg.max_tokens_limit} tokens (this server's limit)",
                param="max_tokens",
            )
        room = self.context - (max_tokens if self.prompting.kind == "causal" else 0)
        if prompt_tokens > room:
            need = f"the prompt has {prompt_tokens} tokens" + (
                f" and max_tokens is {max_tokens}" if self.prompting.kind == "causal" else ""
            )
            raise ApiError(
                400,
                f"{need}, more than the model's context of {self.context} tokens; shorten the prompt or lower "
                "max_tokens",
                param="messages" if isinstance(body, protocol.ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        return max_tokens

    def _gen_request(self, body: protocol.Sampling, prompt_ids: list[int], by: Answering) -> dict:
        if not prompt_ids:
            raise ApiError(400, "the prompt encodes to no tokens; send some text", param="prompt")
        request = GenRequest(
            prompt_ids=prompt_ids,
            max_tokens=self._limits(body, len(prompt_ids)),
            adapter=by.key or None,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop or [],
            seed=body.seed,
            n=body.n,
            logprobs=body.top_logprobs_wanted(),
            response_format=body.structured(),
        )
        return asdict(request)

    async def _answer(self, body: protocol.Sampling, prompt_ids: list[int], chat: bool, response: Response):
        arrived = time.perf_counter()
        by = Answering.of(self._adapter(body.model), self.base_name)
        gen = self._gen_request(body, prompt_ids, by)
        await self._enter()
        try:
            if body.stream:
                stream, first = await self._engine_call(
                    lambda: self._open_stream(gen, by.key)
                )  # adapter errors still become a 4xx here
                return StreamingResponse(
                    self._events(stream, first, body, len(prompt_ids), chat, arrived, by),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", **by.headers()},
                )
            result = await self._engine_call(
                lambda: self.engine.options(multiplexed_model_id=by.key).complete.remote(gen)
            )
        except BaseException:
            self._leave()
            self.metrics.failed(by.model, by.version)
            raise
        self._leave()
        total = time.perf_counter() - arrived
        tokens = sum(c["completion_tokens"] for c in result["choices"])
        first_token_s = total - result["engine_s"] + result["first_token_s"]  # the gateway's part + the engine's
        self.metrics.answered(by.model, by.version, len(prompt_ids), tokens, first_token_s, total)
        response.headers.update(by.headers())
        answer = protocol.completion(body.model, result["choices"], len(prompt_ids), chat, by.fingerprint)
        if body.return_token_ids:  # vLLM's extension: the ids the engine was given, to compare with training
            answer["prompt_token_ids"] = prompt_ids
        return answer

    async def _open_stream(self, gen: dict, key: str):
        stream = self.engine.options(stream=True, multiplexed_model_id=key).stream.remote(gen)
        return stream, await stream.__anext__()

    async def _engine_call(self, call):
        """`call()` is sent again when the replica serving it dies first (nothing reached the client yet);
        Serve routes the retry to a live replica, or holds it until a replacement is up."""
        try:
            for retry in range(self.cfg.replica_loss_retries + 1):
                try:
                    return await call()
                except (RayActorError, ActorUnavailableError) as exc:
                    if retry == self.cfg.replica_loss_retries:
                        raise ApiError(
                            503,
                            f"the model replica serving this request was lost ({type(exc).__name__}); retry it",
                            "server_error",
                            code="replica_lost",
                        ) from None
                    log.warning(
                        "model replica lost (%s); sending the request again (%d of %d)",
                        type(exc).__name__,
                        retry + 1,
                        self.cfg.replica_loss_retries,
                    )
        except adapters.UnknownAdapter as exc:  # removed from the registry since the check
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        except AdapterLoadError as exc:
            raise ApiError(400, str(exc), param="model", code="model_not_loadable") from None
        except Rejected as exc:
            raise ApiError(400, str(exc)) from None
        except EngineDead as exc:  # its replica fails the health check and Serve replaces it
            raise ApiError(503, f"{exc}; retry it", "server_error", code="engine_dead") from None

    async def _events(
        self, stream, first, body: protocol.Sampling, prompt_tokens: int, chat: bool, arrived: float, by: Answering
    ):
        stream_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        with_usage = body.include_usage()
        opened: set[int] = set()
        tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        first_token_s = time.perf_counter() - arrived
        try:
            delta = first
            while True:
                offset = offsets.get(delta.index, 0)
                yield protocol.chunk(
                    stream_id,
                    body.model,
                    delta,
                    chat,
                    delta.index not in opened,
                    with_usage,
                    text_offset=offset,
                    fingerprint=by.fingerprint,
                )
                opened.add(delta.index)
                offsets[delta.index] = offset + sum(len(e["token"]) for e in delta.logprobs or [])
                tokens[delta.index] = delta.completion_tokens or tokens.get(delta.index, 0)
                try:
                    delta = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if with_usage:
                yield protocol.usage_chunk(
                    stream_id, body.model, chat, prompt_tokens, sum(tokens.values()), by.fingerprint
                )
            yield protocol.DONE
            total = time.perf_counter() - arrived
            self.metrics.answered(by.model, by.version, prompt_tokens, sum(tokens.values()), first_token_s, total)
        except Exception as exc:  # the status line is sent already: report in-band, as OpenAI does
            self.metrics.failed(by.model, by.version)
            yield protocol.error_event(f"generation failed: {type(exc).__name__}")
        finally:
            self._leave()

    def _refuse_when_draining(self) -> None:
        if self.drain.draining:
            raise ApiError(
                503,
                "this server is shutting down and takes no new requests; retry, another replica will answer",
                "server_error",
                code="shutting_down",
            )

    async def _enter(self) -> None:
        self._refuse_when_draining()
        if self.cfg.overload == "reject" and self.slots.locked():
            raise ApiError(
                429,
                f"{self.cfg.max_concurrent_requests} requests are in flight on this replica "
                "(serve.max_concurrent_requests); retry shortly",
                "rate_limit_error",
                code="too_many_requests",
            )
        self.metrics.waiting.inc()
        self.accepted += 1
        try:
            await self.slots.acquire()
        except BaseException:
            self.accepted -= 1
            raise
        finally:
            self.metrics.waiting.dec()
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self.accepted -= 1
        self.metrics.in_flight.dec()
        self.slots.release()
