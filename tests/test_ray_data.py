"""data.loader: ray_data on a local Ray (and the local S3): the same rows, checks, tokens and figures
as the driver path, for files, folders and s3:// prefixes; training streams each worker's shard, and
the evaluation stage reads the same held-out rows the training held out."""

import csv
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from ray.data.dataset import MaterializedDataset

from jobs.config import DataConfig, load_config
from jobs.data import DataError, held_out_examples, load_examples
from jobs.data.driver import prepare
from jobs.data.ray_data import execution, tokenize
from jobs.data.ray_data import parts as partition
from jobs.data.ray_data import prepare as on_ray
from jobs.data.ray_data.check import in_validation
from jobs.data.ray_data.files import source_files
from jobs.demo_data import demo_rows
from jobs.model import load_tokenizer
from jobs.prompting import Prompting
from jobs.train import train
from tests.test_bad_inputs import BROKEN_DATA, CORPUS

# Ray Data's advice warnings (a Python filter where an expression would do, a task limit above the blocks) name
# defects of this path: they fail its tests.
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("error::UserWarning:ray.data")]


@pytest.fixture(scope="module")
def local_ray(s3):
    """After `s3`: the workers inherit its endpoint."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _run(model: str, path, *overrides: str):
    return load_config(None, [f"model.name={model}", f"data.path={path}", "data.loader=ray_data", *overrides])


def _prompting(run) -> Prompting:
    return Prompting(load_tokenizer(run.model), "causal", True)


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name", sorted(set(BROKEN_DATA) - {"blank-lines.jsonl"}))
def test_the_broken_corpus_is_refused_with_file_row_and_field_as_on_the_driver(local_ray, tiny_causal, monkeypatch, name):
    monkeypatch.setattr(partition, "PART_BYTES", 64)  # JSONL files in many parts: row numbers still the file's
    run = _run(tiny_causal, CORPUS / "data" / name)
    with pytest.raises(DataError) as err:
        on_ray.prepare(run, _prompting(run))
    text = " ".join(str(err.value).split())
    for expected in BROKEN_DATA[name]:
        assert expected in text, text


def _token_rows(dataset) -> Counter:
    rows = dataset.take_all() if hasattr(dataset, "take_all") else list(dataset)
    return Counter(json.dumps([list(r["input_ids"]), list(r["labels"])]) for r in rows)


@pytest.mark.parametrize("part_bytes", [partition.PART_BYTES, 3000], ids=["one part", "many parts"])
@pytest.mark.parametrize("kind", ["prompts", "conversations"])
def test_the_same_tokens_and_report_figures_as_the_driver_path(local_ray, tiny_causal, tmp_path, monkeypatch, kind, part_bytes):
    monkeypatch.setattr(partition, "PART_BYTES", part_bytes)
    if kind == "prompts":
        rows = demo_rows(300, seed=3)
        rows[7]["output"], rows[100]["input"] = "", None  # two bad rows, skipped and counted
    else:
        from jobs.demo_data import demo_conversations

        rows = demo_conversations(120, seed=3)
        rows[5]["messages"][1]["role"] = "bot"
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    run = _run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0")
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))

    assert _token_rows(streamed.train) == _token_rows(driver.train)
    assert streamed.train_rows == driver.train_rows == len(rows) - (2 if kind == "prompts" else 1)
    same = {k: v for k, v in streamed.report.items() if k != "loader"}
    assert same == driver.report
    assert streamed.report["loader"] == "ray_data"


def _block_rows(dataset) -> list[int]:
    return [len(batch["id"]) for batch in dataset.iter_batches(batch_size=None)]  # one batch per block


def test_a_small_input_is_cut_into_a_share_per_cpu_and_only_materialized_runs_lift_ray_datas_reservations(local_ray, tmp_path):
    """1,000 rows fit in one 2 MiB part, and would be one task and one block: they are read in one part per CPU, and
    the measured head and the streamed tail are cut into one piece per CPU, in row order, no row lost or repeated.
    Ray Data's operator reservations (one task at a time on 2 CPUs) are off in a run that is materialized, and back
    on for what comes after it: the stream to the Train workers."""
    path = _write_jsonl(tmp_path / "rows.jsonl", demo_rows(1000, seed=1))
    parts = partition.file_parts(source_files(DataConfig(path=path), "jsonl"), "jsonl")
    assert [p["first_row"] for p in parts] == [1, parts[1]["first_row"]] and 450 < parts[1]["first_row"] < 550
    one = _write_jsonl(tmp_path / "one.jsonl", demo_rows(1, seed=1))
    assert len(partition.file_parts(source_files(DataConfig(path=one), "jsonl"), "jsonl")) == 2

    rows = ray.data.range(1000, override_num_blocks=1).materialize()
    head, tail = tokenize.head_and_tail(rows, 300)
    assert _block_rows(head) == [150, 150] and [_block_rows(piece) for piece in tail] == [[350], [350]]
    assert [r["id"] for r in head.take_all()] + [r["id"] for piece in tail for r in piece.take_all()] == list(range(1000))
    whole, none = tokenize.head_and_tail(rows, 1000)
    assert _block_rows(whole) == [500, 500] and none == []

    def reserving(batch):
        count = len(next(iter(batch.values())))
        return {"reserving": [ray.data.DataContext.get_current().op_resource_reservation_enabled] * count}

    done = execution.materialized(rows.map_batches(reserving))
    assert {r["reserving"] for r in done.take_all()} == {False}
    assert rows.context.op_resource_reservation_enabled and done.context.op_resource_reservation_enabled
    assert {r["reserving"] for r in done.map_batches(reserving).take_all()} == {True}


@pytest.mark.parametrize("kind", ["prompts", "conversations"])
def test_rows_beyond_the_measured_ones_are_tokenized_as_training_reads_them(local_ray, tiny_causal, tmp_path, monkeypatch, kind):
    """More training rows than STATS_ROWS: the rest are left to the Train workers' stream, with the same tokens."""
    monkeypatch.setattr(on_ray, "STATS_ROWS", 50)
    from jobs.demo_data import demo_conversations

    rows = demo_rows(300, seed=3) if kind == "prompts" else demo_conversations(120, seed=3)
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    run = _run(tiny_causal, path, "data.validation_fraction=0")
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))

    assert not isinstance(streamed.train, MaterializedDataset), "tokenized as it is read, not before"
    assert _token_rows(streamed.train) == _token_rows(driver.train)
    assert streamed.train_rows == driver.train_rows == len(rows)
    assert streamed.report["train"]["rows"] == len(rows) and streamed.report["train"]["token_figures_from_rows"] == 50
    same = {k: v for k, v in streamed.report.items() if k not in ("loader", "train")}
    assert same == {k: v for k, v in driver.report.items() if k != "train"}


def test_the_stream_skips_held_out_and_bad_rows_and_trains_what_measuring_every_row_would(local_ray, tiny_causal, tmp_path, monkeypatch):
    """The stream reads every checked row after the first STATS_ROWS: held-out and bad rows there must not train."""
    monkeypatch.setattr(partition, "PART_BYTES", 3000)  # parts of some 12 rows: row 201 is not in the first part
    rows = demo_rows(300, seed=8)
    rows[10]["output"], rows[200]["output"] = "", ""  # a bad row among the measured rows and one in the stream
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    run = _run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0.2")
    whole = on_ray.prepare(run, _prompting(run))
    monkeypatch.setattr(on_ray, "STATS_ROWS", 50)
    streamed = on_ray.prepare(run, _prompting(run))

    assert not isinstance(streamed.train, MaterializedDataset), "tokenized as it is read, not before"
    assert _token_rows(streamed.train) == _token_rows(whole.train)
    assert _token_rows(streamed.eval) == _token_rows(whole.eval)
    assert streamed.train_rows == whole.train_rows == 298 - whole.report["validation"]["rows"]
    measured = [n for n in range(1, 51) if n != 11 and not in_validation("rows.jsonl", n, run.data)]
    assert streamed.report["train"]["token_figures_from_rows"] == len(measured)


def test_first_rows_without_a_training_row_are_measured_with_all_the_others(local_ray, tiny_causal, tmp_path, monkeypatch):
    """The first STATS_ROWS rows may all be bad: then no training row is among them."""
    monkeypatch.setattr(on_ray, "STATS_ROWS", 10)
    rows = demo_rows(100, seed=9)
    for row in rows[:10]:
        row["output"] = ""
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    run = _run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0")
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))

    assert isinstance(streamed.train, MaterializedDataset), "every training row measured, none left to stream"
    assert _token_rows(streamed.train) == _token_rows(driver.train)
    assert streamed.train_rows == driver.train_rows == 90
    assert "token_figures_from_rows" not in streamed.report["train"]


def test_the_measured_rows_are_the_first_rows_whatever_bad_rows_follow(local_ray, tiny_causal, tmp_path, monkeypatch):
    """Checked rows keep their row order: bad rows further on in the same part do not take the first rows' places."""
    monkeypatch.setattr(on_ray, "STATS_ROWS", 50)
    rows = demo_rows(100, seed=9)
    for row in rows[80:90]:
        row["output"] = ""
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    run = _run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0")
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))

    assert streamed.report["train"]["token_figures_from_rows"] == 50
    assert _token_rows(streamed.train) == _token_rows(driver.train)
    assert streamed.train_rows == driver.train_rows == 90


def test_a_folder_of_parquet_files_names_the_file_of_a_bad_row(local_ray, tiny_causal, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = demo_rows(60, seed=1)
    pq.write_table(pa.Table.from_pylist(rows[:30]), folder / "part-0.parquet")
    rows[40]["output"] = " "
    pq.write_table(pa.Table.from_pylist(rows[30:]), folder / "part-1.parquet")
    run = _run(tiny_causal, folder, "data.validation_fraction=0")
    with pytest.raises(DataError, match=r"1 problem\(s\) in 60 row\(s\)[\s\S]*part-1.parquet row 11: output: missing or empty"):
        on_ray.prepare(run, _prompting(run))
    streamed = on_ray.prepare(run.model_copy(update={"data": run.data.model_copy(update={"bad_rows": "skip"})}), _prompting(run))
    assert streamed.report["rows_read"] == 60 and streamed.report["bad_rows"] == 1 and streamed.train_rows == 59
    assert streamed.report["bad_row_details"] == ["part-1.parquet row 11: output: missing or empty"]


def _assert_many_parts_read_as_on_the_driver(run) -> None:
    """Rows 7 and 260 bad (the data of the two tests below), the file in more than 3 parts."""
    fmt = run.data.path.rsplit(".", 1)[-1]
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))
    assert len(partition.file_parts(source_files(run.data, fmt), fmt)) > 3
    assert _token_rows(streamed.train) == _token_rows(driver.train)
    assert streamed.report["bad_row_details"] == ["row 7: output: missing or empty", "row 260: output: missing or empty"]
    assert {k: v for k, v in streamed.report.items() if k != "loader"} == driver.report


def test_a_parquet_file_in_many_row_groups_gives_the_drivers_tokens_report_and_bad_row_numbers(local_ray, tiny_causal, tmp_path, monkeypatch):
    monkeypatch.setattr(partition, "PART_BYTES", 3000)  # parts of a few row groups: row numbers still the file's
    rows = demo_rows(300, seed=8)
    rows[6]["output"], rows[259]["output"] = "", " "
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=20)
    _assert_many_parts_read_as_on_the_driver(_run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0"))


def _csv_text(rows: list[dict], blank_every: int) -> str:
    """Records that end in \r\n, with a blank line and a whitespace-only one every `blank_every` records."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    for i, row in enumerate(rows, start=1):
        writer.writerow(row)
        out.write("\r\n  \r\n" if i % blank_every == 0 else "")
    return out.getvalue()


def test_a_csv_file_in_many_parts_gives_the_drivers_rows_tokens_report_and_bad_row_numbers(local_ray, tiny_causal, tmp_path, monkeypatch):
    """Quoted cells across line ends, \r\n line ends and blank lines, cut into parts of some 3 kB: the driver path's
    tokens and report, bad rows by their numbers in the file, and cells as written ("007" and "3.10" stay text)."""
    monkeypatch.setattr(partition, "PART_BYTES", 3000)
    rows = demo_rows(300, seed=4)
    for row in rows[::7]:
        row["input"] += '\n"quoted", on a second line'
    rows[3]["output"], rows[4]["output"], rows[6]["output"], rows[259]["output"] = "007", "3.10", "", " "
    path = tmp_path / "rows.csv"
    path.write_text(_csv_text(rows, blank_every=40))
    run = _run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0")
    _assert_many_parts_read_as_on_the_driver(run)
    assert [e["target"] for e in load_examples(run.data)[0][3:5]] == ["007", "3.10"]

    path.write_text('question,answer\nq1,a1\nq2,"never closed\nq3,a3\n')  # seen in the driver's first rows
    with pytest.raises(DataError, match=r"rows\.csv: not valid CSV: .*EOF inside string"):
        on_ray.prepare(run, _prompting(run))
    padded = [{"input": f"q{i} " + "x" * 200, "output": f"a{i}"} for i in range(2000)]
    path.write_text(_csv_text(padded, blank_every=500) + 'q,"never closed\n')  # beyond what pandas reads for them
    with pytest.raises(DataError, match=r"rows\.csv: rows \d+ to 2001 are not valid CSV: .*EOF inside string"):
        on_ray.prepare(run, _prompting(run))


def test_an_s3_prefix_of_jsonl_parts_is_read_on_the_cluster(local_ray, s3, tiny_causal, monkeypatch):
    monkeypatch.setattr(partition, "PART_BYTES", 1000)  # each object read in byte ranges
    fs, root = pafs.FileSystem.from_uri(f"{s3}/rows")
    rows = demo_rows(90, seed=2)
    for part in range(3):
        with fs.open_output_stream(f"{root}/part-{part}.jsonl") as out:
            out.write("".join(json.dumps(r) + "\n" for r in rows[part * 30 : (part + 1) * 30]).encode())
    run = _run(tiny_causal, f"{s3}/rows", "data.validation_fraction=0.2")
    streamed = on_ray.prepare(run, _prompting(run))
    held_out = streamed.report["validation"]["rows"]
    assert streamed.report["rows_read"] == 90 and streamed.train_rows + held_out == 90
    assert 5 <= held_out <= 32, "a seeded 20% share of 90 rows (binomial: 18 +- 3.8, so outside this 3.6-sigma band is a broken split)"


@pytest.mark.parametrize("alone", [True, False], ids=["the file", "in a folder"])
def test_an_empty_parquet_file_is_refused_by_name(local_ray, tiny_causal, tmp_path, alone):
    folder = tmp_path / "table"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"")
    if not alone:
        pq.write_table(pa.Table.from_pylist(demo_rows(20, seed=1)), folder / "b.parquet")
    run = _run(tiny_causal, folder / "a.parquet" if alone else folder)
    with pytest.raises(DataError, match=r"a\.parquet: the file is empty"):
        on_ray.prepare(run, _prompting(run))


def test_a_parquet_object_on_s3_is_read_in_row_group_parts(local_ray, s3, tiny_causal, monkeypatch):
    monkeypatch.setattr(partition, "PART_BYTES", 1000)
    fs, root = pafs.FileSystem.from_uri(f"{s3}/table")
    rows = demo_rows(90, seed=9)
    rows[70]["output"] = ""
    with fs.open_output_stream(f"{root}/rows.parquet") as out:
        pq.write_table(pa.Table.from_pylist(rows), out, row_group_size=10)
    run = _run(tiny_causal, f"{s3}/table", "data.validation_fraction=0", "data.bad_rows=skip")
    assert len(partition.file_parts(source_files(run.data, "parquet"), "parquet")) > 3
    streamed = on_ray.prepare(run, _prompting(run))
    assert streamed.report["rows_read"] == 90 and streamed.train_rows == 89
    assert streamed.report["bad_row_details"] == ["row 71: output: missing or empty"]


@pytest.mark.parametrize("measured", [on_ray.STATS_ROWS, 40], ids=["tokenized first", "tokenized as read"])
def test_training_streams_the_shards_and_evaluation_reads_the_same_held_out_rows(local_ray, tiny_causal, tmp_path, monkeypatch, measured):
    """Two Train workers hold both CPUs: tokenizer actors that waited for one would stall the run."""
    monkeypatch.setattr(on_ray, "STATS_ROWS", measured)
    path = _write_jsonl(tmp_path / "rows.jsonl", demo_rows(200, seed=4))
    run = _run(tiny_causal, path, f"training.output_dir={tmp_path / 'out'}", f"ray.storage_path={tmp_path / 'storage'}",
               "ray.num_workers=2", "training.batch_size=4", "training.eval_steps=10", "training.logging_steps=5",
               "data.validation_fraction=0.15")
    outcome = train(run)

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    train_rows = metrics["data"]["train"]["rows"]
    assert metrics["final_step"] == -(-(train_rows // 2) // 4), "one epoch: each worker's equal share in batches of 4"
    assert metrics["final_eval_loss"] < metrics["first_eval_loss"]
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert "on the cluster (Ray Data), streamed to the workers" in (tmp_path / "out" / "report.md").read_text()

    held_out = held_out_examples(run)
    assert len(held_out) == metrics["data"]["validation"]["rows"]
    every, _ = load_examples(run.data)
    expected = [e["row"] for e in every if in_validation("rows.jsonl", e["row"], run.data)]
    assert sorted(e["row"] for e in held_out) == expected


def test_a_sweep_tokenizes_once_and_its_concurrent_trials_stream_the_same_rows(local_ray, tiny_causal, tmp_path):
    """Two trials at once hold both CPUs with their Train workers: a trial that read the data again
    would wait for a CPU for ever, so finishing shows they stream the sweep's tokenized rows."""
    from tune.sweep import sweep

    path = _write_jsonl(tmp_path / "rows.jsonl", demo_rows(120, seed=5))
    run = _run(tiny_causal, path, f"training.output_dir={tmp_path / 'train'}", f"ray.storage_path={tmp_path / 'ray'}",
               "training.max_steps=6", "training.eval_steps=3", "training.logging_steps=3", "training.batch_size=4",
               f"tune.output_dir={tmp_path / 'sweep'}", "tune.search_alg=grid", "tune.scheduler=fifo", "tune.max_concurrent_trials=2",
               "tune.space={training.learning_rate: {grid: [5e-3, 1e-4]}}")
    outcome = sweep(run)
    assert sorted(r.status for r in outcome.rows) == ["completed", "completed"]
    assert (outcome.sweep_dir / "best" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_saved_dataset_folder_of_conversations_is_read_as_on_the_driver(local_ray, tiny_causal, tmp_path):
    from datasets import Dataset

    from jobs.demo_data import demo_conversations

    Dataset.from_list(demo_conversations(40, seed=6)).save_to_disk(str(tmp_path / "saved"))
    run = _run(tiny_causal, tmp_path / "saved", "data.validation_fraction=0")
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))
    assert streamed.report["layout"] == "messages" and streamed.train_rows == 40
    assert _token_rows(streamed.train) == _token_rows(driver.train)


def test_max_samples_keeps_the_first_usable_rows_as_on_the_driver(local_ray, tiny_causal, tmp_path):
    rows = demo_rows(150, seed=7)
    rows[3]["output"] = ""  # a bad row before the cut: the cut counts usable rows
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    run = _run(tiny_causal, path, "data.bad_rows=skip", "data.validation_fraction=0", "data.max_samples=100")
    streamed = on_ray.prepare(run, _prompting(run))
    driver = prepare(run.data, _prompting(run))
    assert _token_rows(streamed.train) == _token_rows(driver.train)
    assert streamed.train_rows == driver.train_rows == 100
    assert streamed.report["rows_left_out_by_max_samples"] == driver.report["rows_left_out_by_max_samples"] == 49
