"""Training data: read any supported format, check every row, split, tokenize, measure.

Rows are never dropped silently: a row with a missing or empty field (a conversation: a bad
turn) is either an error (naming file, row and field or turn) or, with `data.bad_rows: skip`,
skipped and counted in the run report. Causal examples mask the prompt out of the loss; seq2seq
examples put the target in the decoder labels; conversations (`jobs.conversations`) train on
the assistant's turns.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import conversations
from jobs.config import DataConfig
from jobs.csv_parts import text_records
from jobs.demo_data import demo_conversations, demo_rows

if TYPE_CHECKING:  # the model stack (torch, peft) is not needed to read and check data
    from datasets import Dataset

    from jobs.prompting import Prompting

SQUAD_PROMPT = "Answer with a short span copied from the context.\nContext: {context}\nQuestion: {question}"
FORMAT_DEFAULTS = {"squad": (SQUAD_PROMPT, "answer")}
GENERIC_DEFAULTS = ("{input}", "output")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".json": "squad"}
ROW_LAYOUTS = ("messages", "sharegpt", "alpaca")  # data.format values that name the rows' shape, not the file's
DEMOS = ("demo", "demo-chat")  # generated tasks: data.path names them
MAX_LISTED_BAD_ROWS = 20


class DataError(ValueError):
    """A data problem the user must fix, naming file, row and field."""


@dataclass
class BadRow:
    row: int
    field: str
    reason: str
    file: str = ""  # set when data.path is a folder of files

    def __str__(self) -> str:
        return f"{self.file + ' ' if self.file else ''}row {self.row}: {self.field}: {self.reason}"


@dataclass
class RawData:
    rows: list[tuple[int, dict[str, Any]]]
    bad: list[BadRow] = field(default_factory=list)


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    eval_examples: list[dict[str, Any]]
    report: dict[str, Any]

    @property
    def train_rows(self) -> int:
        return len(self.train)


def resolve_format(cfg: DataConfig) -> str:
    """The file's format (how to read it); data.format: messages / sharegpt / alpaca leave it to the extension."""
    if cfg.format not in ("auto", *ROW_LAYOUTS):
        return cfg.format
    if cfg.path in DEMOS:
        return cfg.path
    path = Path(cfg.path)
    if path.is_dir() or not path.suffix:
        return "hf"
    suffix = path.suffix.lower()
    if cfg.format in ROW_LAYOUTS and suffix == ".json":
        return "json"  # a JSON array of rows (SQuAD files are read only with data.format: auto or squad)
    if suffix not in EXTENSIONS:
        raise DataError(
            f"data.format = {cfg.format!r}: cannot tell the format of {cfg.path!r}; set data.format to one of jsonl, "
            "csv, parquet, squad, hf"
        )
    return EXTENSIONS[suffix]


def resolve_layout(cfg: DataConfig, fmt: str, columns: set[str]) -> str:
    """The rows' shape: 'prompt' (template + target column), 'alpaca', or a conversation ('messages', 'sharegpt')."""
    if cfg.format in ROW_LAYOUTS:
        return cfg.format
    if fmt == "demo-chat":
        return "messages"
    if fmt in ("demo", "squad") or cfg.prompt_template or cfg.target_column:
        return "prompt"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    return "prompt"


def templates(cfg: DataConfig, fmt: str) -> tuple[str, str]:
    default_prompt, default_target = FORMAT_DEFAULTS.get(fmt, GENERIC_DEFAULTS)
    return cfg.prompt_template or default_prompt, cfg.target_column or default_target


def _read_jsonl(path: Path) -> RawData:
    with path.open("rb") as handle:
        return parse_jsonl(handle)


def parse_jsonl(lines, first_row: int = 1) -> RawData:
    """JSONL lines (bytes) to rows numbered from `first_row` (a part of a file starts further on); a line
    that is not a JSON object is a bad row."""
    data = RawData(rows=[])
    for number, line in enumerate(lines, start=first_row):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            data.bad.append(BadRow(number, "(line)", f"not UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        except json.JSONDecodeError as exc:
            data.bad.append(BadRow(number, "(line)", f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict):
            data.bad.append(BadRow(number, "(line)", f"a JSON {type(record).__name__}, expected an object"))
            continue
        data.rows.append((number, record))
    return data


def _read_csv(path: Path) -> RawData:
    return RawData(rows=list(enumerate(text_records(path), start=1)))


def _read_squad(path: Path) -> RawData:
    return parse_squad(path.read_bytes(), str(path))


def parse_squad(content: bytes, path: str) -> RawData:
    """A SQuAD v1.1 document to one row per question; an answer missing from its context is a bad row."""
    try:
        doc = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a SQuAD v1.1 JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: not a SQuAD v1.1 JSON file (expected a top-level 'data' list of articles)")
    data = RawData(rows=[])
    number = 0
    for article in doc["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context", "")
            for qa in paragraph.get("qas", []):
                number += 1
                answers = [a.get("text", "") for a in qa.get("answers", [])]
                missing = [
                    a
                    for a in qa.get("answers", [])
                    if context[a.get("answer_start", -1) :][: len(a.get("text", ""))] != a.get("text")
                ]
                if not answers or not all(answers):
                    data.bad.append(BadRow(number, "answers", f"question {qa.get('id')!r} has no answer text"))
                elif missing:
                    data.bad.append(
                        BadRow(
                            number,
                            "answers",
                            f"question {qa.get('id')!r}: answer {missing[0].get('text')!r} is not in the context at "
                            f"answer_start {missing[0].get('answer_start')}",
                        )
                    )
                else:
                    data.rows.append(
                        (
                            number,
                            {
                                "id": qa.get("id"),
                                "title": article.get("title", ""),
                                "context": context,
                                "question": qa.get("question", ""),
                                "answer": answers[0],
                                "answers": answers,
                            },
                        )
                    )
    return data


def is_saved_dataset(path: str) -> bool:
    """A folder written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return any((Path(path) / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_hf_dataset(cfg: DataConfig) -> Dataset:
    """A dataset folder (`save_to_disk`) or a hub dataset id, at data.split."""
    from datasets import load_dataset, load_from_disk  # here: a Ray Data task reading JSONL never imports it (0.4 s)

    if is_saved_dataset(cfg.path):
        loaded = load_from_disk(cfg.path)
        return loaded[cfg.split] if hasattr(loaded, "keys") else loaded
    return load_dataset(cfg.path, split=cfg.split)


def _read_table(fmt: str, cfg: DataConfig) -> RawData:
    from datasets import load_dataset

    dataset = load_hf_dataset(cfg) if fmt == "hf" else load_dataset(fmt, data_files=cfg.path, split="train")
    return RawData(rows=[(i + 1, record) for i, record in enumerate(dataset)])


def read_raw(cfg: DataConfig, fmt: str) -> RawData:
    if fmt in DEMOS:
        generate = demo_rows if fmt == "demo" else demo_conversations
        return RawData(rows=[(i + 1, r) for i, r in enumerate(generate(cfg.demo_rows, cfg.seed))])
    path = Path(cfg.path)
    if fmt != "hf" and not path.is_file():
        raise DataError(f"data.path = {cfg.path!r}: file not found")
    if fmt != "hf" and path.stat().st_size == 0:
        raise DataError(f"data.path = {cfg.path!r}: the file is empty")
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "squad": _read_squad}
    try:
        return readers[fmt](path) if fmt in readers else _read_table(fmt, cfg)
    except DataError:
        raise
    except Exception as exc:  # a library's parse error: say which file and format failed
        raise DataError(f"data.path = {cfg.path!r}: could not read it as {fmt}: {exc}") from exc


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


def check_bad_rows(bad: list[BadRow], cfg: DataConfig, total: int, count: int | None = None) -> None:
    """`bad` may be the first of `count` problems (Ray Data keeps only those)."""
    count = len(bad) if count is None else count
    if not count or cfg.bad_rows == "skip":
        return
    listed = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED_BAD_ROWS])
    more = f"\n  ... and {count - MAX_LISTED_BAD_ROWS} more" if count > MAX_LISTED_BAD_ROWS else ""
    raise DataError(
        f"{cfg.path}: {count} problem(s) in {total} row(s):\n{listed}{more}\nFix the rows, or set "
        "data.bad_rows=skip to train without them (they are counted in the report)"
    )


def split(examples: list[dict[str, Any]], cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    from datasets import Dataset

    dataset = Dataset.from_list(examples)
    if cfg.validation_fraction == 0:
        return dataset, None
    if len(examples) < 2:
        raise DataError(
            f"{cfg.path}: {len(examples)} usable row(s) cannot be split; add rows or set data.validation_fraction=0"
        )
    parts = dataset.train_test_split(test_size=cfg.validation_fraction, seed=cfg.seed)
    return parts["train"], parts["test"]


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


def generation_prompt(example: dict[str, Any]) -> str | list[dict[str, Any]]:
    """What evaluation asks the model: the prompt text, or a conversation's turns before its last answer."""
    if example.get("conversation"):
        messages = json.loads(example["conversation"])
        return messages[: conversations.last_assistant(messages)]
    return example["prompt"]


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


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "mean": round(float(arr.mean()), 1),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "max": int(arr.max()),
    }


def _drop_unusable(encoded: Dataset, cfg: DataConfig, desc: str) -> tuple[Dataset, dict[str, Any]]:
    """Conversations the template cannot render consistently, or still longer than data.max_length: an error
    naming file and row, or (data.bad_rows / data.truncation: skip, drop_oldest_turns) skipped and counted."""
    problems = [BadRow(r, "chat template", p) for r, p in zip(encoded["row"], encoded["problem"], strict=True) if p]
    long_rows = [r for r, long in zip(encoded["row"], encoded["too_long"], strict=True) if long]
    check_unusable(problems, len(problems), long_rows, len(long_rows), cfg, desc, len(encoded))
    keep = [
        i for i, (p, long) in enumerate(zip(encoded["problem"], encoded["too_long"], strict=True)) if not p and not long
    ]
    counts = {
        "dropped_turns": int(sum(encoded["dropped_turns"])),
        "too_long_skipped": len(long_rows),
        "template_problems_skipped": len(problems),
        "problem_details": [str(b) for b in problems[:MAX_LISTED_BAD_ROWS]],
    }
    return encoded.select(keep), counts


def check_unusable(
    problems: list[BadRow], problem_count: int, long_rows: list, long_count: int, cfg: DataConfig, desc: str, total: int
) -> None:
    """Raises for template problems (data.bad_rows: fail) or over-long conversations (data.truncation: fail);
    the lists may be the first of the counts."""
    if problem_count and cfg.bad_rows == "fail":
        check_bad_rows(problems, cfg, total, problem_count)
    if long_count and cfg.truncation == "fail":
        listed = ", ".join(map(str, long_rows[:MAX_LISTED_BAD_ROWS])) + (
            " ..." if long_count > MAX_LISTED_BAD_ROWS else ""
        )
        raise DataError(
            f"{cfg.path}: {long_count} {desc} conversation(s) longer than data.max_length = {cfg.max_length} "
            f"tokens (rows {listed}); raise data.max_length, or set data.truncation=drop_oldest_turns or skip"
        )


def tokenize(dataset: Dataset, prompting: Prompting, cfg: DataConfig, desc: str) -> tuple[Dataset, dict[str, Any]]:
    encoded = dataset.map(
        lambda ex: encode(ex, prompting, cfg), remove_columns=dataset.column_names, desc=f"Tokenizing {desc}"
    )
    extra = {}
    if "too_long" in encoded.column_names:
        encoded, extra = _drop_unusable(encoded, cfg, desc)
    stats = {
        "rows": len(encoded),
        "prompt_tokens": _length_stats(encoded["prompt_tokens"]),
        "target_tokens": _length_stats(encoded["target_tokens"]),
        "truncated": int(sum(encoded["truncated"])),
        "truncated_share": round(sum(encoded["truncated"]) / max(len(encoded), 1), 4),
        **extra,
    }
    return encoded.select_columns(["input_ids", "attention_mask", "labels"]), stats


def load_examples(cfg: DataConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read and check rows; raise DataError before any model or Ray work if they are unusable."""
    fmt = resolve_format(cfg)
    raw = read_raw(cfg, fmt)
    examples, bad, layout = to_examples(raw, cfg, fmt)
    total = len(raw.rows) + len(raw.bad)
    if total == 0:
        raise DataError(f"data.path = {cfg.path!r}: no rows found")
    check_bad_rows(bad, cfg, total)
    if not examples:
        raise DataError(
            f"{cfg.path}: none of the {total} row(s) is usable:\n"
            + "\n".join(f"  - {b}" for b in bad[:MAX_LISTED_BAD_ROWS])
        )
    used = examples[: cfg.max_samples] if cfg.max_samples else examples
    bad_rows = sorted({b.row for b in bad})
    report = {
        "source": cfg.path,
        "format": fmt if layout == "prompt" else f"{fmt} ({layout})",
        "layout": layout,
        "rows_read": total,
        "rows_valid": len(examples),
        "rows_used": len(used),
        "bad_rows": len(bad_rows),
        "bad_row_details": [str(b) for b in bad[:MAX_LISTED_BAD_ROWS]],
        "rows_left_out_by_max_samples": len(examples) - len(used),
    }
    return used, report


def check_chat(layout: str, prompting: Prompting) -> None:
    if layout in ("messages", "sharegpt") and not prompting.use_chat:
        raise DataError(
            f"data.format: {layout} conversations are rendered with the tokenizer's chat template, and this "
            "model has none (or model.chat_template is false); use a chat model, or single-turn rows with "
            "data.prompt_template / data.format: alpaca"
        )


def prepare(cfg: DataConfig, prompting: Prompting) -> PreparedData:
    examples, report = load_examples(cfg)
    check_chat(report["layout"], prompting)
    train_rows, eval_rows = split(examples, cfg)
    train, report["train"] = tokenize(train_rows, prompting, cfg, "train")
    evaluation = None
    if eval_rows is not None:
        evaluation, report["validation"] = tokenize(eval_rows, prompting, cfg, "validation")
    return PreparedData(
        train=train, eval=evaluation, eval_examples=list(eval_rows) if eval_rows is not None else [], report=report
    )
