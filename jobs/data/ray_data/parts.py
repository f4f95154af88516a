"""Ray tasks' shares of the files: a whole file, a JSONL byte range, a CSV run of whole records, or Parquet row groups,
each with the number of its first row in its file (so a bad row is named as the driver loader names it)."""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from jobs.data.errors import DataError, empty_file
from jobs.data.ray_data.csv_parts import record_parts
from jobs.data.ray_data.execution import cpus

# A JSONL or CSV file is read in parts of up to this many bytes (some 8,000 rows of 256 bytes), one Ray task each: one
# big file would be one task and one block, and every stage after it would run on one CPU. Smaller input is cut into
# one part per CPU.
PART_BYTES = 2 * 2**20


def file_parts(files: dict[str, int], fmt: str) -> list[dict[str, Any]]:
    """Ray tasks' shares of the files: a whole file; for JSONL a byte range of `part_bytes` with the row number of
    its first line (from a newline count of the parts before it, itself done in Ray tasks); for Parquet consecutive
    row groups of some `part_bytes` (uncompressed) with the number of their first row (from the files' footers, read
    in Ray tasks)."""
    if fmt == "parquet":
        groups = ray.get([_row_groups.remote(f) for f in files])
        if empty := [f for f, found in zip(files, groups, strict=True) if found is None]:
            raise DataError("\n".join(str(empty_file(f)) for f in empty))
        return row_group_parts(list(files), groups, _part_bytes(sum(size for found in groups for _, size in found)))
    part_bytes = _part_bytes(sum(files.values()))
    if fmt == "csv":  # a quoted cell may hold a line end: one pass over each file finds where its records start
        found = ray.get([_csv_file_parts.remote(uri, part_bytes) for uri in files])
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
    return max(1, min(PART_BYTES, -(-total // cpus())))


def byte_ranges(uri: str, size: int, part_bytes: int) -> list[dict[str, Any]]:
    return [{"file": uri, "start": s, "end": min(s + part_bytes, size)} for s in range(0, max(size, 1), part_bytes)]


def count_newlines(uri: str, start: int, end: int) -> int:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_file(path) as handle:
        return handle.read_at(end - start, start).count(b"\n")


_newlines = ray.remote(count_newlines)


def csv_file_parts(uri: str, part_bytes: int) -> tuple[tuple[int, int] | None, list[dict[str, int]]]:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        return record_parts(stream, part_bytes)


_csv_file_parts = ray.remote(csv_file_parts)


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


def numbered(parts: list[dict[str, Any]], newlines: list[int]) -> list[dict[str, Any]]:
    """Each part with `first_row`: the number of lines before its start in its file, plus one."""
    before = 0
    for part, count in zip(parts, newlines, strict=True):
        before = 0 if part["start"] == 0 else before
        part["first_row"], before = before + 1, before + count
    return parts
