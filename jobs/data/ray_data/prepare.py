"""The Ray Data loader's preparation: checked rows to the tokenized sets the Train workers stream, and the report.

The held-out rows and the training rows among the first STATS_ROWS rows are tokenized before training, for the
report's token figures; beyond those, the training rows are tokenized as the Train workers read them, so that the
first step does not wait for the whole set.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.data
from ray.data.expressions import col

from jobs import cluster
from jobs.config import DataConfig, RunConfig
from jobs.data.encoding import TOKEN_COLUMNS
from jobs.data.errors import check_split
from jobs.data.formats import check_chat, is_conversation
from jobs.data.ray_data.check import Checked, checked_rows, count_rows, not_train_rows
from jobs.data.ray_data.execution import materialized
from jobs.data.ray_data.tokenize import TRAINS, head_and_tail, token_stats, tokenized
from jobs.data.statistics import data_report

if TYPE_CHECKING:
    from jobs.prompting import Prompting

# Rows whose training rows are tokenized before training, for the report's token figures: with more, the others are
# tokenized as the Train workers read them (the report then says how many training rows its token figures come from).
STATS_ROWS = 5000


@dataclass
class StreamedData:
    """`jobs.data.Prepared` for the Ray Data loader: the tokenized rows in the object store, streamed in shards."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    eval_examples: list[dict[str, Any]]
    report: dict[str, Any]
    train_rows: int
    made_from: tuple[DataConfig, str] | None = None  # data section and model: a trial with the same reuses it

    @property
    def has_eval(self) -> bool:
        return self.eval is not None

    def ray_datasets(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train, **({"eval": self.eval} if self.eval is not None else {})}

    def whole_sets(self) -> None:
        return None

    def serves(self, run: RunConfig) -> bool:
        """A trial re-reading the rows would wait for CPUs its sibling trials' workers hold: it reuses these."""
        return self.made_from == (run.data, run.model.name)


@dataclass
class _Measured:
    """The tokenized rows with their figures, and the training rows left to tokenize as the workers read them."""

    rows: ray.data.MaterializedDataset
    stats: dict[str, dict[str, Any]]
    measured_train_rows: int
    tail: list[ray.data.Dataset]  # empty when every training row was measured


def validation_examples(run: RunConfig) -> list[dict[str, Any]]:
    """The held-out rows of a `data.loader: ray_data` run, in file and row order, for the evaluation stage."""
    cluster.connect(run.ray.address)
    held_out = checked_rows(run.data).rows.filter(expr=col("kind") == "validation")
    return [json.loads(row["example"]) for row in held_out.take_all()]


def prepare(run: RunConfig, prompting: Prompting) -> StreamedData:
    """Read, check, split and tokenize on the cluster; DataError (file, row, field) before any Train worker starts."""
    cfg = run.data
    cluster.connect(run.ray.address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # seeded runs read rows alike
    checked = checked_rows(cfg)
    check_chat(checked.layout, prompting)
    not_train, counts, bad = count_rows(checked, cfg)
    usable, usable_not_train = checked.rows, not_train
    if cfg.max_samples:
        usable = materialized(checked.rows.filter(expr=col("kind") != "bad").limit(cfg.max_samples))
        usable_not_train = not_train_rows(usable)
    encode_args = {"prompting": pickle.dumps(prompting), "data": cfg}
    measured = _measure(usable, usable_not_train, encode_args, checked)
    stats = measured.stats
    check_split(cfg, counts["used"], stats.get("validation", {}).get("rows", 0), stats["train"]["rows"])
    rows = measured.rows.filter(expr=TRAINS) if is_conversation(checked.layout) else measured.rows
    held_out = rows.filter(expr=col("kind") == "validation")
    # Materialized: the Train workers may hold every CPU, and a lazy filter would then wait for one forever.
    train = materialized(rows.filter(expr=col("kind") == "train").select_columns(TOKEN_COLUMNS))
    if measured.tail:
        # Conversations the tokenizer leaves unusable are dropped as they stream: their share is the measured one.
        counted = usable.count() - usable_not_train.count()
        train_rows = round(counted * stats["train"]["rows"] / measured.measured_train_rows)
        stats["train"] |= {"rows": train_rows, "token_figures_from_rows": measured.measured_train_rows}
        train = train.union(tokenized(measured.tail, encode_args, streamed=True))
    has_eval = bool(cfg.validation_fraction)
    report = data_report(cfg, checked.fmt, checked.layout, counts, bad, loader="ray_data")
    report |= {"train": stats["train"], **({"validation": stats["validation"]} if has_eval else {})}
    return StreamedData(
        train=train,
        eval=materialized(held_out.select_columns(TOKEN_COLUMNS)) if has_eval else None,
        eval_examples=[json.loads(r["example"]) for r in held_out.take(run.eval.during_training_samples)]
        if has_eval and run.eval.during_training_samples
        else [],
        report=report,
        train_rows=stats["train"]["rows"],
        made_from=(cfg, run.model.name),
    )


def _measure(
    usable: ray.data.MaterializedDataset, not_train: ray.data.Dataset, encode_args: dict[str, Any], checked: Checked
) -> _Measured:
    """The held-out rows and the training rows among the first STATS_ROWS, tokenized now with their figures (all the
    training rows when those first rows hold none); raises as the driver loader does for unusable conversations."""
    streamed = usable.count() > STATS_ROWS
    head, tail = head_and_tail(usable, STATS_ROWS if streamed else usable.count())
    # Materialized: head_train is counted as well as tokenized, and its filter then runs once.
    held_out_rows = materialized(not_train.filter(expr=col("kind") == "validation"))
    head_train = materialized(head.filter(expr=col("kind") == "train"))
    if streamed and not head_train.count():  # the first rows are all bad or held out: every training row is measured
        streamed, head_train = False, materialized(usable.filter(expr=col("kind") == "train"))
    rows = materialized(tokenized([held_out_rows, head_train], encode_args))
    stats = token_stats(rows, encode_args["data"], is_conversation(checked.layout), checked.single_file)
    return _Measured(rows, stats, head_train.count(), tail if streamed else [])
