"""The figures data.loader: ray_data computes without the rows in one place (no Ray needed): length
statistics from histograms equal the driver path's from the lists, the seeded hash split, a JSONL file
read in byte-range parts numbers its rows as the whole file does, the config rule for what
streaming cannot do, and the tokenizer actor's start."""

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from jobs.config import ConfigError, DataConfig, load_config
from jobs.data import readers
from jobs.data.examples import columns_of
from jobs.data.formats import resolve_layout
from jobs.data.ray_data import tokenize
from jobs.data.ray_data.check import check_batch, in_validation
from jobs.data.ray_data.parts import byte_ranges, count_newlines, numbered, row_group_parts, row_groups
from jobs.data.ray_data.read import SAMPLE_ROWS, file_rows, sample
from jobs.data.readers import RawData, parse_jsonl, text_records
from jobs.data.statistics import _add_hist, histogram_stats
from jobs.demo_data import demo_rows
from jobs.model import load_tokenizer
from jobs.prompting import Prompting
from tests.subprocesses import run_ok

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", range(5))
def test_length_statistics_from_histograms_equal_those_from_the_lists(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 700, size=int(rng.integers(1, 3000)))
    hist = None
    for part in np.array_split(lengths, 7):  # added up batch by batch, as on the cluster
        hist = _add_hist(hist, part)
    assert histogram_stats(hist) == {
        "mean": round(float(lengths.mean()), 1),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


def test_the_split_is_seeded_stable_and_near_the_fraction():
    cfg = DataConfig(validation_fraction=0.1, seed=7)
    held = [in_validation("a.jsonl", row, cfg) for row in range(1, 20001)]
    assert held == [in_validation("a.jsonl", row, cfg) for row in range(1, 20001)]
    # Binomial(20000, 0.1): 2000 +- 42; +-200 is a 4.7-sigma band.
    assert 1800 <= sum(held) <= 2200
    other = [in_validation("a.jsonl", row, DataConfig(validation_fraction=0.1, seed=8)) for row in range(1, 20001)]
    assert held != other and sum(a and b for a, b in zip(held, other)) < 400, "another seed, another split"
    assert not any(in_validation("a.jsonl", row, DataConfig(validation_fraction=0.0)) for row in range(1, 1000))


def test_the_length_grouped_sampler_is_refused_with_streamed_data():
    with pytest.raises(ConfigError, match="training.group_by_length = True: .*data.loader: ray_data"):
        load_config(None, ["data.loader=ray_data", "training.group_by_length=true"])


def _awkward_jsonl(path, seed: int) -> None:
    """Lines of any length (some longer than a part), blank lines, broken JSON, non-objects, multi-byte text,
    CRLF endings, and sometimes no newline at the end."""
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(300):
        pick = rng.integers(0, 10)
        if pick == 0:
            lines.append(b"")
        elif pick == 1:
            lines.append(b'{"prompt": "cut')
        elif pick == 2:
            lines.append(b"[1, 2]")
        else:
            text = "é" * int(rng.integers(0, 5)) + "x" * int(rng.integers(0, 120 if pick > 3 else 5000))
            line = json.dumps({"prompt": f"{n} {text}", "target": "t"}, ensure_ascii=False).encode()
            lines.append(line + (b"\r" if pick == 9 else b""))
    path.write_bytes(b"\n".join(lines) + (b"\n" if seed % 2 else b""))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("part_bytes", [1, 7, 100, 4096, 10**7])
def test_a_jsonl_file_read_in_byte_range_parts_gives_the_whole_files_rows(tmp_path, seed, part_bytes):
    path = tmp_path / "rows.jsonl"
    _awkward_jsonl(path, seed)
    parts = byte_ranges(str(path), path.stat().st_size, part_bytes)
    parts = numbered(parts, [count_newlines(str(path), p["start"], p["end"]) for p in parts])
    read = [row for part in parts for row in file_rows(part, "jsonl", {str(path): "rows.jsonl"})]
    whole = parse_jsonl(path.open("rb"))
    assert sorted((r["row"], json.loads(r["record"])) for r in read if not r["bad"]) == whole.rows
    assert sorted((r["row"], *json.loads(r["bad"])) for r in read if r["bad"]) == [
        (b.row, b.field, b.reason) for b in whole.bad
    ]
    assert len(parts) == -(-path.stat().st_size // part_bytes)


def _parquet_in_row_groups(path, rows: list[dict], group_rows: int) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group_rows)


@pytest.mark.parametrize("group_rows", [1, 7, 100, 1000])
@pytest.mark.parametrize("part_bytes", [1, 3000, 10**7])
def test_a_parquet_file_read_in_row_group_parts_gives_the_whole_files_rows(tmp_path, group_rows, part_bytes):
    path = tmp_path / "rows.parquet"
    _parquet_in_row_groups(path, demo_rows(230, seed=5), group_rows)
    groups = row_groups(str(path))
    parts = row_group_parts([str(path)], [groups], part_bytes)
    read = [row for part in parts for row in file_rows(part, "parquet", {str(path): "rows.parquet"})]
    assert [(r["row"], json.loads(r["record"])) for r in read] == list(enumerate(pq.read_table(path).to_pylist(), start=1))
    sizes = [size for _, size in groups]
    assert [g for part in parts for g in part["row_groups"]] == list(range(-(-230 // group_rows)))
    for part in parts[:-1]:  # each part the fewest row groups that reach part_bytes
        held = [sizes[g] for g in part["row_groups"]]
        assert sum(held) >= part_bytes > sum(held[:-1])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_driver_reads_only_the_first_rows_of_a_csv_or_parquet_file(tmp_path, monkeypatch, fmt):
    """The layout and columns come from the first SAMPLE_ROWS rows: the driver never reads a big file whole."""
    rows = demo_rows(3 * SAMPLE_ROWS, seed=6)
    path = tmp_path / f"rows.{fmt}"
    if fmt == "csv":
        pa.csv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        _parquet_in_row_groups(path, rows, SAMPLE_ROWS // 2)
    whole = list(enumerate(text_records(path) if fmt == "csv" else pq.read_table(path).to_pylist(), start=1))

    def whole_file(*args):
        raise AssertionError("the driver read the whole file")

    def first_rows(source, rows=None):
        assert rows == SAMPLE_ROWS, "the driver read the whole file"
        return text_records(source, rows)

    monkeypatch.setattr(readers, "text_records", first_rows)
    monkeypatch.setattr(pq, "read_table", whole_file)
    assert sample(str(path), fmt).rows == whole[: SAMPLE_ROWS]


ENCODE_ELSEWHERE = """
import json, pickle, sys
from jobs.data.ray_data import tokenize
prompting, data, batch = pickle.load(open(sys.argv[1], "rb"))
out = tokenize.tokenize_batch(batch, prompting, data, streamed=True)
print(json.dumps({"input_ids": [[int(t) for t in ids] for ids in out["input_ids"]],
                  "imported": sorted(m for m in ("torch", "jobs.model", "peft", "bitsandbytes") if m in sys.modules)}))
"""


def test_a_tokenizer_task_gets_the_drivers_tokenizer_and_imports_no_model_code(tiny_causal, tmp_path):
    """The tokenizer tasks get the driver's tokenizer, pickled: a process without the model's folder (another node)
    tokenizes the same rows, importing neither torch nor the model code (`import jobs.model`: 15 s on one core here).
    Each process unpickles it once: the next task's copy of the same bytes finds it."""
    model = shutil.copytree(tiny_causal, tmp_path / "model")
    run = load_config(None, [f"model.name={model}", "data.validation_fraction=0"])
    prompting = Prompting(load_tokenizer(run.model), "causal", True)
    rows = demo_rows(12, seed=1)
    raw = {
        "file": np.array(["rows.jsonl"] * len(rows)),
        "row": np.arange(1, len(rows) + 1),
        "record": np.array([json.dumps(r) for r in rows]),
        "bad": np.array([""] * len(rows)),
    }
    columns = columns_of(RawData(rows=list(enumerate(rows, start=1))), run.data)
    layout = resolve_layout(run.data, "jsonl", columns)
    checked = {k: np.array(v) for k, v in check_batch(raw, run.data, "jsonl", layout, columns).items()}
    blob = pickle.dumps(prompting)
    expected = [list(ids) for ids in tokenize.tokenize_batch(checked, blob, run.data, streamed=True)["input_ids"]]
    assert tokenize._unpickled(bytes(bytearray(blob))) is tokenize._unpickled(blob), "unpickled once per process"
    (tmp_path / "encoder.pkl").write_bytes(pickle.dumps((blob, run.data, checked)))
    shutil.rmtree(model)

    done = run_ok([sys.executable, "-c", ENCODE_ELSEWHERE, tmp_path / "encoder.pkl"], cwd=REPO)
    elsewhere = json.loads(done.stdout.strip().splitlines()[-1])
    assert elsewhere["input_ids"] == expected and len(expected) == len(rows)
    assert elsewhere["imported"] == []
