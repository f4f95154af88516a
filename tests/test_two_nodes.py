"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`: a head and worker nodes, each its own
raylet and object store), checkpoints on S3 (the local moto server): the two Train workers are
placed on different nodes (STRICT_SPREAD), the second node is killed mid-run, a replacement
joins, and the run resumes from the latest S3 checkpoint and completes; a sweep's two trials run
on the two nodes and the best adapter is exported."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from ray.cluster_utils import Cluster

from jobs.config import load_config
from jobs.train import train
from tune.sweep import sweep

pytestmark = pytest.mark.ray
NODE = {"num_cpus": 1}


@pytest.fixture
def cluster(s3):
    """A head and one worker node, one CPU each; the test process is the driver on the head. After
    `s3`: the raylets, and so every worker, inherit its endpoint and keys."""
    nodes = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    second = nodes.add_node(**NODE)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address)
    yield nodes, second
    ray.shutdown()
    nodes.shutdown()


def _registered_checkpoint(storage: str) -> str | None:
    """The latest checkpoint Ray Train's controller has registered (what a retry resumes from), read
    from its snapshot in the run's folder on S3 (named `<ray.name>-<timestamp>`). A checkpoint's files
    on S3 are not enough: the worker uploads them before reporting, and a node killed between the
    two leaves a checkpoint the retry never sees."""
    fs, root = pafs.FileSystem.from_uri(storage)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in found:
        if info.base_name == "checkpoint_manager_snapshot.json":
            with fs.open_input_stream(info.path) as stream:
                latest = json.loads(stream.read()).get("latest_checkpoint_result")
            return latest and latest["checkpoint_dir_name"]
    return None


def _kill_after_first_checkpoint(nodes: Cluster, node, storage: str, events: dict) -> None:
    """Kills `node` (raylet and every process on it) once a checkpoint is registered, then starts a
    replacement with `ray start --address` (Cluster.add_node installs signal handlers: main thread only)."""
    deadline = time.time() + 300
    while time.time() < deadline and not _registered_checkpoint(storage):
        time.sleep(0.2)
    events["checkpoint_at_kill"] = _registered_checkpoint(storage)
    nodes.remove_node(node, allow_graceful=False)
    events["killed"] = node.node_id
    ray_cli = str(Path(sys.executable).with_name("ray"))
    events["replacement"] = subprocess.Popen(
        [ray_cli, "start", "--address", nodes.address, "--num-cpus", "1", "--block", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_workers_on_two_nodes_survive_losing_one_and_resume_from_s3(cluster, s3, tiny_causal, tmp_path):
    nodes, second = cluster
    storage = f"{s3}/two-nodes"
    out = tmp_path / "run"
    run = load_config(None, [
        f"model.name={tiny_causal}", f"training.output_dir={out}", f"ray.storage_path={storage}", "ray.name=two-nodes",
        "ray.num_workers=2", "ray.placement_strategy=STRICT_SPREAD", "ray.max_failures=1", "data.demo_rows=400",
        "training.max_steps=300", "training.eval_steps=20", "training.logging_steps=20", "training.batch_size=2",
        "training.learning_rate=5e-3", "training.keep_checkpoints=2",
    ])
    events: dict = {}
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(nodes, second, storage, events), daemon=True)
    killer.start()
    try:
        outcome = train(run)
        killer.join(60)
        replacement = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - {nodes.head_node.node_id, second.node_id}
    finally:
        if "replacement" in events:
            events["replacement"].terminate()
            events["replacement"].wait(60)

    assert events.get("killed") == second.node_id, events
    assert len(replacement) == 1, ray.nodes()
    metrics = json.loads((out / "metrics.json").read_text())
    attempts = metrics["worker_nodes"]
    assert len(attempts) == 2, f"one attempt before the node was lost, one after: {attempts}"
    first, resumed = attempts
    assert len(set(first)) == 2 and second.node_id in first, "STRICT_SPREAD: one worker per node"
    assert set(resumed) == {nodes.head_node.node_id, *replacement}, "the resumed attempt: the head and the new node"
    assert metrics["resumed_from_steps"] and metrics["resumed_from_steps"][0] >= 20
    assert metrics["steps"] == 300 and metrics["final_step"] == 300
    assert metrics["checkpoint"].startswith(storage.removeprefix("s3://")) or metrics["checkpoint"].startswith(storage)
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert "| Ray nodes the workers ran on (per attempt) | 2, 2 |" in (out / "report.md").read_text()


def test_a_sweep_runs_its_trials_on_both_nodes_and_exports_the_best(cluster, s3, tiny_causal, tmp_path):
    nodes, second = cluster
    run = load_config(None, [
        f"model.name={tiny_causal}", "data.demo_rows=80", f"training.output_dir={tmp_path / 'train'}",
        "training.max_steps=6", "training.eval_steps=3", "training.logging_steps=3", "training.batch_size=4",
        f"ray.storage_path={s3}/two-node-sweep", f"tune.output_dir={tmp_path / 'sweep'}", "tune.search_alg=grid",
        "tune.scheduler=fifo", "tune.max_concurrent_trials=2", "tune.space={training.learning_rate: {grid: [5e-3, 1e-4]}}",
    ])
    outcome = sweep(run)

    results = [json.loads(line) for path in (outcome.sweep_dir / "trials").glob("*/result.json") for line in path.read_text().splitlines()]
    per_trial = {r["trial_id"]: tuple(r["worker_nodes"]) for r in results}
    assert len(per_trial) == 2
    assert {node for trial in per_trial.values() for node in trial} == {nodes.head_node.node_id, second.node_id}
    assert (outcome.sweep_dir / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert outcome.summary["best"]["trial_id"] in per_trial
