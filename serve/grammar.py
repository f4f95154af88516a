"""Structured output (OpenAI's `response_format`) as xgrammar grammars.

vLLM applies `response_format` itself (its structured outputs run xgrammar too); this module
checks the request's schema for the gateway and masks the HF engine's logits the same way.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

CACHED_GRAMMARS = 64


def check_schema(schema: dict) -> None:
    """ValueError unless xgrammar can turn this JSON schema into a grammar (raised at the gateway, as a 400)."""
    try:
        xgr.Grammar.from_json_schema(json.dumps(schema))
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors for unsupported schemas
        raise ValueError(f"the JSON schema cannot be turned into a grammar: {str(exc).splitlines()[0][:300]}") from None


class Grammars:
    """Compiled grammars for one tokenizer, the most recently used ones kept."""

    def __init__(self, tokenizer, vocab_size: int):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()

    def compiled(self, response_format: dict) -> xgr.CompiledGrammar:
        key = json.dumps(response_format, sort_keys=True)
        if key not in self.cache:
            if response_format["type"] == "json_object":
                self.cache[key] = self.compiler.compile_builtin_json_grammar()
            else:
                self.cache[key] = self.compiler.compile_json_schema(json.dumps(response_format["schema"]))
            while len(self.cache) > CACHED_GRAMMARS:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]

    def mask(self, response_format: dict, rows: list) -> GrammarMask:
        return GrammarMask(self.compiled(response_format), rows)

    def matchers(self, response_format: dict, count: int) -> list[xgr.GrammarMatcher]:
        """One matcher per choice, for the step loop's rows (`serve.sampling`)."""
        compiled = self.compiled(response_format)
        return [xgr.GrammarMatcher(compiled) for _ in range(count)]


class GrammarMask(LogitsProcessor):
    """One xgrammar matcher per row of a `generate` call (the static path). Written here because
    xgrammar's own transformers processor asserts that every row's last token fits its grammar, and
    a row our stopping criteria ended (its max_tokens, a stop string) goes on receiving pad tokens:
    those rows are skipped."""

    def __init__(self, compiled: xgr.CompiledGrammar, rows: list):
        self.compiled, self.rows = compiled, rows  # rows[i].finished is None while row i generates
        self.matchers: list[xgr.GrammarMatcher] = []
        self.bitmask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.matchers:
            self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(input_ids.shape[0])]
            self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), self.compiled.tokenizer_info.vocab_size)
        else:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.rows[row].finished is None and not self.matchers[row].is_terminated():
                    self.matchers[row].accept_token(token)
        for row, matcher in enumerate(self.matchers):
            matcher.fill_next_token_bitmask(self.bitmask, row)
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores
