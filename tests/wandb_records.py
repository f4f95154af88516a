"""Reads a W&B offline run file (`run-<id>.wandb`) back, for tests.

wandb 0.31 writes it from its Go core and ships no Python reader. The file is a 7-byte header,
then LevelDB's log format (32 KiB blocks; each chunk: crc32, length, type; FULL=1, FIRST=2,
MIDDLE=3, LAST=4) holding `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, LAST = 1, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(path: Path) -> list[dict]:
    """Every `wandb.log` row of the run file, keys as logged."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def run_info(path: Path) -> dict:
    """Id, group, job type and config of the run file."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            return {"id": run.run_id, "group": run.run_group, "job_type": run.job_type, "config": config}
    raise AssertionError(f"no run record in {path}")


def artifacts(path: Path) -> dict[str, tuple[str, set[str]]]:
    """Artifacts logged in the run file: name -> (type, file paths in its manifest)."""
    return {
        record.artifact.name: (record.artifact.type, {entry.path for entry in record.artifact.manifest.contents})
        for record in records(path)
        if record.WhichOneof("record_type") == "artifact"
    }
