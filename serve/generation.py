"""Token-by-token text for requests, each with its own limits, and the static path's `generate` arguments.

`RowText` decodes one choice's tokens as they come, cuts the text at the request's stop strings,
finishes it at its own max_tokens or end-of-sequence, and holds back text that could still turn
into a stop string or that ends in an incomplete UTF-8 character. The step loop
(`serve.scheduler`) drives one per row; on the static path (`generate` for a whole batch),
`Progress`, a stopping criterion, drives one per row of the batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from jobs.prompting import Prompting

GREEDY_BELOW = 1e-3  # temperatures under this decode greedily


class Rejected(ValueError):
    """The engine refused a request the gateway let through (a 400 with the engine's reason)."""


class EngineDead(RuntimeError):
    """The replica's engine can generate no more (a 503; the replica fails its health check and is replaced)."""


@dataclass(kw_only=True)  # by name only: several fields share a type, so a wrong position would pass unnoticed
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1  # choices to generate
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one generate call (sampling settings and grammar are per call)."""
        grammar = json.dumps(self.response_format, sort_keys=True) if self.response_format else None
        return (self.temperature, self.top_p, self.seed, grammar)

    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class Delta:
    text: str
    finish: str | None = None  # "stop" or "length" on the row's last delta
    completion_tokens: int = 0
    index: int = 0  # which of the request's n choices
    logprobs: list[dict] | None = None  # per new token: {"token", "logprob", "top": [[token, logprob], ...]}


def logprob_entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    return {"token": token, "logprob": logprob, "top": [[t, p] for t, p in top]}


class LogprobCapture(LogitsProcessor):
    """Keeps the log-distribution each step samples from; the last processor, so it sees what
    temperature, top-k and top-p made of the logits (for greedy decoding: the model's own)."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that are not certain yet."""
    if text.endswith("\ufffd"):  # a multi-byte character still being generated
        return 1
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class RowText:
    """One choice's text as its tokens come: end-of-sequence, stop strings and max_tokens end it, text that is
    not certain yet is held back, and logprobs wait to go out with the next delta."""

    def __init__(self, request: GenRequest, tokenizer, eos_ids: set[int]):
        self.request, self.tokenizer, self.eos_ids = request, tokenizer, eos_ids
        self.tokens: list[int] = []
        self.sent = 0
        self.finished: str | None = None  # "stop" or "length" once ended
        self.pending: list[dict] = []  # logprobs not yet sent with a delta

    def advance(self, token: int, logprob: dict | None = None) -> Delta | None:
        if logprob is not None:
            self.pending.append(logprob)
        if token in self.eos_ids:
            return self.finish("stop")
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = [text.find(s) for s in self.request.stop if s in text]
        if cut:
            return self.finish("stop", text[: min(cut)])
        if len(self.tokens) >= self.request.max_tokens:
            return self.finish("length", text)
        certain = len(text) - _held_back(text, self.request.stop)
        if certain <= self.sent:
            return None
        delta, self.sent = text[self.sent : certain], certain
        return Delta(delta, None, len(self.tokens), logprobs=self._taken())

    def finish(self, reason: str, text: str | None = None) -> Delta:
        if text is None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            text = text[: len(text) - (1 if text.endswith("\ufffd") else 0)]
        self.finished = reason
        return Delta(text[self.sent :], reason, len(self.tokens), logprobs=self._taken())

    def _taken(self) -> list[dict] | None:
        if self.request.logprobs is None:
            return None
        taken, self.pending = self.pending, []
        return taken


def logprob_of(dist: torch.Tensor, token: int, k: int, tokenizer) -> dict:
    """The logprob entry of `token` drawn from the log-distribution `dist` [vocab], with the k most likely."""

    def piece(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    top = torch.topk(dist, k) if k else None
    pairs = [] if top is None else [(piece(i), float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
    return logprob_entry(piece(token), float(dist[token]), pairs)


class Progress(StoppingCriteria):
    """Per-row text of one `generate` call (the static path), called by generate after every new token."""

    def __init__(
        self,
        requests: list[GenRequest],
        tokenizer,
        eos_ids: set[int],
        emit: Callable[[list[Delta | None]], None],
        capture: LogprobCapture | None = None,
    ):
        self.rows = [RowText(r, tokenizer, eos_ids) for r in requests]
        self.tokenizer, self.emit, self.capture = tokenizer, emit, capture

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        self.emit([self._advance(i, token) if self.rows[i].finished is None else None for i, token in enumerate(new)])
        return torch.tensor([row.finished is not None for row in self.rows], device=input_ids.device)

    def _advance(self, i: int, token: int) -> Delta | None:
        k = self.rows[i].request.logprobs
        have = k is not None and self.capture is not None and self.capture.last is not None
        return self.rows[i].advance(token, logprob_of(self.capture.last[i], token, k, self.tokenizer) if have else None)

    def close(self) -> list[Delta | None]:
        """Finish rows generate stopped without us (its own length limit)."""
        return [None if row.finished else row.finish("length") for row in self.rows]


def generate_kwargs(
    requests: list[GenRequest],
    prompting: Prompting,
    device,
    progress: Progress,
    grammar: LogitsProcessor | None = None,
) -> dict:
    """Arguments of one `model.generate` call for requests sharing a sampling key."""
    inputs = prompting.pad_for_generation([r.prompt_ids for r in requests]).to(device)
    first = requests[0]
    processors: list[LogitsProcessor] = []
    # A tiny temperature (say 1e-308) overflows logits / temperature to inf; its limit is greedy decoding anyway.
    if first.greedy():
        sampling: dict = {"do_sample": False}
        processors += [grammar] if grammar else []
    elif grammar is None:
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
    else:  # the grammar masks first: top-k/top-p must choose among the tokens it allows, or nothing is left
        sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        processors += [grammar, TemperatureLogitsWarper(first.temperature)]
        processors += [TopPLogitsWarper(first.top_p)] if first.top_p < 1.0 else []
    processors += [progress.capture] if progress.capture else []
    kwargs = {
        **inputs,
        **sampling,
        "max_new_tokens": max(r.max_tokens for r in requests),
        "stopping_criteria": StoppingCriteriaList([progress]),
        "logits_processor": LogitsProcessorList(processors),
        "pad_token_id": prompting.tokenizer.pad_token_id,
        "use_cache": True,
    }
    return kwargs


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async streams as they come, each with its stream's index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is done:
                left -= 1
            else:
                yield index, item
        for task in tasks:
            task.result()  # a stream's exception reaches the caller
    finally:
        for task in tasks:
            task.cancel()


async def collect(stream: AsyncIterator[Delta]) -> dict:
    """A whole answer from its deltas: its choices in index order, when the first token came and
    how long it all took (seconds from the start of `stream`, for the gateway's metrics)."""
    started, first_token_s = time.perf_counter(), None
    choices: dict[int, dict] = {}
    async for delta in stream:
        if first_token_s is None:
            first_token_s = time.perf_counter() - started
        choice = choices.setdefault(delta.index, {"index": delta.index, "text": "", "logprobs": None})
        choice["text"] += delta.text
        choice["finish"], choice["completion_tokens"] = delta.finish, delta.completion_tokens
        if delta.logprobs is not None:
            choice["logprobs"] = (choice["logprobs"] or []) + delta.logprobs
    engine_s = time.perf_counter() - started
    return {
        "choices": [choices[i] for i in sorted(choices)],
        "first_token_s": first_token_s or engine_s,
        "engine_s": engine_s,
    }
