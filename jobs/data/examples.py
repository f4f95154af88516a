"""Rows to examples: {id, row, prompt, target, references} (a conversation also carries its messages), or the rows'
problems. Causal examples mask the prompt out of the loss; seq2seq examples put the target in the decoder labels;
conversations (`jobs.conversations`) train on the assistant's turns."""

from __future__ import annotations

import json
import string
from typing import Any

from jobs import conversations
from jobs.config import DataConfig
from jobs.data.errors import BadRow, DataError
from jobs.data.formats import resolve_layout, templates
from jobs.data.readers import RawData


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _conversation_example(number: int, record: dict[str, Any], cfg: DataConfig, layout: str):
    messages, problems = conversations.from_record(record, layout, cfg.roles, cfg.system_prompt)
    if problems:
        return None, [BadRow(number, p.field, p.reason) for p in problems]
    last = conversations.last_assistant(messages)
    target = messages[last]["content"]
    return {
        "id": str(record.get("id", number)),
        "row": number,
        "conversation": json.dumps(messages, ensure_ascii=False),
        "prompt": conversations.transcript(messages[:last]),  # what eval.md and the predictions file show
        "target": target,
        "references": [target],
    }, []


def _alpaca_example(number: int, record: dict[str, Any]):
    """Alpaca's instruction (+ input, when given) as the prompt and its output as the target."""
    bad = [
        BadRow(number, k, "missing or empty") for k in ("instruction", "output") if not str(record.get(k) or "").strip()
    ]
    bad += [
        BadRow(number, k, f"a {type(record[k]).__name__}, expected text")
        for k in ("instruction", "input", "output")
        if isinstance(record.get(k), (list, dict))
    ]
    if bad:
        return None, bad
    extra = str(record.get("input") or "").strip()
    target = str(record["output"])
    prompt = f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])
    return {
        "id": str(record.get("id", number)),
        "row": number,
        "prompt": prompt,
        "target": target,
        "references": [target],
    }, []


def columns_of(raw: RawData, cfg: DataConfig) -> set[str]:
    return {cfg.columns.get(k, k) for _, r in raw.rows for k in r}


def to_examples(
    raw: RawData, cfg: DataConfig, fmt: str, layout: str | None = None, columns: set[str] | None = None
) -> tuple[list[dict[str, Any]], list[BadRow], str]:
    """Map rows to {id, prompt, target, references} (conversations also carry their messages); collect bad rows.
    Returns the rows' layout too. A part of the data (Ray Data's batches) passes the layout and columns the
    first rows decided, so every part is read the same way."""
    columns = columns_of(raw, cfg) if columns is None else columns
    layout = layout or resolve_layout(cfg, fmt, columns)
    if layout == "prompt":
        return *_prompt_examples(raw, cfg, fmt, columns), layout
    examples, bad = [], list(raw.bad)
    for number, record in raw.rows:
        record = {cfg.columns.get(k, k): v for k, v in record.items()}
        example, problems = (
            _alpaca_example(number, record)
            if layout == "alpaca"
            else _conversation_example(number, record, cfg, layout)
        )
        bad.extend(problems)
        if example:
            examples.append(example)
    return examples, bad, layout


def _prompt_examples(raw: RawData, cfg: DataConfig, fmt: str, columns: set[str]):
    """Rows through data.prompt_template and data.target_column."""
    prompt_template, target_column = templates(cfg, fmt)
    fields = _placeholders(prompt_template)
    needed = [*fields, target_column]
    absent = [name for name in needed if name not in columns]
    if raw.rows and absent:
        raise DataError(
            f"{cfg.path}: column(s) {absent} used by data.prompt_template/data.target_column are not in the data; its "
            f"columns are {sorted(columns)}. Rename them with data.columns or change the template"
        )
    examples, bad = [], list(raw.bad)
    for number, record in raw.rows:
        record = {cfg.columns.get(k, k): v for k, v in record.items()}
        empty = [name for name in needed if record.get(name) is None or not str(record.get(name)).strip()]
        # Numbers read as text; a list or an object would be trained on as its Python repr.
        nested = [name for name in needed if name not in empty and isinstance(record[name], (list, dict))]
        if empty or nested:
            bad.extend(BadRow(number, name, "missing or empty") for name in empty)
            bad.extend(BadRow(number, name, f"a {type(record[name]).__name__}, expected text") for name in nested)
            continue
        target = str(record[target_column])
        examples.append(
            {
                "id": str(record.get("id", number)),
                "row": number,
                "prompt": prompt_template.format(**{k: record[k] for k in fields}),
                "target": target,
                # SQuAD keeps every annotator's answer for EM/F1; other formats have one reference.
                "references": [str(r) for r in record["answers"]] if fmt == "squad" else [target],
            }
        )
    return examples, bad


def generation_prompt(example: dict[str, Any]) -> str | list[dict[str, Any]]:
    """What evaluation asks the model: the prompt text, or a conversation's turns before its last answer."""
    if example.get("conversation"):
        messages = json.loads(example["conversation"])
        return messages[: conversations.last_assistant(messages)]
    return example["prompt"]
