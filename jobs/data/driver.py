"""The driver loader (`data.loader: driver`): read, check, split and tokenize in this process, for data that fits it.

Rows are never dropped silently: a row with a missing or empty field (a conversation: a bad turn) is either an error
(naming file, row and field or turn) or, with `data.bad_rows: skip`, skipped and counted in the run report. The
tokenized sets travel whole to every Train worker through the object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.config import DataConfig, RunConfig
from jobs.data.encoding import TOKEN_COLUMNS, encode
from jobs.data.errors import DataError, check_rows
from jobs.data.examples import to_examples
from jobs.data.formats import check_chat, resolve_format
from jobs.data.readers import read_whole
from jobs.data.statistics import Tally, data_report

if TYPE_CHECKING:  # the model stack (torch, peft) is not needed to read and check data
    import ray.data
    from datasets import Dataset

    from jobs.prompting import Prompting


@dataclass
class PreparedData:
    """`jobs.data.Prepared` for the driver loader: Hugging Face datasets, shipped whole to every worker."""

    train: Dataset
    eval: Dataset | None
    eval_examples: list[dict[str, Any]]
    report: dict[str, Any]

    @property
    def train_rows(self) -> int:
        return len(self.train)

    @property
    def has_eval(self) -> bool:
        return self.eval is not None

    def ray_datasets(self) -> dict[str, ray.data.Dataset]:
        return {}

    def whole_sets(self) -> tuple[Dataset, Dataset | None]:
        return self.train, self.eval

    def serves(self, run: RunConfig) -> bool:
        """Each trial of a sweep reads small data again rather than share it."""
        return False


def load_examples(cfg: DataConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read and check rows; raise DataError before any model or Ray work if they are unusable."""
    fmt = resolve_format(cfg)
    raw = read_whole(cfg, fmt)
    examples, bad, layout = to_examples(raw, cfg, fmt)
    total = len(raw.rows) + len(raw.bad)
    check_rows(bad, cfg, total, len(examples))
    used = examples[: cfg.max_samples] if cfg.max_samples else examples
    counts = {"read": total, "valid": len(examples), "used": len(used), "bad": len({b.row for b in bad})}
    return used, data_report(cfg, fmt, layout, counts, bad)


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


def tokenize(dataset: Dataset, prompting: Prompting, cfg: DataConfig, desc: str) -> tuple[Dataset, dict[str, Any]]:
    """Token ids and the split's report figures. A conversation the template cannot render consistently, or still
    longer than data.max_length, is an error naming its row, or (data.bad_rows / data.truncation: skip,
    drop_oldest_turns) skipped and counted."""
    encoded = dataset.map(
        lambda ex: encode(ex, prompting, cfg), remove_columns=dataset.column_names, desc=f"Tokenizing {desc}"
    )
    conversation = "too_long" in encoded.column_names
    columns = _tallied_columns(encoded)
    tally = Tally()
    tally.add(columns, single_file=True)
    tally.check(cfg, desc)
    if conversation:
        encoded = encoded.select(np.flatnonzero(~columns["too_long"] & (columns["problem"] == "")))
    return encoded.select_columns(TOKEN_COLUMNS), tally.report(conversation)


def _tallied_columns(encoded: Dataset) -> dict[str, np.ndarray]:
    """The columns a Tally reads; prompt rows have no conversation flags, and so none set."""
    size = len(encoded)

    def column(name: str, dtype: Any, absent: Any) -> np.ndarray:
        values = encoded[name] if name in encoded.column_names else [absent] * size
        return np.asarray(values, dtype=dtype)

    return {
        "file": np.full(size, "", dtype=object),
        "row": column("row", np.int64, 0),
        "prompt_tokens": column("prompt_tokens", np.int64, 0),
        "target_tokens": column("target_tokens", np.int64, 0),
        "truncated": column("truncated", bool, False),
        "dropped_turns": column("dropped_turns", np.int64, 0),
        "too_long": column("too_long", bool, False),
        "problem": column("problem", object, ""),
    }


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
