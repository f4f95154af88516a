"""Rows on the cluster: each part read in a Ray task to one row per record ({file, row, record, bad}), and a sample
of the first file's first rows, read on the driver, that decides the layout and the columns."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from jobs.config import DataConfig
from jobs.data.errors import DataError, empty_file
from jobs.data.formats import DEMOS
from jobs.data.ray_data.files import source_files
from jobs.data.ray_data.parts import file_parts
from jobs.data.readers import RawData, csv_rows, demo_raw, load_hf_dataset, parse_jsonl, parse_squad

# Rows of the first file that decide the layout and the columns, as the driver loader's whole file does.
SAMPLE_ROWS = 1000


def read_file(uri: str, fmt: str) -> RawData:
    """A whole SQuAD or JSON file's rows, numbered from 1 as in the driver path. JSONL, CSV and Parquet files are read
    in parts instead (`read_part`, `read_csv_part`, `read_row_groups`)."""
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_file(path) as handle:
        content = handle.read()
    if not content:
        raise empty_file(uri)
    if fmt == "squad":
        return parse_squad(content, uri)
    return RawData(rows=list(enumerate(json.loads(content), start=1)))


def read_csv_part(part: dict[str, Any]) -> RawData:
    """A CSV part's rows (whole records, the file's header line in front), numbered from its first row."""
    fs, path = pafs.FileSystem.from_uri(part["file"])
    with fs.open_input_file(path) as handle:
        body = handle.read_at(part["end"] - part["start"], part["start"])
        start, end = part["header"] or (0, 0)
        head = b"" if part["start"] == 0 else handle.read_at(end - start, start)
    first, last = part["first_row"], part["first_row"] + part["rows"] - 1
    rows = csv_rows(io.BytesIO(head + body), f"{part['file']}: rows {first} to {last} are ")
    # Where the scan in jobs.data.ray_data.csv_parts and pandas count a part's rows differently: an error, not misnumbered rows.
    if len(rows) != part["rows"]:
        raise DataError(
            f"{part['file']}: pandas reads {len(rows)} row(s) from rows {first} to {last} where {part['rows']} were "
            "counted; convert the file to JSONL or Parquet"
        )
    return RawData(rows=list(enumerate(rows, start=first)))


def read_row_groups(part: dict[str, Any]) -> RawData:
    fs, path = pafs.FileSystem.from_uri(part["file"])
    with fs.open_input_file(path) as handle:
        records = pq.ParquetFile(handle).read_row_groups(part["row_groups"]).to_pylist()
    return RawData(rows=list(enumerate(records, start=part["first_row"])))


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


def file_rows(part: dict[str, Any], fmt: str, name_of: dict[str, str]) -> list[dict[str, Any]]:
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


def read(cfg: DataConfig, fmt: str) -> tuple[ray.data.Dataset, RawData, bool]:
    """Rows as {file, row, record, bad} on the cluster, a sample of the first rows (layout, columns), and
    whether they come from one file (then messages name rows only, as the driver path's do)."""
    if fmt in DEMOS or fmt == "hf":
        return *_read_on_driver(cfg, fmt), True
    files = source_files(cfg, fmt)
    base = cfg.path.rstrip("/")
    name_of = {f: (Path(f).name if len(files) == 1 else f.removeprefix(base).lstrip("/")) for f in files}
    parts = file_parts(files, fmt)
    items = ray.data.from_items(parts, override_num_blocks=len(parts))
    return (
        items.flat_map(file_rows, fn_kwargs={"fmt": fmt, "name_of": name_of}),
        sample(next(iter(files)), fmt),
        len(files) == 1,
    )


def sample(uri: str, fmt: str) -> RawData:
    """The first SAMPLE_ROWS rows of a file. Of JSONL, CSV and Parquet only those rows are read (of Parquet, the row
    groups that hold them): the driver never holds a big file. A SQuAD or JSON file is one document, read whole."""
    if fmt in ("squad", "json"):
        raw = read_file(uri, fmt)
        return RawData(rows=raw.rows[:SAMPLE_ROWS], bad=raw.bad)
    fs, path = pafs.FileSystem.from_uri(uri)
    if fmt == "parquet":  # `file_parts` has refused an empty one: it has no footer
        with fs.open_input_file(path) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=SAMPLE_ROWS)
            return RawData(rows=list(enumerate(next(batches, pa.table({})).to_pylist(), start=1)))
    with fs.open_input_stream(path) as stream:
        if fmt == "csv":
            head = io.BufferedReader(stream)
            if not head.peek(1):
                raise empty_file(uri)
            return RawData(rows=list(enumerate(csv_rows(head, f"{uri}: ", SAMPLE_ROWS), start=1)))
        lines = list(itertools.islice(io.BufferedReader(stream), SAMPLE_ROWS))
    if not lines:
        raise empty_file(uri)
    return parse_jsonl(lines)


def _read_on_driver(cfg: DataConfig, fmt: str) -> tuple[ray.data.Dataset, RawData]:
    """The generated tasks (small by design) and Hugging Face datasets (memory-mapped Arrow, handed to Ray Data)."""
    if fmt in DEMOS:
        rows = demo_raw(cfg, fmt).rows
        items = [{"file": cfg.path, "row": n, "record": json.dumps(r), "bad": ""} for n, r in rows]
        return ray.data.from_items(items), RawData(rows=rows[:SAMPLE_ROWS])
    dataset = load_hf_dataset(cfg)
    first = RawData(rows=list(enumerate(dataset.select(range(min(SAMPLE_ROWS, len(dataset)))), start=1)))
    numbered = dataset.add_column("__row", np.arange(1, len(dataset) + 1))

    def as_rows(batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {
            "file": [Path(cfg.path).name] * len(records),
            "row": [int(r.pop("__row")) for r in records],
            "record": [json.dumps(r, default=_plain) for r in records],
            "bad": [""] * len(records),
        }

    return ray.data.from_huggingface(numbered).map_batches(as_rows), first


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)
