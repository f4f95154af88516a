"""The training data path at scale, driver against Ray Data, in one run.

    python bench/data_scale.py [--rows 10000 100000 1000000] [--format jsonl|parquet|csv]

For each size, generated demo rows (JSONL, CSV, or Parquet in row groups of --row-group-rows) with SmolLM2's tokenizer and chat template, each in a
fresh process pinned with taskset:
- driver (`data.loader: driver`): `jobs.data.driver.prepare` (read, check, split, tokenize in the driver) on
  1 CPU and on 2 CPUs, then `ray.put` of the tokenized data for the workers;
- Ray Data (`data.loader: ray_data`): `jobs.data.ray_data.prepare` (read in Ray tasks, the JSONL file in
  2 MiB parts (CSV: parts of whole records), check in map_batches, tokenize in map_batches tasks; the driver keeps only
  counts and histograms) on a local Ray of 1 CPU and of 2 CPUs; the worker streams its shard.
Measured: rows/s of the preparation through the tokenization of every row (Ray Data tokenizes the training rows
beyond `jobs.data.ray_data.prepare.STATS_ROWS` as they are read: here the driver reads them all), in a run of its own; in the same
run, Ray Data's tokenization alone: the rows beyond STATS_ROWS per second of that stream, its tokenizer tasks already
warm (the driver path tokenizes inside its preparation, on the driver's one core); the driver's peak RSS and the time
from the start to the first collated batch in a Ray Train worker (loading the model, the same for both, is left out),
in another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import markdown_row, target, write_result  # noqa: E402  (bench/ is this script's folder)

from jobs.demo_data import demo_rows  # noqa: E402

DRIVER = """
import json, resource, sys, time
started = time.time()
import ray, ray.train, ray.train.torch
from jobs.config import load_config
from jobs.data.driver import prepare
from jobs.model import load_tokenizer
from jobs.prompting import Prompting
from jobs.train import collator

run = load_config("configs/demo.yaml", [f"data.path={sys.argv[1]}", "data.validation_fraction=0.01"])
prompting = Prompting.load(run.model)
t0 = time.time()
data = prepare(run.data, prompting)
prepare_s = time.time() - t0
rss_prepared = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if sys.argv[2] == "prepare-only":
    print(json.dumps({"prepare_s": prepare_s, "rows": len(data.train) + len(data.eval)}))
    sys.exit()
ray.init(num_cpus=2, include_dashboard=False)
ref = ray.put(data)

def first_batch(config):
    data = ray.get(config["data"])
    prompting = Prompting(load_tokenizer(run.model), "causal", True)
    batch = collator(run, prompting)([data.train[i] for i in range(run.training.batch_size)])
    assert batch["input_ids"].numel() > 0
    open(config["stamp"], "w").write(str(time.time()))  # Ray Train keeps no metrics reported without a checkpoint

stamp = sys.argv[3] + "/first-batch"
ray.train.torch.TorchTrainer(first_batch, train_loop_config={"data": ref, "stamp": stamp},
    scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
    run_config=ray.train.RunConfig(storage_path=sys.argv[3])).fit()
first_batch_at = float(open(stamp).read())
print(json.dumps({"prepare_s": prepare_s, "rows": len(data.train) + len(data.eval), "rss_prepared_mb": rss_prepared,
                  "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "first_batch_s": first_batch_at - started}))
"""


RAY_DATA = """
import json, resource, sys, time
started = time.time()
import ray, ray.train, ray.train.torch
from jobs.config import load_config
from jobs.data.ray_data.prepare import prepare
from jobs.model import load_tokenizer
from jobs.prompting import Prompting
from jobs.train import streamed_batches

run = load_config("configs/demo.yaml", [f"data.path={sys.argv[1]}", "data.validation_fraction=0.01", "data.loader=ray_data"])
prompting = Prompting.load(run.model)
ray.init(num_cpus=int(sys.argv[4]), include_dashboard=False)
t0 = time.time()
data = prepare(run, prompting)
prepare_s = time.time() - t0
rows = data.train_rows + data.report["validation"]["rows"]
if sys.argv[2] == "prepare-only":  # through the tokenization of every row: the rows beyond STATS_ROWS stream
    streaming = time.time()
    tokenized = sum(len(batch["input_ids"]) for batch in data.train.iter_batches(batch_size=4096))
    assert tokenized == data.train_rows
    done = time.time()
    measured = data.report["train"].get("token_figures_from_rows")  # tokenized in `prepare`; absent: nothing streams
    print(json.dumps({"prepare_s": done - t0, "checked_s": prepare_s, "rows": rows,
                      **({"streamed_rows": tokenized - measured, "stream_s": done - streaming} if measured else {})}))
    sys.exit()

def first_batch(config):
    prompting = Prompting(load_tokenizer(run.model), "causal", True)
    batch = next(iter(streamed_batches("train", run, prompting, shuffle=True)))
    assert batch["input_ids"].numel() > 0
    open(config["stamp"], "w").write(str(time.time()))

stamp = sys.argv[3] + "/first-batch"
ray.train.torch.TorchTrainer(first_batch, train_loop_config={"stamp": stamp}, datasets={"train": data.train},
    scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
    run_config=ray.train.RunConfig(storage_path=sys.argv[3])).fit()
first_batch_at = float(open(stamp).read())
print(json.dumps({"prepare_s": prepare_s, "rows": rows, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "first_batch_s": first_batch_at - started}))
"""


def measure(script: str, path: Path, cpus: str, mode: str, storage: Path) -> dict:
    ray_cpus = str(len(cpus.split(",")))
    command = ["taskset", "-c", cpus, sys.executable, "-c", script, str(path), mode, str(storage), ray_cpus]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {path} failed:\n{done.stderr[-3000:]}")
    # Ray forwards its workers' output to this stdout too, sometimes after the script's own last line.
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--one-cpu-up-to", type=int, default=10**9, help="skip the 1-CPU runs above this many rows")
    parser.add_argument("--loaders", nargs="+", choices=["driver", "ray_data"], default=["driver", "ray_data"])
    parser.add_argument("--format", choices=["jsonl", "parquet", "csv"], default="jsonl", help="the generated file's format")
    parser.add_argument("--row-group-rows", type=int, default=10_000, help="Parquet: rows per row group")
    args = parser.parse_args()
    paths = {name: script for key, name, script in (("driver", "driver", DRIVER), ("ray_data", "Ray Data", RAY_DATA))
             if key in args.loaders}
    results: dict[tuple[str, int], tuple[dict | None, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ray").mkdir()
        for n in args.rows:
            path = Path(tmp) / f"rows-{n}.{args.format}"
            if args.format == "parquet":
                pq.write_table(pa.Table.from_pylist(demo_rows(n, seed=0)), path, row_group_size=args.row_group_rows)
            elif args.format == "csv":
                pa.csv.write_csv(pa.Table.from_pylist(demo_rows(n, seed=0)), path)
            else:
                with path.open("w") as handle:
                    for row in demo_rows(n, seed=0):
                        handle.write(json.dumps(row) + "\n")
            for name, script in paths.items():
                one = measure(script, path, "0", "prepare-only", Path(tmp) / "ray") if n <= args.one_cpu_up_to else None
                two = measure(script, path, "0,1", "prepare-only", Path(tmp) / "ray")
                two |= {k: v for k, v in measure(script, path, "0,1", "full", Path(tmp) / "ray").items() if k != "prepare_s"}
                results[name, n] = (one, two)
                print(f"{name}, {n:,} rows: {json.dumps({'1 cpu': one, '2 cpus': two})}", flush=True)
    print("\n| path | rows | rows/s prepared, 1 CPU | 2 CPUs | 2 / 1 CPU | rows/s tokenized as they stream, 1 CPU | 2 CPUs "
          "| 2 / 1 CPU | driver peak RSS (MB) | to the first batch in a worker (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    table = []
    for (name, n), (one, two) in results.items():
        prepared = _rates(one, two, "rows", "prepare_s")
        streamed = _rates(one, two, "streamed_rows", "stream_s")
        table.append({"path": name, "rows": f"{n:,}",
                      **dict(zip(("rows/s prepared, 1 CPU", "rows/s prepared, 2 CPUs", "prepared, 2 / 1 CPU"), prepared, strict=True)),
                      **dict(zip(("rows/s tokenized as they stream, 1 CPU", "tokenized, 2 CPUs", "tokenized, 2 / 1 CPU"), streamed, strict=True)),
                      "driver peak RSS (MB)": f"{two['rss_peak_mb']:,.0f}", "to the first batch in a worker (s)": f"{two['first_batch_s']:.1f}"})
        print(markdown_row(table[-1]))
    small, large = args.rows[0], args.rows[-1]
    scaling, targets = [], []
    for name in paths:
        first, last = results[name, small][1], results[name, large][1]
        rss, batch = last["rss_peak_mb"] / first["rss_peak_mb"], last["first_batch_s"] / first["first_batch_s"]
        print(f"\n{name}, {large:,} vs {small:,} rows: driver RSS {rss:.2f}x (target <= 1.5x), "
              f"first batch {batch:.2f}x (target <= 2x)")
        if large != small:  # one size compares nothing
            scaling.append({"path": name, "rows": f"{large:,} vs {small:,}", "driver peak RSS": f"{rss:.2f}x", "to the first batch": f"{batch:.2f}x"})
        if name == "Ray Data" and large != small:  # the targets are Ray Data's; the driver path is the small-data default
            targets += [target(f"Ray Data driver RSS, {large:,} vs {small:,} rows", rss, "<=", 1.5, "x"),
                        target(f"Ray Data time to the first batch, {large:,} vs {small:,} rows", batch, "<=", 2, "x")]
    last = table[-1]
    headline = (f"{last['path']}, {last['rows']} rows, 2 / 1 CPU: prepared {last['prepared, 2 / 1 CPU']}, "
                f"tokenized {last['tokenized, 2 / 1 CPU']}").replace("**", "")
    tables = {"Rows per second, memory and the first batch": table, **({"Largest against smallest input": scaling} if scaling else {})}
    write_result("data_scale", args, tables, targets, headline=headline)


def _rates(one: dict | None, two: dict, rows: str, seconds: str) -> list[str]:
    """Three table cells: rows/s on 1 CPU, on 2 CPUs, and their ratio ("-" where not measured)."""
    r2 = two[rows] / two[seconds] if rows in two else None
    r1 = one[rows] / one[seconds] if one and rows in one else None
    return [f"{r1:,.0f}" if r1 else "-", f"{r2:,.0f}" if r2 else "-", f"**{r2 / r1:.2f}**" if r1 and r2 else "-"]


if __name__ == "__main__":
    main()
