"""Token-by-token generation for a batch of requests, each with its own limits.

One `model.generate` call serves the whole batch; `Progress`, a stopping criterion, sees every
new token: it decodes each row's text, cuts it at the row's stop strings, finishes the row at
its own max_tokens or end-of-sequence, and hands the new text of every row to `emit` (the
stream back to the clients). Text that could still turn into a stop string or that ends in an
incomplete UTF-8 character is held back until it is certain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from jobs.prompting import Prompting

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
GREEDY_BELOW = 1e-3  # temperatures under this decode greedily


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one generate call (sampling settings are per call)."""
        return (self.temperature, self.top_p, self.seed)


@dataclass
class Delta:
    text: str
    finish: str | None = None  # "stop" or "length" on the row's last delta
    completion_tokens: int = 0


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that are not certain yet."""
    if text.endswith("\ufffd"):  # a multi-byte character still being generated
        return 1
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class Progress(StoppingCriteria):
    """Per-row decoding, stop strings and limits, called by generate after every new token."""

    def __init__(
        self, requests: list[GenRequest], tokenizer, eos_ids: set[int], emit: Callable[[list[Delta | None]], None]
    ):
        self.requests, self.tokenizer, self.eos_ids, self.emit = requests, tokenizer, eos_ids, emit
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent = [0] * len(requests)
        self.finished: list[str | None] = [None] * len(requests)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        self.emit([self._advance(row, token) if self.finished[row] is None else None for row, token in enumerate(new)])
        return torch.tensor([f is not None for f in self.finished], device=input_ids.device)

    def _advance(self, row: int, token: int) -> Delta | None:
        request = self.requests[row]
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
        return Delta(delta, None, len(self.tokens[row]))

    def _finish(self, row: int, reason: str, text: str | None = None) -> Delta:
        if text is None:
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            text = text[: len(text) - (1 if text.endswith("\ufffd") else 0)]
        self.finished[row] = reason
        return Delta(text[self.sent[row] :], reason, len(self.tokens[row]))

    def close(self) -> list[Delta | None]:
        """Finish rows generate stopped without us (its own length limit)."""
        return [None if f else self._finish(row, "length") for row, f in enumerate(self.finished)]


def generate_kwargs(
    requests: list[GenRequest], prompting: Prompting, device, progress: Progress, mixed_adapters: bool
) -> dict:
    """Arguments of one `model.generate` call for requests sharing a sampling key."""
    inputs = prompting.pad_for_generation([r.prompt_ids for r in requests]).to(device)
    first = requests[0]
    # A tiny temperature (say 1e-308) overflows logits / temperature to inf; its limit is greedy decoding anyway.
    sampling = (
        {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
        if first.temperature >= GREEDY_BELOW
        else {"do_sample": False}
    )
    kwargs = {
        **inputs,
        **sampling,
        "max_new_tokens": max(r.max_tokens for r in requests),
        "stopping_criteria": StoppingCriteriaList([progress]),
        "pad_token_id": prompting.tokenizer.pad_token_id,
        "use_cache": True,
    }
    if mixed_adapters:  # PEFT routes each row through its own adapter in the same forward pass
        kwargs["adapter_names"] = [r.adapter or BASE for r in requests]
    return kwargs


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
