"""Rows checked on the cluster: each row to its example or its problems, and to its side of the seeded split; then
the counts and the first bad rows, the only part of the checked rows the driver reads back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
from ray.data.expressions import col

from jobs.config import DataConfig
from jobs.data.errors import MAX_LISTED_BAD_ROWS, BadRow, DataError, check_rows
from jobs.data.examples import columns_of, to_examples
from jobs.data.formats import resolve_layout
from jobs.data.ray_data.execution import materialized
from jobs.data.ray_data.files import folder_format
from jobs.data.ray_data.read import read
from jobs.data.readers import RawData


@dataclass
class Checked:
    """Every row as {file, row, kind (train, validation, bad), first, example}, materialized once."""

    rows: ray.data.MaterializedDataset
    fmt: str
    layout: str
    single_file: bool  # then messages name rows only, as the driver loader's do


def in_validation(file: str, row: int, cfg: DataConfig) -> bool:
    """The seeded split: a stable hash of (seed, file, row) under validation_fraction."""
    digest = hashlib.blake2b(f"{cfg.seed}\0{file}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.validation_fraction


def check_batch(batch: dict[str, np.ndarray], cfg: DataConfig, fmt: str, layout: str, columns: set[str]):
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


def checked_rows(cfg: DataConfig) -> Checked:
    """Rows read and checked; raises DataError for what the first rows already show."""
    fmt = folder_format(cfg)
    rows, sample, single_file = read(cfg, fmt)
    columns = columns_of(sample, cfg)
    layout = resolve_layout(cfg, fmt, columns)
    to_examples(sample, cfg, fmt, layout, columns)  # absent template columns: one error now, not one per row
    checked = rows.map_batches(check_batch, fn_kwargs={"cfg": cfg, "fmt": fmt, "layout": layout, "columns": columns})
    checked.context.raise_original_map_exception = True  # a task's DataError, not a UserCodeException that drops it
    try:
        return Checked(materialized(checked), fmt, layout, single_file)
    except ray.exceptions.RayTaskError as exc:  # a file a task could not read: its DataError, without Ray's wrapper
        if isinstance(exc.cause, DataError):
            raise exc.cause from None
        raise


def count_rows(checked: Checked, cfg: DataConfig) -> tuple[ray.data.MaterializedDataset, dict[str, int], list[BadRow]]:
    """The rows that do not train (bad, held out), the counts the report gives, and the first bad rows; raises as
    `check_rows` says. One pass sets the few rows that do not train apart: the training rows are never copied."""
    not_train = not_train_rows(checked.rows)
    kinds = _count_kinds(not_train) | {"train": checked.rows.count() - not_train.count()}
    bad, problem_count, bad_row_count = _bad_rows(not_train, checked.single_file)
    valid = kinds["train"] + kinds.get("validation", 0)
    total = valid + bad_row_count
    check_rows(bad, cfg, total, valid, problem_count)
    counts = {"read": total, "valid": valid, "used": min(valid, cfg.max_samples or valid), "bad": bad_row_count}
    return not_train, counts, bad


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


def not_train_rows(checked: ray.data.Dataset) -> ray.data.MaterializedDataset:
    return materialized(checked.filter(expr=col("kind") != "train"))


def _count_kinds(checked: ray.data.Dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in checked.select_columns(["kind"]).iter_batches(batch_size=65536):
        for kind, n in zip(*np.unique(batch["kind"], return_counts=True), strict=True):
            counts[str(kind)] = counts.get(str(kind), 0) + int(n)
    return counts
