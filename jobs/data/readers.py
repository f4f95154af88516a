"""Rows from bytes: the JSONL, CSV and SQuAD parsers both loaders use, Hugging Face datasets, the generated demo tasks,
and the driver loader's whole-file read. A row is (number, record); a line that cannot be read is a bad row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.config import DataConfig
from jobs.data.errors import BadRow, DataError, empty_file, not_found
from jobs.data.formats import DEMOS
from jobs.demo_data import demo_conversations, demo_rows

if TYPE_CHECKING:  # the model stack (torch, peft) is not needed to read and check data
    from datasets import Dataset


@dataclass
class RawData:
    rows: list[tuple[int, dict[str, Any]]]
    bad: list[BadRow] = field(default_factory=list)


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


def text_records(source: Any, rows: int | None = None) -> list[dict[str, Any]]:
    """CSV rows with every cell as written, an empty one None (as `datasets` reads it). Text, not pandas' guess of a
    type: "007" and "3.10" stay as written, and parts read alone cannot guess one column differently."""
    import pandas  # here: only the tasks that read CSV pay for it

    frame = pandas.read_csv(source, nrows=rows, dtype=str)
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def csv_rows(source: Any, where: str, rows: int | None = None) -> list[dict[str, Any]]:
    """`text_records`, a parse error as a DataError that starts with `where` (the file, and the rows if a part)."""
    import pandas

    try:
        return text_records(source, rows)
    except pandas.errors.ParserError as exc:
        raise DataError(f"{where}not valid CSV: {exc}") from exc


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
            for qa in paragraph.get("qas", []):
                number += 1
                _squad_question(data, number, article, paragraph.get("context", ""), qa)
    return data


def _squad_question(data: RawData, number: int, article: dict, context: str, qa: dict) -> None:
    answers = [a.get("text", "") for a in qa.get("answers", [])]
    missing = [
        a
        for a in qa.get("answers", [])
        if context[a.get("answer_start", -1) :][: len(a.get("text", ""))] != a.get("text")
    ]
    if not answers or not all(answers):
        data.bad.append(BadRow(number, "answers", f"question {qa.get('id')!r} has no answer text"))
    elif missing:
        where = (
            f"answer {missing[0].get('text')!r} is not in the context at answer_start {missing[0].get('answer_start')}"
        )
        data.bad.append(BadRow(number, "answers", f"question {qa.get('id')!r}: {where}"))
    else:
        record = {
            "id": qa.get("id"),
            "title": article.get("title", ""),
            "context": context,
            "question": qa.get("question", ""),
            "answer": answers[0],
            "answers": answers,
        }
        data.rows.append((number, record))


def demo_raw(cfg: DataConfig, fmt: str) -> RawData:
    """The generated task data.path names (`demo` or `demo-chat`), numbered from 1."""
    generate = demo_rows if fmt == "demo" else demo_conversations
    return RawData(rows=list(enumerate(generate(cfg.demo_rows, cfg.seed), start=1)))


def is_saved_dataset(path: str) -> bool:
    """A folder written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return any((Path(path) / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_hf_dataset(cfg: DataConfig) -> Dataset:
    """A dataset folder (`save_to_disk`) or a hub dataset id, at data.split."""
    from datasets import load_dataset, load_from_disk  # here: a Ray Data task reading JSONL never imports it

    if is_saved_dataset(cfg.path):
        loaded = load_from_disk(cfg.path)
        return loaded[cfg.split] if hasattr(loaded, "keys") else loaded
    return load_dataset(cfg.path, split=cfg.split)


def _read_jsonl(path: Path) -> RawData:
    with path.open("rb") as handle:
        return parse_jsonl(handle)


def _read_table(fmt: str, cfg: DataConfig) -> RawData:
    from datasets import load_dataset

    dataset = load_hf_dataset(cfg) if fmt == "hf" else load_dataset(fmt, data_files=cfg.path, split="train")
    return RawData(rows=[(i + 1, record) for i, record in enumerate(dataset)])


def read_whole(cfg: DataConfig, fmt: str) -> RawData:
    """All of data.path's rows, read in this process (the driver loader)."""
    if fmt in DEMOS:
        return demo_raw(cfg, fmt)
    path = Path(cfg.path)
    if fmt != "hf" and not path.is_file():
        raise not_found(cfg.path)
    if fmt != "hf" and path.stat().st_size == 0:
        raise empty_file(f"data.path = {cfg.path!r}")
    readers = {
        "jsonl": lambda: _read_jsonl(path),
        "csv": lambda: RawData(rows=list(enumerate(text_records(path), start=1))),
        "squad": lambda: parse_squad(path.read_bytes(), str(path)),
    }
    try:
        return readers[fmt]() if fmt in readers else _read_table(fmt, cfg)
    except DataError:
        raise
    except Exception as exc:  # a library's parse error: say which file and format failed
        raise DataError(f"data.path = {cfg.path!r}: could not read it as {fmt}: {exc}") from exc
