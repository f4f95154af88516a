"""Job submission against a real single-node cluster: `ray start --head` on loopback, token auth on."""

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.subprocesses import free_port, output, run, run_ok

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster's own token in its own HOME: never the user's ~/.ray, never one an earlier run left.
    Its own Ray temp dir, removed at the end: the --install job's pip runtime env is a copy of the whole
    virtualenv (some 4 GB) that `ray stop` leaves behind, and a few CI runs filled the disk with them.
    A short path under /tmp: Ray's unix sockets live in it."""
    home = tmp_path_factory.mktemp("cluster-home")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    run_ok([BIN / "ray", "get-auth-token", "--generate"], env=env)
    dashboard = free_port()
    run_ok([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--dashboard-port={dashboard}",
            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"], env=env, timeout=180)
    yield f"http://127.0.0.1:{dashboard}", env, temp
    run([BIN / "ray", "stop", "--force"], env=env)
    shutil.rmtree(temp, ignore_errors=True)


def _overrides(tiny_causal, out: Path) -> list[str]:
    return [f"model.name={tiny_causal}", "data.demo_rows=60", "data.max_source_length=48", "data.max_target_length=24", "training.max_steps=4",
            "training.eval_steps=2", "training.logging_steps=2", "training.batch_size=4", f"training.output_dir={out}",
            "ray.resources_per_worker={CPU: 1}", f"ray.storage_path={out.parent / 'ray'}"]


def test_ray_job_submit_runs_the_train_job_to_success(cluster, tiny_causal, tmp_path):
    address, env, _ = cluster
    out = tmp_path / "train"
    done = run([BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
                "--runtime-env-json", '{"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}',
                "--", "python", "-m", "jobs.train", "--config", "configs/demo.yaml", *_overrides(tiny_causal, out)],
               env=env, timeout=600)
    assert done.returncode == 0, output(done)
    assert "succeeded" in done.stdout + done.stderr, output(done)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()


def test_lorafleet_submit_reports_a_failed_job_and_its_error(cluster, tiny_causal, tmp_path):
    address, env, _ = cluster
    lorafleet = shutil.which("lorafleet", path=str(BIN))
    failing = {**env, "LORAFLEET_FAIL_AT": "0:1"}  # the test hook kills rank 0 at step 1; max_failures is 0
    done = run([lorafleet, "submit", "train", "--address", address, "--config", "configs/demo.yaml", "--env", "LORAFLEET_FAIL_AT",
                *_overrides(tiny_causal, tmp_path / "train")], env=failing, timeout=600, cwd=REPO)
    assert done.returncode == 1, output(done)
    job_id = re.search(r"submitted (\S+):", done.stderr).group(1)
    assert "FAILED: Job entrypoint command failed with exit code 1" in done.stderr, output(done)
    assert "authentication OFF" not in done.stderr, output(done)
    status = run([lorafleet, "jobs", "status", job_id, "--address", address], env=env)
    assert status.returncode == 1 and "FAILED" in status.stdout, output(status)
    logs = run([lorafleet, "jobs", "logs", job_id, "--address", address], env=env)
    assert "training failed" in logs.stdout, output(logs)
    listed = run([lorafleet, "jobs", "list", "--address", address], env=env)
    assert job_id in listed.stdout, output(listed)


def test_submit_install_runs_the_job_in_a_pip_runtime_env(cluster, tiny_causal, tmp_path):
    """--install: Ray's pip plugin builds a virtualenv with the pinned dependencies and the job runs
    in it. RAY_AUTH_MODE is left unset, as a user would: lorafleet finds the token `ray start` wrote."""
    address, env, temp = cluster
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    lorafleet = shutil.which("lorafleet", path=str(BIN))
    out = tmp_path / "train"
    done = run([lorafleet, "submit", "train", "--install", "--address", address, "--config", "configs/demo.yaml", *_overrides(tiny_causal, out)],
               env=env, timeout=900, cwd=REPO)
    assert done.returncode == 0, output(done)
    assert "SUCCEEDED" in done.stderr, output(done)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    venvs = list(Path(temp, "session_latest/runtime_resources/pip").glob("*/virtualenv/bin/python"))
    assert venvs, "no pip runtime env was built"
    assert "runtime_resources/pip/" in done.stdout + done.stderr, "the job did not run in the pip virtualenv"  # the entry prints its python


def test_a_bad_config_is_refused_before_anything_is_submitted(cluster):
    address, env, _ = cluster
    lorafleet = shutil.which("lorafleet", path=str(BIN))
    done = run([lorafleet, "submit", "train", "--address", address, "--config", "configs/demo.yaml", "lora.r=-4"],
               env=env, cwd=REPO)
    assert done.returncode == 2 and "lora.r = -4" in done.stderr, output(done)
    assert "submitted" not in done.stderr


def test_the_pipeline_job_trains_evaluates_deploys_and_answers(cluster, tiny_causal, tmp_path):
    """Also the secret check: the API key, given in the config file, appears in no output, report,
    saved config, job log or Ray log of the run, and the deployed app insists on it."""
    address, env, temp = cluster
    out = tmp_path / "pipeline"
    port = free_port()
    secret = "sk-lorafleet-0123456789-do-not-log"
    config = tmp_path / "with-key.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text() + f"serve:\n  api_key: {secret}\n")
    done = run([BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
                "--runtime-env-json", '{"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}',
                "--", "python", "-m", "jobs.pipeline", "--config", str(config), *_overrides(tiny_causal, out),
                "eval.max_new_tokens=8", f"serve.port={port}", "serve.replica_resources={CPU: 0.5}"],
               env=env, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, output(done)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "eval" / "eval.md").is_file()
    assert "| metric | base | adapter | delta |" in log  # the eval table, base against adapter
    assert "smoke request (/chat/completions, model 'pipeline')" in log and f"endpoint: http://localhost:{port}/v1" in log
    import httpx

    url = f"http://127.0.0.1:{port}/v1/models"  # on a cluster the app outlives the job
    assert httpx.get(url, timeout=30).status_code == 401
    models = httpx.get(url, headers={"Authorization": f"Bearer {secret}"}, timeout=30).json()
    assert "pipeline" in [m["id"] for m in models["data"]]

    assert secret not in log
    written = [p for p in [*out.parent.rglob("*"), *Path(temp, "session_latest/logs").rglob("*")] if p.is_file() and p != config]
    assert len(written) > 20
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
