"""An example to token ids: the same tokens on the driver, in a Ray Data task, and in evaluation."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from jobs import conversations
from jobs.config import DataConfig

if TYPE_CHECKING:
    from jobs.prompting import Prompting

TOKEN_COLUMNS = ["input_ids", "attention_mask", "labels"]


def encode(example: dict[str, Any], prompting: Prompting, cfg: DataConfig) -> dict[str, Any]:
    """Token ids for one example plus its untruncated lengths (for the report)."""
    if example.get("conversation"):
        return encode_conversation(example, prompting, cfg)
    tokenizer = prompting.tokenizer
    prompt_ids = prompting.ids(prompting.text(example["prompt"], cfg.system_prompt))
    if prompting.kind == "seq2seq":
        target_ids = tokenizer(text_target=example["target"])["input_ids"]
        source, target = prompt_ids[: cfg.max_source_length], target_ids[: cfg.max_target_length]
        out = {"input_ids": source, "attention_mask": [1] * len(source), "labels": target}
    else:
        target_ids = tokenizer(example["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        source, target = prompt_ids[: cfg.max_source_length], target_ids[: cfg.max_target_length]
        out = {
            "input_ids": source + target,
            "attention_mask": [1] * (len(source) + len(target)),
            "labels": [-100] * len(source) + target,
        }
    out["prompt_tokens"], out["target_tokens"] = len(prompt_ids), len(target_ids)
    out["truncated"] = len(prompt_ids) > cfg.max_source_length or len(target_ids) > cfg.max_target_length
    return out


def encode_conversation(example: dict[str, Any], prompting: Prompting, cfg: DataConfig) -> dict[str, Any]:
    """A conversation's ids and labels within data.max_length (data.truncation), plus what the report counts
    (a conversation the template cannot render consistently gets no tokens and its problem)."""
    messages, dropped, problem = json.loads(example["conversation"]), 0, ""
    try:
        tokens = conversations.tokens(prompting.tokenizer, messages, cfg.train_on)
        while len(tokens.input_ids) > cfg.max_length and cfg.truncation == "drop_oldest_turns":
            shorter = conversations.drop_oldest_exchange(messages)
            if shorter is None:
                break
            messages, dropped = shorter, dropped + 1
            tokens = conversations.tokens(prompting.tokenizer, messages, cfg.train_on)
    except conversations.TemplateError as exc:
        tokens, dropped, problem = conversations.Tokens([], [], 0), 0, str(exc)
    ids = tokens.input_ids
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": tokens.labels,
        "prompt_tokens": len(ids) - tokens.trained,  # context without loss
        "target_tokens": tokens.trained,
        "truncated": dropped > 0,
        "dropped_turns": dropped,
        "too_long": len(ids) > cfg.max_length,
        "row": example["row"],
        "problem": problem,
    }
