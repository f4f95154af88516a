"""Conversations: rows in OpenAI's `messages` or ShareGPT's `conversations` form, checked turn by
turn, and their tokens as the chat template renders them, with the loss on the assistant's turns.

Training and serving tokenize a conversation the same way: the whole rendered text at once
(`render` + `tokens`), so the prompt a served chat request gets (`prompt_ids`) is exactly the
training example's tokens before that assistant turn (tests/test_conversations.py checks the ids).
Assistant turns are found with the template's `{% generation %}` markers where it has them
(transformers' `return_assistant_tokens_mask`), else by rendering the conversation turn by turn:
the text that turn j adds after the generation prompt is the assistant's (no library does this
for templates without markers; TRL's and Axolotl's versions are tied to their trainers).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")
LAYOUT_COLUMNS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


class TemplateError(ValueError):
    """The chat template cannot give train/serve-identical tokens for this conversation."""


@dataclass(frozen=True)
class Problem:
    field: str  # "messages" for the whole conversation, "turn N" (1-based) for one message
    reason: str


def with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The configured system prompt first, unless the conversation brings its own (training and serving alike)."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _text(content: Any) -> Any:
    """OpenAI's content parts ([{type: text, text: ...}]) joined, as the server joins them; anything else as is."""
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    ):
        return "".join(p["text"] for p in content)
    return content


def _turn(item: Any, layout: str, roles: dict[str, str], number: int) -> tuple[dict[str, Any] | None, Problem | None]:
    _, role_key, content_key = LAYOUT_COLUMNS[layout]
    where = f"turn {number}"
    if not isinstance(item, dict):
        return None, Problem(
            where, f"a {type(item).__name__}, expected an object with {role_key!r} and {content_key!r}"
        )
    raw_role = item.get(role_key)
    role = roles.get(raw_role, raw_role) if layout == "sharegpt" else raw_role
    if role not in ROLES:
        fix = "; map it to one of them with data.roles" if layout == "sharegpt" else ""
        return None, Problem(where, f"unknown role {raw_role!r} (roles: {', '.join(ROLES)}){fix}")
    content = _text(item.get(content_key))
    tool_calls = item.get("tool_calls")
    if role == "assistant" and tool_calls and not content:  # a tool call carries no text
        content = ""
    elif not isinstance(content, str):
        got = "missing" if content is None else f"a {type(content).__name__}, expected text"
        return None, Problem(where, f"{role} {content_key}: {got}")
    elif not content.strip():
        return None, Problem(where, f"{role} {content_key}: empty")
    message = {"role": role, "content": content}
    message.update({k: item[k] for k in ("tool_calls", "tool_call_id", "name") if item.get(k) is not None})
    return message, None


def from_record(
    record: dict[str, Any], layout: str, roles: dict[str, str], system_prompt: str | None
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The row's messages in OpenAI's form (system prompt added as in serving), or every problem found in it."""
    column = LAYOUT_COLUMNS[layout][0]
    turns = record.get(column)
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else ("empty" if turns == [] else f"a {type(turns).__name__}")
        return [], [Problem(column, f"{got}, expected a list of messages")]
    messages, problems = [], []
    for number, item in enumerate(turns, start=1):
        message, problem = _turn(item, layout, roles, number)
        if problem:
            problems.append(problem)
        else:
            messages.append(message)
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append(Problem(column, "no assistant turn to learn from"))
    return with_system(messages, system_prompt), problems


def last_assistant(messages: list[dict[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def transcript(messages: list[dict[str, Any]]) -> str:
    """The conversation as plain lines, for eval.md and the predictions file."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """What the model reads before its next answer: the server's chat prompt and the training prefix."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def has_markers(tokenizer) -> bool:
    return bool(MARKERS.search(tokenizer.chat_template or ""))


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _rendered_spans(tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the token span each assistant turn adds, by rendering turn by turn."""
    full = render(tokenizer, messages, False)
    chars = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(tokenizer, messages[:j], True), render(tokenizer, messages[: j + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"turn {j + 1}: the chat template renders the conversation up to this turn differently once later "
                "turns follow, so the served prompt would differ from the trained one; use a template with "
                "{% generation %} markers (model.chat_template) or train on the last turn only "
                "(data.train_on=last_assistant)"
            )
        chars.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in encoded["offset_mapping"]]  # ascending: the first token starting at or after a char
    return encoded["input_ids"], [(bisect_left(starts, a), bisect_left(starts, b)) for a, b in chars]


def _marked_spans(tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[tuple[int, int]]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), _runs(list(out["assistant_masks"]))


def _ends_at_stop(ids: list[int], span: tuple[int, int], stop_ids: set[int], number: int) -> tuple[int, int]:
    """The turn's tokens up to and with its end-of-turn token (what the model must emit to stop)."""
    start, end = span
    stop = next((k for k in range(start, end) if ids[k] in stop_ids), None)
    if stop is None:
        raise TemplateError(
            f"assistant turn {number}: the chat template ends it without an end-of-turn token "
            f"(ids {sorted(stop_ids)}), so a trained model would not stop; use a template that closes turns"
        )
    return start, stop + 1


@dataclass
class Tokens:
    input_ids: list[int]
    labels: list[int]
    trained: int  # tokens with a loss


def tokens(tokenizer, messages: list[dict[str, Any]], train_on: str) -> Tokens:
    """The conversation's token ids and labels (-100 where there is no loss) for `data.train_on`."""
    ids, spans = (_marked_spans if has_markers(tokenizer) else _rendered_spans)(tokenizer, messages)
    if train_on == "all":
        return Tokens(ids, list(ids), len(ids))
    stop_ids = {tokenizer.eos_token_id}
    turns = [_ends_at_stop(ids, span, stop_ids, n) for n, span in enumerate(spans, start=1)]
    if train_on == "last_assistant":
        turns = turns[-1:]
    labels = [-100] * len(ids)
    for start, end in turns:
        labels[start:end] = ids[start:end]
    return Tokens(ids, labels, sum(end - start for start, end in turns))


def drop_oldest_exchange(messages: list[dict[str, Any]], keep_an_answer: bool = True) -> list[dict[str, Any]] | None:
    """The conversation from its second user turn on (a system prompt stays), or None with fewer than two, or
    (keep_an_answer) when no assistant turn would be left to train on."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
    if len(users) < 2 or (keep_an_answer and not any(m["role"] == "assistant" for m in messages[users[1] :])):
        return None
    return messages[:head] + messages[users[1] :]
