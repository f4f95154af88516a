"""Padding-free batches (`training.packing: padding_free`): examples end to end in a few rows, position ids
restarting at each one.

transformers' `DataCollatorWithFlattening` flattens a batch into one row; sdpa and eager attention then build a
block-diagonal mask over the whole row, quadratic in the batch's total length (on the SQuAD config 8 examples make
a ~2,200-token row). Here the examples are first packed (first fit, longest first) into rows twice as wide as the
longest example, which bounds that cost while nearly every token trained is a real one; each row is flattened by
`DataCollatorWithFlattening` itself. transformers' mask code reads packed rows from the position ids per batch row
(`masking_utils.find_packed_sequence_indices`), so several rows are exact on sdpa and eager; flash-attention's
varlen path takes one row only (`_is_packed_sequence` needs batch size 1), and lorafleet loads sdpa.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithFlattening

# Rows this many times as wide as the batch's longest example: the widest measured rate among the widths tried (see the
# training benchmark docs). Wider rows mask more; narrower ones fit fewer examples and leave more padding.
ROW_WIDTH = 2


def first_fit_rows(lengths: list[int], width: int) -> list[list[int]]:
    """The examples' indices per row: longest first, each into the first row with room; rows `width` tokens wide."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r, left in enumerate(room) if left >= lengths[index]), None)
        if fits is None:
            rows.append([])
            room.append(width)
            fits = len(rows) - 1
        rows[fits].append(index)
        room[fits] -= lengths[index]
    return rows


class PackedRowsCollator:
    """A batch as packed rows; a shorter row ends in pad tokens that form an example of their own (positions from 0,
    labels -100), so no real token attends to them and they add nothing to the loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = first_fit_rows(lengths, ROW_WIDTH * max(lengths))
        flat = [self.flatten([features[i] for i in row]) for row in rows]
        width = max(row["input_ids"].shape[1] for row in flat)
        return {
            "input_ids": torch.cat([_pad(r["input_ids"], width, self.pad_token_id) for r in flat]),
            "labels": torch.cat([_pad(r["labels"], width, -100) for r in flat]),
            "position_ids": torch.cat([_pad_positions(r["position_ids"], width) for r in flat]),
        }


def _pad(row: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(row, (0, width - row.shape[1]), value=value)


def _pad_positions(row: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([row, torch.arange(width - row.shape[1], dtype=row.dtype).unsqueeze(0)], dim=1)
