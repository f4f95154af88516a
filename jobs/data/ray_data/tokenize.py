"""Rows to tokens on the cluster, in `map_batches` tasks with the driver's tokenizer: the measured rows with the
figures the report needs, the rest as the Train workers read them."""

from __future__ import annotations

import functools
import json
import pickle
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.data
from ray.data.expressions import col

from jobs.config import DataConfig
from jobs.data.encoding import TOKEN_COLUMNS, encode
from jobs.data.ray_data.execution import cpus
from jobs.data.statistics import TALLIED_COLUMNS, Tally

if TYPE_CHECKING:
    from jobs.prompting import Prompting


def trains(encoded: dict[str, Any]) -> bool:
    """A tokenized row that trains: a conversation may be left unusable by its tokens (too long, a template problem)."""
    return not encoded.get("problem") and not encoded.get("too_long")


# `trains` on a tokenized dataset's columns: an expression runs on whole Arrow blocks, a Python filter once per row.
TRAINS = (col("problem") == "") & ~col("too_long")


def tokenize_batch(batch: dict[str, np.ndarray], prompting: bytes, data: DataConfig, streamed: bool) -> dict[str, list]:
    """map_batches task: the driver loader's `encode` per row, with the driver's tokenizer (pickled: a task imports
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


# Ray Data runs a task per block, and unpickling a tokenizer is slow: each worker process keeps the last ones.
# Tasks rather than a map_batches actor pool: each pool's actors are fresh processes that import
# Ray Data's map worker and this module again, where the check tasks have left warm ones.
@functools.lru_cache(maxsize=2)
def _unpickled(prompting: bytes) -> Prompting:
    return pickle.loads(prompting)


def tokenized(
    sets: list[ray.data.MaterializedDataset], encode_args: dict[str, Any], streamed: bool = False
) -> ray.data.Dataset:
    """The rows of `sets` through the tokenizer tasks, up to one per CPU and one per block (a task reads whole blocks:
    Ray Data warns of a limit above the blocks). Now (the caller materializes): with the figures the report needs.
    `streamed`: only the rows' tokens, as the Train workers read them, by tasks that ask for no CPU: the Train workers
    may hold every CPU, and a task waiting for one would stall training forever; they share the cores instead."""
    tasks = max(1, min(cpus(), sum(rows.num_blocks() for rows in sets)))
    rows = sets[0] if len(sets) == 1 else sets[0].union(*sets[1:])
    return rows.map_batches(
        tokenize_batch,
        fn_kwargs={**encode_args, "streamed": streamed},
        batch_size=256,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        **({"num_cpus": 0} if streamed else {}),
    )


def head_and_tail(rows: ray.data.MaterializedDataset, head_rows: int) -> tuple[ray.data.Dataset, list]:
    """The first `head_rows` rows and the rest (as pieces), each cut into one piece per CPU for the tokenizer tasks:
    a small input is one or two blocks (a part of a file each), which one task would tokenize while the other CPUs
    wait."""
    pieces_per_part, total = cpus(), rows.count()
    cuts = [head_rows * i // pieces_per_part for i in range(1, pieces_per_part)] + [head_rows]
    cuts += [head_rows + (total - head_rows) * i // pieces_per_part for i in range(1, pieces_per_part)]
    pieces = rows.split_at_indices(cuts)
    head = pieces[0].union(*pieces[1:pieces_per_part]) if pieces_per_part > 1 else pieces[0]
    return head, [piece for piece in pieces[pieces_per_part:] if piece.count()]


def token_stats(
    encoded: ray.data.Dataset, cfg: DataConfig, conversation: bool, single_file: bool
) -> dict[str, dict[str, Any]]:
    """Per split, the report's token figures; raises as the driver loader does for unusable conversations."""
    tallies = {"train": Tally(), "validation": Tally()}
    for batch in encoded.select_columns(["kind", *TALLIED_COLUMNS]).iter_batches(batch_size=65536):
        for kind, tally in tallies.items():
            chosen = batch["kind"] == kind
            if chosen.any():
                tally.add({k: v[chosen] for k, v in batch.items()}, single_file)
    for kind, tally in tallies.items():
        tally.check(cfg, kind)
    return {kind: tally.report(conversation) for kind, tally in tallies.items() if tally.rows or kind == "train"}
