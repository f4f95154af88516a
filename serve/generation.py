"""Token-by-token generation for a batch of requests, each with its own limits.

One `model.generate` call serves the whole batch; `Progress`, a stopping criterion, sees every
new token: it decodes each row's text, cuts it at the row's stop strings, finishes the row at
its own max_tokens or end-of-sequence, and hands the new text of every row to `emit` (the
stream back to the clients). Text that could still turn into a stop string or that ends in an
incomplete UTF-8 character is held back until it is certain.
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


class Progress(StoppingCriteria):
    """Per-row decoding, stop strings and limits, called by generate after every new token."""

    def __init__(
        self,
        requests: list[GenRequest],
        tokenizer,
        eos_ids: set[int],
        emit: Callable[[list[Delta | None]], None],
        capture: LogprobCapture | None = None,
    ):
        self.requests, self.tokenizer, self.eos_ids, self.emit = requests, tokenizer, eos_ids, emit
        self.capture = capture
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent = [0] * len(requests)
        self.finished: list[str | None] = [None] * len(requests)
        self.pending: list[list[dict]] = [[] for _ in requests]  # logprobs not yet sent with a delta

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        self.emit([self._advance(row, token) if self.finished[row] is None else None for row, token in enumerate(new)])
        return torch.tensor([f is not None for f in self.finished], device=input_ids.device)

    def _note_logprob(self, row: int, token: int) -> None:
        k = self.requests[row].logprobs
        if k is None or self.capture is None or self.capture.last is None:
            return
        dist = self.capture.last[row]
        top = torch.topk(dist, k) if k else None
        pairs = (
            []
            if top is None
            else [(self._piece(i), float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        )
        self.pending[row].append(logprob_entry(self._piece(token), float(dist[token]), pairs))

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _taken(self, row: int) -> list[dict] | None:
        if self.requests[row].logprobs is None:
            return None
        taken, self.pending[row] = self.pending[row], []
        return taken

    def _advance(self, row: int, token: int) -> Delta | None:
        request = self.requests[row]
        self._note_logprob(row, token)
        if token in self.eos_ids:
            return self._finish(row, "stop")
        self.tokens[row].append(token)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        cut = [text.find(s) for s in request.stop if s in text]
        if cut:
            return self._finish(row, "stop", text[: min(cut)])
        if len(self.tokens[row]) >= request.max_tokens:
            return self._finish(row, "length", text)
        certain = len(text) - _held_back(text, request.stop)
        if certain <= self.sent[row]:
            return None
        delta, self.sent[row] = text[self.sent[row] : certain], certain
        return Delta(delta, None, len(self.tokens[row]), logprobs=self._taken(row))

    def _finish(self, row: int, reason: str, text: str | None = None) -> Delta:
        if text is None:
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            text = text[: len(text) - (1 if text.endswith("\ufffd") else 0)]
        self.finished[row] = reason
        return Delta(text[self.sent[row] :], reason, len(self.tokens[row]), logprobs=self._taken(row))

    def close(self) -> list[Delta | None]:
        """Finish rows generate stopped without us (its own length limit)."""
        return [None if f else self._finish(row, "length") for row, f in enumerate(self.finished)]


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
