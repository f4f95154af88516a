"""Today's training data path at scale: the driver reads every row, tokenizes on its own core, and
ships the tokenized dataset to the workers through the object store (`ray.put`).

    python bench/data_scale.py [--rows 10000 100000 1000000]

For each size, generated demo rows (JSONL) with SmolLM2's tokenizer and chat template, in a fresh
process: `jobs.data.prepare` (read, check, split, tokenize) pinned to 1 CPU and to 2 CPUs (taskset), rows/s; the
driver's peak RSS once the data is prepared and `ray.put`; the time from the start to the first
batch a Ray Train worker gets (its `ray.get` of the dataset and one collated batch; loading the model,
the same for any data path, is left out). The Ray Data path of issue 18 is not built; this is the
baseline it is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.demo_data import demo_rows  # noqa: E402

SCRIPT = """
import json, resource, sys, time
started = time.time()
import ray, ray.train, ray.train.torch
from jobs.config import load_config
from jobs.data import prepare
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


def measure(path: Path, cpus: str, mode: str, storage: Path) -> dict:
    done = subprocess.run(["taskset", "-c", cpus, sys.executable, "-c", SCRIPT, str(path), mode, str(storage)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--one-cpu-up-to", type=int, default=10**9, help="skip the 1-CPU run above this many rows")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ray").mkdir()
        for n in args.rows:
            path = Path(tmp) / f"rows-{n}.jsonl"
            with path.open("w") as handle:
                for row in demo_rows(n, seed=0):
                    handle.write(json.dumps(row) + "\n")
            one = measure(path, "0", "prepare-only", Path(tmp) / "ray") if n <= args.one_cpu_up_to else None
            two = measure(path, "0,1", "full", Path(tmp) / "ray")
            results[n] = (one, two)
            print(f"{n:,} rows: {json.dumps({'1 cpu': one, '2 cpus': two})}", flush=True)
    print("\n| rows | rows/s read, checked and tokenized (prepare), 1 CPU | 2 CPUs | ratio | driver peak RSS (MB) | to the first batch in a worker (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, (one, two) in results.items():
        r2 = two["rows"] / two["prepare_s"]
        r1 = f"{one['rows'] / one['prepare_s']:,.0f}" if one else "-"
        ratio = f"{r2 / (one['rows'] / one['prepare_s']):.2f}" if one else "-"
        print(f"| {n:,} | {r1} | {r2:,.0f} | {ratio} | {two['rss_peak_mb']:,.0f} | {two['first_batch_s']:.1f} |")
    first, last = results[args.rows[0]][1], results[args.rows[-1]][1]
    print(f"\n{args.rows[-1]:,} vs {args.rows[0]:,} rows: driver RSS {last['rss_peak_mb'] / first['rss_peak_mb']:.2f}x (target <= 1.5x), "
          f"first batch {last['first_batch_s'] / first['first_batch_s']:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
