"""The run report's data figures, for both loaders: one tally of tokenized rows, fed batch by batch (histograms of
lengths stand in for the lists, so Ray Data's driver never holds one figure per row), and one report builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.config import DataConfig
from jobs.data.errors import MAX_LISTED_BAD_ROWS, BadRow, check_unusable
from jobs.data.formats import described

# The columns a tally reads of a batch of encoded rows: lengths and flags, never the tokens.
TALLIED_COLUMNS = ["file", "row", "prompt_tokens", "target_tokens", "truncated", "dropped_turns", "too_long", "problem"]


@dataclass
class Tally:
    """One split's figures, added up batch by batch."""

    rows: int = 0
    prompt: np.ndarray | None = None
    target: np.ndarray | None = None
    truncated: int = 0
    dropped_turns: int = 0
    long_rows: list = field(default_factory=list)
    long_count: int = 0
    problems: list[BadRow] = field(default_factory=list)
    problem_count: int = 0

    def add(self, batch: dict[str, np.ndarray], single_file: bool) -> None:
        """A batch of TALLIED_COLUMNS. A row too long or with a template problem does not train: it is counted
        and its first ones are listed (by row, with its file when the data has several)."""
        usable = ~batch["too_long"] & (batch["problem"] == "")
        self.rows += int(usable.sum())
        self.prompt = _add_hist(self.prompt, batch["prompt_tokens"][usable])
        self.target = _add_hist(self.target, batch["target_tokens"][usable])
        self.truncated += int(batch["truncated"][usable].sum())
        self.dropped_turns += int(batch["dropped_turns"].sum())
        name = (lambda f, r: r) if single_file else (lambda f, r: f"{f} row {r}")
        long = batch["too_long"]
        longs = [name(f, int(r)) for f, r in zip(batch["file"][long], batch["row"][long], strict=True)]
        self.long_rows = (self.long_rows + longs)[:MAX_LISTED_BAD_ROWS]
        self.long_count += len(longs)
        flagged = batch["problem"] != ""
        found = [
            BadRow(int(r), "chat template", str(p), file="" if single_file else str(f))
            for f, r, p in zip(batch["file"][flagged], batch["row"][flagged], batch["problem"][flagged], strict=True)
        ]
        self.problems = (self.problems + found)[:MAX_LISTED_BAD_ROWS]
        self.problem_count += len(found)

    def check(self, cfg: DataConfig, desc: str) -> None:
        """Raises as data.bad_rows and data.truncation say for the rows that do not train."""
        total = self.rows + self.long_count + self.problem_count
        check_unusable(self.problems, self.problem_count, self.long_rows, self.long_count, cfg, desc, total)

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
                "problem_details": [str(b) for b in self.problems],
            }
        return out


def _add_hist(hist: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values.astype(np.int64), minlength=0)
    if hist is None:
        return counts
    size = max(len(hist), len(counts))
    return np.pad(hist, (0, size - len(hist))) + np.pad(counts, (0, size - len(counts)))


def histogram_stats(hist: np.ndarray | None) -> dict[str, float]:
    """A histogram of lengths to their mean, numpy's (linear) percentiles and max, as from the list of lengths."""
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


def data_report(
    cfg: DataConfig, fmt: str, layout: str, counts: dict[str, int], bad: list[BadRow], loader: str | None = None
) -> dict[str, Any]:
    """The report's data section before the splits' figures. `counts`: rows read, valid, used and bad."""
    return {
        "source": cfg.path,
        "format": described(fmt, layout),
        "layout": layout,
        **({"loader": loader} if loader else {}),
        "rows_read": counts["read"],
        "rows_valid": counts["valid"],
        "rows_used": counts["used"],
        "bad_rows": counts["bad"],
        "bad_row_details": [str(b) for b in bad[:MAX_LISTED_BAD_ROWS]],
        "rows_left_out_by_max_samples": counts["valid"] - counts["used"],
    }
