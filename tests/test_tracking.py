"""Experiment tracking: a real MLflow tracking server (SQLite, loopback), TensorBoard event files
read back with TensorBoard's own EventAccumulator, W&B in offline mode read back from its run file."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from jobs.config import ConfigError, load_config
from jobs.train import train
from tests.subprocesses import free_port
from tests.wandb_records import artifacts, history, run_info
from tune.sweep import sweep

SECRETS = {"MLFLOW_TRACKING_TOKEN": "mlflow-token-0123456789-do-not-log", "WANDB_API_KEY": "wandb0123456789abcdef0123456789abcdef012345"}


def _overrides(tiny_causal, out, *extra):
    return [f"model.name={tiny_causal}", f"training.output_dir={out}", "data.demo_rows=80", *extra]


def test_credentials_in_the_tracking_uri_are_refused_without_being_shown():
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["tracking.backends=[mlflow]", "tracking.mlflow_tracking_uri=https://alice:hunter2secret@mlflow.example.com"])
    message = str(raised.value)
    assert "tracking.mlflow_tracking_uri = 'https://***@mlflow.example.com'" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "hunter2secret" not in message


def test_parameters_are_the_resolved_config_without_the_serve_key():
    from jobs.tracking import flat_params

    run = load_config(None, ["serve.api_key=sk-do-not-log-0123456789", "lora.r=4", "data.columns={prompt: question}"])
    params = flat_params(run)
    assert params["lora.r"] == "4" and params["training.learning_rate"] == "0.0002" and params["data.columns"] == '{"prompt": "question"}'
    assert not any("sk-do-not-log" in value for value in params.values())
    assert "tune.metric" not in params and "tune.metric" in flat_params(run, sweep=True)


def test_a_retried_trial_and_a_resumed_sweep_write_on_in_their_own_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = load_config(None, ["tracking.backends=[mlflow]", f"tracking.mlflow_tracking_uri={uri}", "tracking.mlflow_experiment=resume"])
    parent = tracking.start(run, tmp_path / "sweep", kind="sweep")
    tracking.save(parent, tmp_path)
    first = tracking.start(run, tmp_path / "sweep", kind="trial", parent=parent, trial="abc_00000")
    again = tracking.start(run, tmp_path / "sweep", kind="trial", parent=tracking.resumed(tmp_path), trial="abc_00000")
    other = tracking.start(run, tmp_path / "sweep", kind="trial", parent=parent, trial="abc_00001")
    assert again.mlflow_run_id == first.mlflow_run_id != other.mlflow_run_id
    assert tracking.resumed(tmp_path) == parent
    client = MlflowClient(uri)
    assert len(client.search_runs([parent.mlflow_experiment_id])) == 3
    tracking.close_unfinished_trials(parent)
    assert {client.get_run(r.mlflow_run_id).info.status for r in (first, other)} == {"FINISHED"}


def test_an_unreachable_mlflow_server_is_a_config_error_before_ray_starts(tiny_causal, tmp_path):
    port = free_port()  # nothing listens there
    run = load_config(None, _overrides(tiny_causal, tmp_path / "out", "tracking.backends=[mlflow]", f"tracking.mlflow_tracking_uri=http://127.0.0.1:{port}"))
    with pytest.raises(ConfigError) as raised:
        train(run)
    assert f"tracking.mlflow_tracking_uri = 'http://127.0.0.1:{port}': cannot reach it" in str(raised.value)
    assert "mlflow server" in str(raised.value)
    assert not ray.is_initialized()


def test_wandb_online_without_an_api_key_is_a_config_error_before_ray_starts(tiny_causal, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = load_config(None, _overrides(tiny_causal, tmp_path / "out", "tracking.backends=[wandb]", "tracking.wandb_mode=online"))
    with pytest.raises(ConfigError, match="tracking.wandb_mode = 'online': no W&B API key: set WANDB_API_KEY"):
        train(run)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite store and served artifacts, on a loopback port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert server.poll() is None, (root / "server.log").read_text()
    else:
        server.kill()
        raise AssertionError("mlflow server did not start in 120 s:\n" + (root / "server.log").read_text())
    yield url, root
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def tracked_ray():
    """A local Ray whose workers see the tracker credentials, as a job's runtime env would give them."""
    saved = {name: os.environ.get(name) for name in SECRETS}
    os.environ.update(SECRETS)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    for name, value in saved.items():
        os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def _metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def _no_secret_in(folders):
    files = [p for folder in folders for p in Path(folder).rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [f"{p}: {name}" for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert not leaks, leaks


@pytest.mark.ray
def test_a_two_worker_run_is_one_run_in_mlflow_tensorboard_and_wandb(tracked_ray, mlflow_server, tiny_causal, tmp_path, capfd):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    url, server_root = mlflow_server
    out = tmp_path / "run"
    run = load_config(None, _overrides(
        tiny_causal, out, "ray.num_workers=2", f"ray.storage_path={tmp_path / 'ray'}", "training.max_steps=8",
        "training.eval_steps=4", "training.logging_steps=2", "training.batch_size=4", "eval.metrics=[rouge]",
        "eval.during_training_samples=2", "eval.max_new_tokens=4", "tracking.backends=[mlflow, tensorboard, wandb]",
        f"tracking.mlflow_tracking_uri={url}", "tracking.mlflow_experiment=two-workers", "tracking.wandb_mode=offline",
        "lora.r=4"))
    train(run)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("two-workers")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one run per job, however many workers"
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["lora.r"] == "4" and mlrun.data.params["training.max_steps"] == "8"
    assert mlrun.data.params["model.name"] == tiny_causal
    run_id = mlrun.info.run_id
    assert _metric_steps(client, run_id, "loss") == [2, 4, 6, 8]  # once per logging step: rank 0 only
    assert _metric_steps(client, run_id, "eval_loss") == [4, 8]
    assert _metric_steps(client, run_id, "eval_rougeL") == [4, 8]  # task metrics, computed after the eval log
    assert _metric_steps(client, run_id, "learning_rate") == [2, 4, 6, 8]
    tokens = [m.value for m in client.get_metric_history(run_id, "num_input_tokens_seen")]
    assert len(tokens) >= 4 and tokens == sorted(tokens) and tokens[0] > 0
    stored = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"report.md", "loss.png", "metrics.json", "config.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= stored

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8] and [e.step for e in events.Scalars("eval/rougeL")] == [4, 8]
    assert "train/learning_rate" in scalars
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1, "one writer: rank 0"

    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    # One W&B run: the rank-0 worker's file with the history, and the driver's with the artifacts (same id).
    assert len(files) == 2 and len({run_info(f)["id"] for f in files}) == 1, files
    assert sum(1 for f in files if history(f)) == 1
    rows = [row for f in files for row in history(f)]
    assert [r["train/global_step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    assert [r["train/global_step"] for r in rows if "eval/rougeL" in r] == [4, 8]
    config = run_info(files[0])["config"]
    assert config["lora.r"] == "4"
    logged = {name: found for f in files for name, found in artifacts(f).items()}
    assert {"report.md", "loss.png", "metrics.json"} <= logged["run-report"][1] and logged["run-report"][0] == "report"
    assert "adapter_model.safetensors" in logged["run-adapter"][1] and logged["run-adapter"][0] == "model"

    _no_secret_in([out, server_root, Path("/tmp/ray/session_latest/logs")])
    printed = capfd.readouterr()
    assert not [name for name, value in SECRETS.items() if value in printed.out + printed.err]


@pytest.mark.ray
def test_a_sweep_is_a_parent_run_with_one_child_per_trial(tracked_ray, mlflow_server, tiny_causal, tmp_path):
    from mlflow.tracking import MlflowClient

    url, _ = mlflow_server
    raw = {
        "model": {"name": tiny_causal},
        "data": {"demo_rows": 80},
        "training": {"max_steps": 6, "eval_steps": 3, "logging_steps": 3, "batch_size": 4, "output_dir": str(tmp_path / "train")},
        "ray": {"resources_per_worker": {"CPU": 1}, "storage_path": str(tmp_path / "ray")},
        "tune": {"output_dir": str(tmp_path / "sweep"), "search_alg": "grid", "scheduler": "fifo", "max_concurrent_trials": 2,
                 "space": {"training.learning_rate": {"grid": [5e-3, 1e-4]}}},
        "tracking": {"backends": ["mlflow", "tensorboard", "wandb"], "mlflow_tracking_uri": url, "mlflow_experiment": "sweeps", "wandb_mode": "offline"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    outcome = sweep(load_config(path))

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "sweep"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert sorted(c.data.params["training.learning_rate"] for c in children) == ["0.0001", "0.005"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert _metric_steps(client, child.info.run_id, "eval_loss") == [3, 6]
    assert parent.data.params["tune.metric"] == "eval_loss"
    stored = {a.path for a in client.list_artifacts(parent.info.run_id)} | {a.path for a in client.list_artifacts(parent.info.run_id, "adapter")}
    assert {"leaderboard.md", "leaderboard.csv", "curves.png", "adapter/adapter_model.safetensors"} <= stored
    # W&B: the trials share the group named after the sweep; the sweep's own run holds the leaderboard and best adapter.
    runs_by_file = {f: run_info(f) for f in (outcome.sweep_dir / "wandb").glob("offline-run-*/run-*.wandb")}
    trials = [info for info in runs_by_file.values() if info["job_type"] == "trial"]
    assert len({info["id"] for info in trials}) == 2 and {info["group"] for info in runs_by_file.values()} == {"sweep"}
    assert all(history(f) for f, info in runs_by_file.items() if info["job_type"] == "trial")
    sweep_files = [f for f, info in runs_by_file.items() if info["job_type"] == "sweep"]
    logged = {name: found for f in sweep_files for name, found in artifacts(f).items()}
    assert {"leaderboard.md", "curves.png"} <= logged["sweep-report"][1] and "adapter_model.safetensors" in logged["sweep-adapter"][1]
    trial_dirs = sorted(p.name for p in (outcome.sweep_dir / "tensorboard").iterdir())
    assert len(trial_dirs) == 2 and all(list((outcome.sweep_dir / "tensorboard" / d).glob("events.out.tfevents.*")) for d in trial_dirs)
