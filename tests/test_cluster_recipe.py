"""The cluster guide's local recipe (docs/guides/cluster.md), run as written in a fresh HOME, and the warning lorafleet
prints when it joins a cluster that checks no token. Real `ray start` clusters on loopback."""

import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tests.subprocesses import free_port, output, run, run_ok

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARK = "<!-- local-cluster-recipe"
AUTH_OFF = "runs with token authentication OFF"


def recipe() -> list[str]:
    """The cluster guide's block after the marker, one command a line (continuations joined)."""
    text = (REPO / "docs" / "guides" / "cluster.md").read_text()
    block = text[text.index(MARK):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def fresh_user_env(home: Path) -> dict[str, str]:
    """A new user's shell: an empty HOME and no RAY_* variables (the test process's own Ray sets some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "PATH": f"{BIN}:{env['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _tiny_run(tiny_causal, out: Path) -> list[str]:
    return [f"model.name={tiny_causal}", "data.demo_rows=60", "data.max_source_length=48", "data.max_target_length=24", "training.max_steps=2",
            "training.eval_steps=2", "training.logging_steps=1", "training.batch_size=4", f"training.output_dir={out}",
            "ray.resources_per_worker={CPU: 1}", f"ray.storage_path={out.parent / 'ray'}"]


def test_the_readme_recipe_starts_a_cluster_that_refuses_jobs_without_the_token(tiny_causal, tmp_path):
    lines = recipe()
    assert [line.split()[:2] for line in lines] == [["ray", "get-auth-token"], ["ray", "start"], ["export", "RAY_AUTH_MODE=token"], ["ray", "job"]]
    for port in (6379, 8265):  # the recipe uses Ray's default ports
        assert _free(port), f"port {port} is in use; the README recipe needs it free (stop the Ray or service holding it)"
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_user_env(home)
    out = tmp_path / "train"
    try:
        run_ok(["bash", "-ec", "\n".join(lines[:2])], env=env, cwd=REPO, timeout=180)
        assert (home / ".ray" / "auth_token").is_file()
        submit = [BIN / "ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--", "echo", "hi"]
        without = run(submit, env=env, timeout=120)
        assert without.returncode != 0 and "Missing authentication token" in without.stdout + without.stderr, output(without)
        wrong = run(submit, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}, timeout=120)
        assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr, output(wrong)
        # The rest as written; only the submit line gets the tiny model's overrides appended.
        done = run_ok(["bash", "-ec", "\n".join(lines[2:]) + " " + shlex.join(_tiny_run(tiny_causal, out))], env=env, cwd=REPO, timeout=600)
        assert "succeeded" in done.stdout + done.stderr, output(done)
        assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    finally:
        run([BIN / "ray", "stop", "--force"], env=env, timeout=120)


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory):
    """`ray start --head` where no token exists: Ray starts it with authentication off."""
    env = fresh_user_env(tmp_path_factory.mktemp("open-home"))
    dashboard, gcs = free_port(), free_port()
    run_ok([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2",
            "--disable-usage-stats"], env=env, timeout=180)
    yield {"dashboard": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "env": env}
    run([BIN / "ray", "stop", "--force"], env=env, timeout=120)


def test_lorafleet_submit_warns_about_a_cluster_without_authentication(open_cluster, tiny_causal, tmp_path):
    lorafleet = shutil.which("lorafleet", path=str(BIN))
    done = run([lorafleet, "submit", "train", "--no-wait", "--address", open_cluster["dashboard"], "--config", "configs/demo.yaml",
                *_tiny_run(tiny_causal, tmp_path / "train")], env=open_cluster["env"], cwd=REPO, timeout=300)
    assert done.returncode == 0, output(done)
    assert f"the Ray cluster at {open_cluster['dashboard']} {AUTH_OFF}" in done.stderr, output(done)
    assert done.stderr.index(AUTH_OFF) < done.stderr.index("submitted"), "the warning comes before the submission"


def test_lorafleet_serve_warns_about_a_cluster_without_authentication(open_cluster, tiny_causal):
    lorafleet = shutil.which("lorafleet", path=str(BIN))
    done = run([lorafleet, "serve", "--config", "configs/demo.yaml", f"model.name={tiny_causal}", f"ray.address={open_cluster['gcs']}",
                f"serve.port={free_port()}", "serve.replica_resources={CPU: 0.5}"], env=open_cluster["env"], cwd=REPO, timeout=300)
    assert done.returncode == 0, output(done)
    assert AUTH_OFF in done.stderr and "serving http://" in done.stdout, output(done)
