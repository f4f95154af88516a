"""Each row's next token by its own request's settings, for the step loop (`serve.scheduler`).

`generate` takes one temperature, top-p, seed and grammar per call, so the static path batches only requests
that agree on them. Here every row keeps its request's own: temperature and top-p through transformers' warpers
(one row at a time), its seed as a `torch.Generator` of its own (so a seeded request draws the same numbers
whatever shares its steps), its JSON grammar as an xgrammar matcher of its own. Greedy rows without a grammar
or logprobs, the common case, take one argmax over the whole batch.
"""

from __future__ import annotations

import torch
import xgrammar as xgr
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from serve.generation import GenRequest


class RowSampler:
    """The sampling state of one request (its n choices share it, drawing in turn)."""

    def __init__(self, request: GenRequest, matchers: list[xgr.GrammarMatcher] | None = None):
        self.request = request
        self.matchers = matchers  # one per choice, for a response_format
        self.generator = None if request.seed is None else torch.Generator().manual_seed(request.seed)
        self.warpers = [] if request.greedy() else [TemperatureLogitsWarper(request.temperature)]
        self.warpers += [TopPLogitsWarper(request.top_p)] if not request.greedy() and request.top_p < 1.0 else []

    def plain(self) -> bool:
        """Greedy, no grammar, no logprobs: the batch's argmax is this row's token."""
        return self.request.greedy() and self.matchers is None and self.request.logprobs is None

    def pick(self, logits: torch.Tensor, choice: int) -> tuple[int, torch.Tensor | None]:
        """The next token of `choice` from its logits [vocab], and the log-distribution it came from when the request
        asks for logprobs (after the grammar, temperature and top-p, as the static path reports)."""
        scores = logits.float().unsqueeze(0)
        matcher = self.matchers[choice] if self.matchers else None
        if matcher is not None:
            bitmask = xgr.allocate_token_bitmask(1, scores.shape[-1])  # the grammars' vocabulary is the model's
            matcher.fill_next_token_bitmask(bitmask, 0)
            xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device))
        for warp in self.warpers:
            scores = warp(None, scores)
        if self.request.greedy():
            token = int(scores.argmax(-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
        if matcher is not None and not matcher.is_terminated():
            matcher.accept_token(token)
        return token, torch.log_softmax(scores[0], dim=-1) if self.request.logprobs is not None else None


def pick_tokens(logits: torch.Tensor, rows: list[tuple[RowSampler, int]]) -> list[tuple[int, torch.Tensor | None]]:
    """Each row's next token from the batch's last logits [rows, vocab]; rows[i] is (its sampler, its choice)."""
    greedy = logits.argmax(-1).tolist()
    return [
        (greedy[i], None) if sampler.plain() else sampler.pick(logits[i], choice)
        for i, (sampler, choice) in enumerate(rows)
    ]
