"""The figures data.loader: ray_data computes without the rows in one place (no Ray needed): length
statistics from histograms equal the driver path's from the lists, the seeded hash split, a JSONL file
read in byte-range parts numbers its rows as the whole file does, and the config rule for what
streaming cannot do."""

import json

import numpy as np
import pytest

from jobs import ray_data
from jobs.config import ConfigError, DataConfig, load_config
from jobs.data import _length_stats, parse_jsonl
from jobs.ray_data import _add_hist, histogram_stats, in_validation


@pytest.mark.parametrize("seed", range(5))
def test_length_statistics_from_histograms_equal_those_from_the_lists(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 700, size=int(rng.integers(1, 3000)))
    hist = None
    for part in np.array_split(lengths, 7):  # added up batch by batch, as on the cluster
        hist = _add_hist(hist, part)
    assert histogram_stats(hist) == _length_stats(list(lengths))


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
def test_a_jsonl_file_read_in_byte_range_parts_gives_the_whole_files_rows(tmp_path, monkeypatch, seed, part_bytes):
    path = tmp_path / "rows.jsonl"
    _awkward_jsonl(path, seed)
    monkeypatch.setattr(ray_data, "PART_BYTES", part_bytes)
    parts = ray_data.byte_ranges(str(path))
    parts = ray_data.numbered(parts, [ray_data.count_newlines(str(path), p["start"], p["end"]) for p in parts])
    read = [row for part in parts for row in ray_data._file_rows(part, "jsonl", {str(path): "rows.jsonl"})]
    whole = parse_jsonl(path.open("rb"))
    assert sorted((r["row"], json.loads(r["record"])) for r in read if not r["bad"]) == whole.rows
    assert sorted((r["row"], *json.loads(r["bad"])) for r in read if r["bad"]) == [
        (b.row, b.field, b.reason) for b in whole.bad
    ]
    assert len(parts) == -(-path.stat().st_size // part_bytes)
