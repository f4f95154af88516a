"""Every data problem a user must fix, worded once for both loaders: file, row and field, and the fix."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.config import DataConfig

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


def not_found(path: str) -> DataError:
    return DataError(f"data.path = {path!r}: file not found")


def empty_file(where: str) -> DataError:
    """`where`: data.path as set, or the file of a folder that is empty."""
    return DataError(f"{where}: the file is empty")


def check_rows(bad: list[BadRow], cfg: DataConfig, total: int, usable: int, problem_count: int | None = None) -> None:
    """What every loader checks once the rows are read: there are some, none is bad (unless data.bad_rows: skip),
    and some are usable. `bad` may be the first of `problem_count` problems."""
    if total == 0:
        raise DataError(f"data.path = {cfg.path!r}: no rows found")
    check_bad_rows(bad, cfg, total, problem_count)
    if not usable:
        raise DataError(
            f"{cfg.path}: none of the {total} row(s) is usable:\n"
            + "\n".join(f"  - {b}" for b in bad[:MAX_LISTED_BAD_ROWS])
        )


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


def check_split(cfg: DataConfig, usable: int, held_out: int, train: int) -> None:
    """A split must leave rows on both sides."""
    if cfg.validation_fraction and not held_out:
        raise DataError(
            f"{cfg.path}: none of the {usable} usable row(s) fell in the held-out share data.validation_fraction = "
            f"{cfg.validation_fraction}; add rows, raise it, or set it to 0"
        )
    if not train:
        raise DataError(f"{cfg.path}: no usable row is left for training; add rows or lower data.validation_fraction")
