"""Training data on Ray Data (`data.loader: ray_data`): for data that outgrows the driver.

Files (local or `s3://`, one file or a folder of them) are read in Ray tasks, one per file or per part of up to
2 MiB of a JSONL file; rows are checked and split in `map_batches` tasks, all of them before training (a bad
row is an error before any Train worker starts; the steps come from the counted rows). The held-out rows and the
training rows among the first STATS_ROWS rows are then tokenized in `map_batches` tasks (up to one per CPU, with
the driver's tokenizer) for the report's token figures; beyond those, the training rows are tokenized as the Train
workers read them, so that the first step does not wait for the whole set. The driver keeps only what the report
needs: counts, the first bad rows, and token-length histograms. Each Ray Train worker streams its shard of the
training rows (`ray.train.get_dataset_shard`).

The same row functions as the driver path (`jobs.data`) read, check and tokenize, so a row gets the
same tokens either way. The split differs: a row is held out when a seeded hash of its file and row
number falls under `data.validation_fraction`, which needs no count or shuffle of the whole data; the
evaluation stage reads the held-out rows the same way (`validation_examples`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.expressions import col

from jobs import cluster
from jobs.config import DataConfig, RunConfig
from jobs.csv_parts import record_parts, text_records
from jobs.data import (
    DEMOS,
    MAX_LISTED_BAD_ROWS,
    BadRow,
    DataError,
    RawData,
    check_bad_rows,
    check_chat,
    check_unusable,
    columns_of,
    encode,
    is_saved_dataset,
    load_hf_dataset,
    parse_jsonl,
    parse_squad,
    resolve_format,
    resolve_layout,
    to_examples,
)
from jobs.demo_data import demo_conversations, demo_rows

if TYPE_CHECKING:
    from jobs.prompting import Prompting

SUFFIXES = {
    "jsonl": (".jsonl", ".ndjson"),
    "csv": (".csv",),
    "parquet": (".parquet",),
    "squad": (".json",),
    "json": (".json",),
}
# Rows of the first file that decide the layout and the columns, as the driver path's whole file does.
SAMPLE_ROWS = 1000
# A JSONL file is read in parts of up to this many bytes (some 8,000 rows of 256 bytes), one Ray task each: one
# big file would be one task and one block, and every stage after it would run on one CPU. Smaller input is cut into
# one part per CPU.
PART_BYTES = 2 * 2**20
TOKEN_COLUMNS = ["input_ids", "attention_mask", "labels"]
# Rows whose training rows are tokenized before training, for the report's token figures: with more, the others are
# tokenized as the Train workers read them (the report then says how many training rows its token figures come from).
STATS_ROWS = 5000
# What the driver reads back of the tokenized rows: lengths and flags, never the tokens.
SUMMARY_COLUMNS = "kind file row prompt_tokens target_tokens truncated dropped_turns too_long problem".split()


@dataclass
class StreamedData:
    """What the training job gets: the tokenized rows in the object store, and the report's figures."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    eval_examples: list[dict[str, Any]]
    report: dict[str, Any]
    train_rows: int
    made_from: tuple[DataConfig, str] | None = None  # data section and model: a trial with the same reuses it

    def serves(self, run: RunConfig) -> bool:
        return self.made_from == (run.data, run.model.name)


def source_files(cfg: DataConfig, fmt: str) -> dict[str, int]:
    """data.path's files and their sizes in bytes: the file itself, or every file of the format under the folder
    (sorted). The sizes come with the listing: on S3 another request per object would be needed."""
    fs, root = _filesystem(cfg.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return {_uri(cfg.path, root): info.size}
    if info.type != pafs.FileType.Directory:
        raise DataError(f"data.path = {cfg.path!r}: file not found")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [i for i in found if i.type == pafs.FileType.File and i.path.lower().endswith(SUFFIXES[fmt])]
    if not files:
        raise DataError(f"data.path = {cfg.path!r}: no {'/'.join(SUFFIXES[fmt])} files in this folder")
    return {_uri(cfg.path, i.path): i.size for i in sorted(files, key=lambda i: i.path)}


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))


def _uri(path: str, fs_path: str) -> str:
    return f"{path.split('://', 1)[0]}://{fs_path}" if "://" in path else fs_path


def folder_format(cfg: DataConfig) -> str:
    """The files' format: data.format, else the extension of data.path or of the folder's first data file."""
    if cfg.format in ("jsonl", "csv", "parquet", "squad", "hf") or cfg.path in DEMOS:
        return resolve_format(cfg)
    if "://" not in cfg.path and Path(cfg.path).is_file():
        return resolve_format(cfg)
    fs, root = _filesystem(cfg.path)
    if fs.get_file_info(root).type == pafs.FileType.File:
        return resolve_format(cfg.model_copy(update={"path": Path(root).name}))
    if "://" not in cfg.path and is_saved_dataset(cfg.path):
        return "hf"
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        for fmt in ("jsonl", "parquet", "csv"):
            if info.path.lower().endswith(SUFFIXES[fmt]):
                return fmt
    raise DataError(f"data.path = {cfg.path!r}: no JSONL, Parquet or CSV files found; set data.format")


def read_file(uri: str, fmt: str) -> RawData:
    """A whole SQuAD or JSON file's rows, numbered from 1 as in the driver path. JSONL, CSV and Parquet files are read
    in parts instead (`read_part`, `read_csv_part`, `read_row_groups`)."""
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_file(path) as handle:
        content = handle.read()
    if not content:
        raise DataError(f"{uri}: the file is empty")
    if fmt == "squad":
        return parse_squad(content, uri)
    return RawData(rows=list(enumerate(json.loads(content), start=1)))


def _file_parts(files: dict[str, int], fmt: str) -> list[dict[str, Any]]:
    """Ray tasks' shares of the files: a whole file; for JSONL a byte range of `_part_bytes` with the row number of
    its first line (from a newline count of the parts before it, itself done in Ray tasks); for Parquet consecutive
    row groups of some `_part_bytes` (uncompressed) with the number of their first row (from the files' footers, read
    in Ray tasks)."""
    if fmt == "parquet":
        groups = ray.get([_row_groups.remote(f) for f in files])
        if empty := [f for f, found in zip(files, groups, strict=True) if found is None]:
            raise DataError("\n".join(f"{f}: the file is empty" for f in empty))
        return row_group_parts(list(files), groups, _part_bytes(sum(size for found in groups for _, size in found)))
    part_bytes = _part_bytes(sum(files.values()))
    if fmt == "csv":  # a quoted cell may hold a line end: one pass over each file finds where its records start
        found = ray.get([_csv_parts.remote(uri, part_bytes) for uri in files])
        return [
            {"file": uri, "header": header, **part}
            for uri, (header, parts) in zip(files, found, strict=True)
            for part in parts
        ]
    if fmt != "jsonl":
        return [{"file": f} for f in files]
    parts = [part for uri, size in files.items() for part in byte_ranges(uri, size, part_bytes)]
    # A second read of the bytes, but a cheap one: counting newlines is far faster than parsing JSON.
    counts = ray.get([_newlines.remote(p["file"], p["start"], p["end"]) for p in parts])
    return numbered(parts, counts)


def _part_bytes(total: int) -> int:
    """PART_BYTES, or less when the input is small: every CPU then gets a part, not one CPU a 2 MiB part and another
    the rest."""
    return max(1, min(PART_BYTES, -(-total // _cpus())))


def _cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def byte_ranges(uri: str, size: int, part_bytes: int) -> list[dict[str, Any]]:
    return [{"file": uri, "start": s, "end": min(s + part_bytes, size)} for s in range(0, max(size, 1), part_bytes)]


def count_newlines(uri: str, start: int, end: int) -> int:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_file(path) as handle:
        return handle.read_at(end - start, start).count(b"\n")


_newlines = ray.remote(count_newlines)


def csv_parts(uri: str, part_bytes: int) -> tuple[tuple[int, int] | None, list[dict[str, int]]]:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        return record_parts(stream, part_bytes)


_csv_parts = ray.remote(csv_parts)


def _csv_rows(source: Any, where: str, rows: int | None = None) -> list[dict[str, Any]]:
    """`text_records`, a parse error as a DataError that starts with `where` (the file, and the rows if a part)."""
    import pandas

    try:
        return text_records(source, rows)
    except pandas.errors.ParserError as exc:
        raise DataError(f"{where}not valid CSV: {exc}") from exc


def read_csv_part(part: dict[str, Any]) -> RawData:
    """A CSV part's rows (whole records, the file's header line in front), numbered from its first row."""
    fs, path = pafs.FileSystem.from_uri(part["file"])
    with fs.open_input_file(path) as handle:
        body = handle.read_at(part["end"] - part["start"], part["start"])
        start, end = part["header"] or (0, 0)
        head = b"" if part["start"] == 0 else handle.read_at(end - start, start)
    first, last = part["first_row"], part["first_row"] + part["rows"] - 1
    rows = _csv_rows(io.BytesIO(head + body), f"{part['file']}: rows {first} to {last} are ")
    # Where the scan in jobs.csv_parts and pandas count a part's rows differently: an error, not misnumbered rows.
    if len(rows) != part["rows"]:
        raise DataError(
            f"{part['file']}: pandas reads {len(rows)} row(s) from rows {first} to {last} where {part['rows']} were "
            "counted; convert the file to JSONL or Parquet"
        )
    return RawData(rows=list(enumerate(rows, start=first)))


def row_groups(uri: str) -> list[tuple[int, int]] | None:
    """A Parquet file's row groups from its footer: (rows, uncompressed bytes) each; None for an empty file."""
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_file(path) as handle:
        if not handle.size():
            return None
        meta = pq.ParquetFile(handle).metadata
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


_row_groups = ray.remote(row_groups)


def row_group_parts(files: list[str], groups: list[list[tuple[int, int]]], part_bytes: int) -> list[dict[str, Any]]:
    """Each file's row groups gathered into parts of at least `part_bytes` (the last one of a file may be smaller),
    each with the number of its first row."""
    parts = []
    for uri, sizes in zip(files, groups, strict=True):
        before, held = 0, part_bytes  # a file's first row group starts a part
        for index, (rows, size) in enumerate(sizes):
            if held >= part_bytes:
                parts.append({"file": uri, "row_groups": [], "first_row": before + 1})
                held = 0
            parts[-1]["row_groups"].append(index)
            held += size
            before += rows
    return parts


def read_row_groups(part: dict[str, Any]) -> RawData:
    fs, path = pafs.FileSystem.from_uri(part["file"])
    with fs.open_input_file(path) as handle:
        records = pq.ParquetFile(handle).read_row_groups(part["row_groups"]).to_pylist()
    return RawData(rows=list(enumerate(records, start=part["first_row"])))


def numbered(parts: list[dict[str, Any]], newlines: list[int]) -> list[dict[str, Any]]:
    """Each part with `first_row`: the number of lines before its start in its file, plus one."""
    before = 0
    for part, count in zip(parts, newlines, strict=True):
        before = 0 if part["start"] == 0 else before
        part["first_row"], before = before + 1, before + count
    return parts


def read_part(part: dict[str, Any]) -> tuple[bytes, int]:
    """A JSONL part's lines: those that start in [start, end), read through the end of the last one, and
    the first one's row number."""
    fs, path = pafs.FileSystem.from_uri(part["file"])
    with fs.open_input_file(path) as handle:
        start, end, size = part["start"], part["end"], handle.size()
        head = max(start - 1, 0)
        content = handle.read_at(end - head, head)
        while end < size and not content.endswith(b"\n"):  # the last line runs on past the part
            more = handle.read_at(min(1 << 16, size - end), end)
            cut = more.find(b"\n")
            content, end = content + (more if cut < 0 else more[: cut + 1]), end + (len(more) if cut < 0 else cut + 1)
    if start == 0:
        return content, 1
    if content[:1] == b"\n":  # a line starts right at `start`
        return content[1:], part["first_row"]
    cut = content.find(b"\n")  # the line under way at `start` belongs to the part before
    return (content[cut + 1 :], part["first_row"] + 1) if cut >= 0 else (b"", part["first_row"])


def _file_rows(part: dict[str, Any], fmt: str, name_of: dict[str, str]) -> list[dict[str, Any]]:
    """flat_map: a file or a JSONL part to one row per record (the record as JSON text: files may differ in
    columns) and one per unreadable line."""
    if fmt == "jsonl":
        content, first = read_part(part)
        raw = parse_jsonl(io.BytesIO(content), first_row=first)
    elif fmt == "parquet":
        raw = read_row_groups(part)
    elif fmt == "csv":
        raw = read_csv_part(part)
    else:
        raw = read_file(part["file"], fmt)
    name = name_of[part["file"]]
    rows = [{"file": name, "row": n, "record": json.dumps(r, default=str), "bad": ""} for n, r in raw.rows]
    rows += [{"file": name, "row": b.row, "record": "", "bad": json.dumps([b.field, b.reason])} for b in raw.bad]
    return rows


def in_validation(file: str, row: int, cfg: DataConfig) -> bool:
    """The seeded split: a stable hash of (seed, file, row) under validation_fraction."""
    digest = hashlib.blake2b(f"{cfg.seed}\0{file}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.validation_fraction


def _check_batch(batch: dict[str, np.ndarray], cfg: DataConfig, fmt: str, layout: str, columns: set[str]):
    """map_batches: rows to examples (as JSON text) or their problems, and each example's side of the split, in row
    order within each file (the first STATS_ROWS checked rows are then the first rows of the data). `to_examples`
    runs once per file's rows in the batch: row numbers are unique only within a file."""
    out: dict[str, list] = {"file": [], "row": [], "kind": [], "first": [], "example": []}
    for file in dict.fromkeys(batch["file"]):
        mine = batch["file"] == file
        raw = RawData(rows=[])
        for row, record, bad in zip(batch["row"][mine], batch["record"][mine], batch["bad"][mine], strict=True):
            if bad:
                raw.bad.append(BadRow(int(row), *json.loads(bad)))
            else:
                raw.rows.append((int(row), json.loads(record)))
        examples, problems, _ = to_examples(raw, cfg, fmt, layout, columns)
        seen: set[int] = set()
        checked = []
        for problem in problems:
            checked.append((problem.row, "bad", problem.row not in seen, json.dumps([problem.field, problem.reason])))
            seen.add(problem.row)
        for example in examples:
            kind = "validation" if in_validation(file, example["row"], cfg) else "train"
            checked.append((example["row"], kind, True, json.dumps(example, ensure_ascii=False)))
        for entry in sorted(checked, key=lambda entry: entry[0]):  # stable: a row's problems keep their order
            for key, value in zip(out, (file, *entry), strict=True):
                out[key].append(value)
    return out


def trains(encoded: dict[str, Any]) -> bool:
    """A tokenized row that trains: a conversation may be left unusable by its tokens (too long, a template problem)."""
    return not encoded.get("problem") and not encoded.get("too_long")


# `trains` on a tokenized dataset's columns: an expression runs on whole Arrow blocks, a Python filter once per row.
TRAINS = (col("problem") == "") & ~col("too_long")


def tokenize_batch(batch: dict[str, np.ndarray], prompting: bytes, data: DataConfig, streamed: bool) -> dict[str, list]:
    """map_batches task: the driver path's `encode` per row, with the driver's tokenizer (pickled: a task imports
    neither torch nor the model code, and a node needs no copy of the model's files). `streamed`: only the token
    columns of the training rows that train (held-out and bad rows are skipped, and so is a conversation left unusable
    by its tokens), for the Train workers."""
    tokenizing = _unpickled(prompting)
    rows = []
    for file, row, kind, text in zip(batch["file"], batch["row"], batch["kind"], batch["example"], strict=True):
        if streamed and kind != "train":
            continue
        encoded = encode(json.loads(text), tokenizing, data)
        if streamed:
            if trains(encoded):
                rows.append({key: encoded[key] for key in TOKEN_COLUMNS})
            continue
        rows.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": encoded["labels"],
                "prompt_tokens": encoded["prompt_tokens"],
                "target_tokens": encoded["target_tokens"],
                "truncated": bool(encoded["truncated"]),
                "dropped_turns": int(encoded.get("dropped_turns", 0)),
                "too_long": bool(encoded.get("too_long", False)),
                "problem": encoded.get("problem", ""),
                "kind": kind,
                "file": file,
                "row": int(row),
                "example": text if kind == "validation" else "",  # evaluation's prompts and references
            }
        )
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


# Ray Data runs a task per block, and unpickling a tokenizer takes 1.4 s on one core here: each worker process keeps
# the last ones. Tasks rather than a map_batches actor pool: each pool's actors are fresh processes that import Ray
# Data's map worker and this module again (some 6 s each here), where the check tasks have left warm ones.
@functools.lru_cache(maxsize=2)
def _unpickled(prompting: bytes) -> Prompting:
    return pickle.loads(prompting)


def _read(cfg: DataConfig, fmt: str) -> tuple[ray.data.Dataset, RawData, bool]:
    """Rows as {file, row, record, bad} on the cluster, a sample of the first rows (layout, columns), and
    whether they come from one file (then messages name rows only, as the driver path's do)."""
    if fmt in DEMOS or fmt == "hf":
        return *_read_on_driver(cfg, fmt), True
    files = source_files(cfg, fmt)
    base = cfg.path.rstrip("/")
    name_of = {f: (Path(f).name if len(files) == 1 else f.removeprefix(base).lstrip("/")) for f in files}
    parts = _file_parts(files, fmt)
    items = ray.data.from_items(parts, override_num_blocks=len(parts))
    return (
        items.flat_map(_file_rows, fn_kwargs={"fmt": fmt, "name_of": name_of}),
        _sample(next(iter(files)), fmt),
        len(files) == 1,
    )


def _sample(uri: str, fmt: str) -> RawData:
    """The first SAMPLE_ROWS rows of a file. Of JSONL, CSV and Parquet only those rows are read (of Parquet, the row
    groups that hold them): the driver never holds a big file. A SQuAD or JSON file is one document, read whole."""
    if fmt in ("squad", "json"):
        raw = read_file(uri, fmt)
        return RawData(rows=raw.rows[:SAMPLE_ROWS], bad=raw.bad)
    fs, path = pafs.FileSystem.from_uri(uri)
    if fmt == "parquet":  # `_file_parts` has refused an empty one: it has no footer
        with fs.open_input_file(path) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=SAMPLE_ROWS)
            return RawData(rows=list(enumerate(next(batches, pa.table({})).to_pylist(), start=1)))
    with fs.open_input_stream(path) as stream:
        if fmt == "csv":
            head = io.BufferedReader(stream)
            if not head.peek(1):
                raise DataError(f"{uri}: the file is empty")
            return RawData(rows=list(enumerate(_csv_rows(head, f"{uri}: ", SAMPLE_ROWS), start=1)))
        lines = list(itertools.islice(io.BufferedReader(stream), SAMPLE_ROWS))
    if not lines:
        raise DataError(f"{uri}: the file is empty")
    return parse_jsonl(lines)


def _read_on_driver(cfg: DataConfig, fmt: str) -> tuple[ray.data.Dataset, RawData]:
    """The generated tasks (small by design) and Hugging Face datasets (memory-mapped Arrow, handed to Ray Data)."""
    if fmt in DEMOS:
        generate = demo_rows if fmt == "demo" else demo_conversations
        rows = list(enumerate(generate(cfg.demo_rows, cfg.seed), start=1))
        items = [{"file": cfg.path, "row": n, "record": json.dumps(r), "bad": ""} for n, r in rows]
        return ray.data.from_items(items), RawData(rows=rows[:SAMPLE_ROWS])
    dataset = load_hf_dataset(cfg)
    sample = RawData(rows=list(enumerate(dataset.select(range(min(SAMPLE_ROWS, len(dataset)))), start=1)))
    numbered = dataset.add_column("__row", np.arange(1, len(dataset) + 1))

    def as_rows(batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {
            "file": [Path(cfg.path).name] * len(records),
            "row": [int(r.pop("__row")) for r in records],
            "record": [json.dumps(r, default=_plain) for r in records],
            "bad": [""] * len(records),
        }

    return ray.data.from_huggingface(numbered).map_batches(as_rows), sample


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)


def _checked(cfg: DataConfig) -> tuple[ray.data.Dataset, str, str, bool]:
    """Rows read and checked, materialized once; raises DataError for what the first rows already show."""
    fmt = folder_format(cfg)
    rows, sample, single_file = _read(cfg, fmt)
    columns = columns_of(sample, cfg)
    layout = resolve_layout(cfg, fmt, columns)
    to_examples(sample, cfg, fmt, layout, columns)  # absent template columns: one error now, not one per row
    checked = rows.map_batches(_check_batch, fn_kwargs={"cfg": cfg, "fmt": fmt, "layout": layout, "columns": columns})
    checked.context.raise_original_map_exception = True  # a task's DataError, not a UserCodeException that drops it
    try:
        return _materialized(checked), fmt, layout, single_file
    except ray.exceptions.RayTaskError as exc:  # a file a task could not read: its DataError, without Ray's wrapper
        if isinstance(exc.cause, DataError):
            raise exc.cause from None
        raise


def _bad_rows(checked: ray.data.Dataset, single_file: bool) -> tuple[list[BadRow], int, int]:
    """The first bad rows by (file, row), how many problems, and how many rows have one."""
    first: list[tuple[str, int, str]] = []
    problems = rows = 0
    bad_only = checked.filter(expr=col("kind") == "bad").select_columns(["file", "row", "first", "example"])
    for batch in bad_only.iter_batches(batch_size=65536):
        problems, rows = problems + len(batch["row"]), rows + int(batch["first"].sum())
        found = [
            (str(f), int(r), str(t)) for f, r, t in zip(batch["file"], batch["row"], batch["example"], strict=True)
        ]
        first = sorted(first + found, key=lambda item: item[:2])[:MAX_LISTED_BAD_ROWS]
    bad = [BadRow(row, *json.loads(text), file="" if single_file else file) for file, row, text in first]
    return bad, problems, rows


def validation_examples(run: RunConfig) -> list[dict[str, Any]]:
    """The held-out rows of a `data.loader: ray_data` run, in file and row order, for the evaluation stage."""
    cluster.connect(run.ray.address)
    checked, *_ = _checked(run.data)
    held_out = checked.filter(expr=col("kind") == "validation")
    return [json.loads(row["example"]) for row in held_out.take_all()]


def prepare(run: RunConfig, prompting: Prompting) -> StreamedData:
    """Read, check, split and tokenize on the cluster; DataError (file, row, field) before any Train worker starts."""
    cfg = run.data
    cluster.connect(run.ray.address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # seeded runs read rows alike
    checked, fmt, layout, single_file = _checked(cfg)
    check_chat(layout, prompting)
    # One pass sets apart the few rows that do not train (bad, held out): counts, bad rows and the held-out side
    # come from them, and the training rows are never copied; the tokenizer tasks skip the others as they read.
    not_train = _not_train(checked)
    kinds = _count_kinds(not_train) | {"train": checked.count() - not_train.count()}
    bad, problem_count, bad_row_count = _bad_rows(not_train, single_file)
    valid = kinds["train"] + kinds.get("validation", 0)
    total = valid + bad_row_count
    if total == 0:
        raise DataError(f"data.path = {cfg.path!r}: no rows found")
    check_bad_rows(bad, cfg, total, problem_count)
    if not valid:
        raise DataError(f"{cfg.path}: none of the {total} row(s) is usable:\n" + "\n".join(f"  - {b}" for b in bad))
    used = min(valid, cfg.max_samples or valid)
    usable, usable_not_train = checked, not_train
    if cfg.max_samples:
        usable = _materialized(checked.filter(expr=col("kind") != "bad").limit(cfg.max_samples))
        usable_not_train = _not_train(usable)
    counted = usable.count() - usable_not_train.count()
    conversation = layout in ("messages", "sharegpt")
    encode_args = {"prompting": pickle.dumps(prompting), "data": cfg}
    streamed = usable.count() > STATS_ROWS
    head, tail = _head_and_tail(usable, STATS_ROWS if streamed else usable.count())
    # Materialized: head_train is counted as well as tokenized, and its filter then runs once.
    held_out_rows = _materialized(usable_not_train.filter(expr=col("kind") == "validation"))
    head_train = _materialized(head.filter(expr=col("kind") == "train"))
    if streamed and not head_train.count():  # the first rows are all bad or held out: every training row is measured
        streamed, head_train = False, _materialized(usable.filter(expr=col("kind") == "train"))
    measured = _materialized(_tokenized([held_out_rows, head_train], encode_args))
    stats = _token_stats(measured, cfg, conversation, single_file)
    if cfg.validation_fraction and not stats.get("validation", {}).get("rows"):
        raise DataError(
            f"{cfg.path}: none of the {used} usable row(s) fell in the held-out share data.validation_fraction = "
            f"{cfg.validation_fraction}; add rows, raise it, or set it to 0"
        )
    if not stats.get("train", {}).get("rows"):
        raise DataError(f"{cfg.path}: no usable row is left for training; add rows or lower data.validation_fraction")
    if conversation:
        measured = measured.filter(expr=TRAINS)
    held_out = measured.filter(expr=col("kind") == "validation")
    # Materialized: the Train workers may hold every CPU, and a lazy filter would then wait for one forever.
    train = _materialized(measured.filter(expr=col("kind") == "train").select_columns(TOKEN_COLUMNS))
    train_rows = stats["train"]["rows"]
    if streamed:
        # Conversations the tokenizer leaves unusable are dropped as they stream: their share is the measured one.
        measured_rows = head_train.count()
        train_rows = round(counted * stats["train"]["rows"] / measured_rows)
        stats["train"] |= {"rows": train_rows, "token_figures_from_rows": measured_rows}
        train = train.union(_tokenized(tail, encode_args, streamed=True))
    has_eval = bool(cfg.validation_fraction)
    report = {
        "source": cfg.path,
        "format": fmt if layout == "prompt" else f"{fmt} ({layout})",
        "layout": layout,
        "loader": "ray_data",
        "rows_read": total,
        "rows_valid": valid,
        "rows_used": used,
        "bad_rows": bad_row_count,
        "bad_row_details": [str(b) for b in bad],
        "rows_left_out_by_max_samples": valid - used,
        "train": stats["train"],
        **({"validation": stats["validation"]} if has_eval else {}),
    }
    return StreamedData(
        train=train,
        eval=_materialized(held_out.select_columns(TOKEN_COLUMNS)) if has_eval else None,
        eval_examples=[json.loads(r["example"]) for r in held_out.take(run.eval.during_training_samples)]
        if has_eval and run.eval.during_training_samples
        else [],
        report=report,
        train_rows=train_rows,
        made_from=(cfg, run.model.name),
    )


def _tokenized(
    sets: list[ray.data.MaterializedDataset], encode_args: dict[str, Any], streamed: bool = False
) -> ray.data.Dataset:
    """The rows of `sets` through the tokenizer tasks, up to one per CPU and one per block (a task reads whole blocks:
    Ray Data warns of a limit above the blocks). Now (the caller materializes): with the figures the report needs.
    `streamed`: only the rows' tokens, as the Train workers read them, by tasks that ask for no CPU: the Train workers
    may hold every CPU, and a task waiting for one would stall training forever; they share the cores instead."""
    cpus = _cpus()
    tasks = max(1, min(cpus, sum(rows.num_blocks() for rows in sets)))
    rows = sets[0] if len(sets) == 1 else sets[0].union(*sets[1:])
    return rows.map_batches(
        tokenize_batch,
        fn_kwargs={**encode_args, "streamed": streamed},
        batch_size=256,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        **({"num_cpus": 0} if streamed else {}),
    )


def _head_and_tail(rows: ray.data.MaterializedDataset, head_rows: int) -> tuple[ray.data.Dataset, list]:
    """The first `head_rows` rows and the rest (as pieces), each cut into one piece per CPU for the tokenizer tasks:
    a small input is one or two blocks (a part of a file each), which one task would tokenize while the other CPUs
    wait."""
    cpus, total = _cpus(), rows.count()
    cuts = [head_rows * i // cpus for i in range(1, cpus)] + [head_rows]
    cuts += [head_rows + (total - head_rows) * i // cpus for i in range(1, cpus)]
    pieces = rows.split_at_indices(cuts)
    head = pieces[0].union(*pieces[1:cpus]) if cpus > 1 else pieces[0]
    return head, [piece for piece in pieces[cpus:] if piece.count()]


def _materialized(rows: ray.data.Dataset) -> ray.data.MaterializedDataset:
    """`rows.materialize()` with Ray Data's operator reservations off for this run only. They hold each operator of a
    stream to a share of the CPUs, which on a small cluster leaves a map to one task at a time (here, on 2 CPUs, two 1 s
    map tasks took 2.99 s with them, 1.11 s without). A run that is materialized keeps all its outputs anyway; the
    stream that feeds the Train workers keeps them, as they also bound how far it runs ahead of training."""
    context = rows.context
    before = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        done = rows.materialize()
    finally:
        context.op_resource_reservation_enabled = before
    done.context.op_resource_reservation_enabled = before  # its own copy of the context, made for the run
    return done


def _not_train(checked: ray.data.Dataset) -> ray.data.Dataset:
    return _materialized(checked.filter(expr=col("kind") != "train"))


def _count_kinds(checked: ray.data.Dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in checked.select_columns(["kind"]).iter_batches(batch_size=65536):
        for kind, n in zip(*np.unique(batch["kind"], return_counts=True), strict=True):
            counts[str(kind)] = counts.get(str(kind), 0) + int(n)
    return counts


@dataclass
class _Tally:
    """One split's figures, added up batch by batch: length histograms stand in for the length lists."""

    rows: int = 0
    prompt: np.ndarray | None = None
    target: np.ndarray | None = None
    truncated: int = 0
    dropped_turns: int = 0
    long_rows: list | None = None
    long_count: int = 0
    problems: list | None = None
    problem_count: int = 0

    def add(self, batch: dict[str, np.ndarray], single_file: bool) -> None:
        usable = ~batch["too_long"] & (batch["problem"] == "")
        self.rows += int(usable.sum())
        self.prompt = _add_hist(self.prompt, batch["prompt_tokens"][usable])
        self.target = _add_hist(self.target, batch["target_tokens"][usable])
        self.truncated += int(batch["truncated"][usable].sum())
        self.dropped_turns += int(batch["dropped_turns"].sum())
        name = (lambda f, r: r) if single_file else (lambda f, r: f"{f} row {r}")
        longs = [
            name(f, int(r))
            for f, r in zip(batch["file"][batch["too_long"]], batch["row"][batch["too_long"]], strict=True)
        ]
        self.long_rows = ((self.long_rows or []) + longs)[:MAX_LISTED_BAD_ROWS]
        self.long_count += len(longs)
        flagged = batch["problem"] != ""
        found = [
            BadRow(int(r), "chat template", str(p), file="" if single_file else str(f))
            for f, r, p in zip(batch["file"][flagged], batch["row"][flagged], batch["problem"][flagged], strict=True)
        ]
        self.problems = ((self.problems or []) + found)[:MAX_LISTED_BAD_ROWS]
        self.problem_count += len(found)

    def report(self, conversation: bool) -> dict[str, Any]:
        out = {
            "rows": self.rows,
            "prompt_tokens": histogram_stats(self.prompt),
            "target_tokens": histogram_stats(self.target),
            "truncated": self.truncated,
            "truncated_share": round(self.truncated / max(self.rows, 1), 4),
        }
        if conversation:
            out |= {
                "dropped_turns": self.dropped_turns,
                "too_long_skipped": self.long_count,
                "template_problems_skipped": self.problem_count,
                "problem_details": [str(b) for b in self.problems or []],
            }
        return out


def _add_hist(hist: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values.astype(np.int64), minlength=0)
    if hist is None:
        return counts
    size = max(len(hist), len(counts))
    return np.pad(hist, (0, size - len(hist))) + np.pad(counts, (0, size - len(counts)))


def histogram_stats(hist: np.ndarray | None) -> dict[str, float]:
    """`jobs.data._length_stats` from a histogram of lengths: the same mean, numpy's (linear) percentiles, max."""
    if hist is None or not hist.sum():
        return {}
    n, cumulative, lengths = int(hist.sum()), np.cumsum(hist), np.arange(len(hist))

    def at(index: int) -> int:  # the index-th smallest length
        return int(np.searchsorted(cumulative, index + 1))

    def percentile(q: float) -> float:
        position = q / 100 * (n - 1)
        low, high = at(int(np.floor(position))), at(int(np.ceil(position)))
        return float(low + (high - low) * (position - np.floor(position)))

    return {
        "mean": round(float((hist * lengths).sum() / n), 1),
        "p50": percentile(50),
        "p95": percentile(95),
        "max": int(lengths[hist > 0].max()),
    }


def _token_stats(
    encoded: ray.data.Dataset, cfg: DataConfig, conversation: bool, single_file: bool
) -> dict[str, dict[str, Any]]:
    """Per split, the report's token figures; raises as the driver path does for unusable conversations."""
    tallies = {"train": _Tally(), "validation": _Tally()}
    for batch in encoded.select_columns(SUMMARY_COLUMNS).iter_batches(batch_size=65536):
        for kind, tally in tallies.items():
            chosen = batch["kind"] == kind
            if chosen.any():
                tally.add({k: v[chosen] for k, v in batch.items()}, single_file)
    for kind, tally in tallies.items():
        desc = "train" if kind == "train" else "validation"
        check_unusable(
            tally.problems or [],
            tally.problem_count,
            tally.long_rows or [],
            tally.long_count,
            cfg,
            desc,
            tally.rows + tally.long_count + tally.problem_count,
        )
    return {kind: tally.report(conversation) for kind, tally in tallies.items() if tally.rows or kind == "train"}
