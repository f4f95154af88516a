"""Ray integration tier: a sweep whose driver is killed mid-way resumes with --resume.

Its own module: the driver runs in a subprocess with its own embedded Ray, and no other Ray
instance may be alive on the machine meanwhile (Ray Train's placement-group cleaner refuses
to pick between two).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_tune_ray import REPO, _rows, _sweep_config

pytestmark = pytest.mark.ray


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _terminated(trials: Path) -> set[str]:
    """Trials that Tune's saved experiment state records as finished."""
    done = set()
    for state in trials.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except json.JSONDecodeError:  # caught mid-write
            continue
        done |= {info["trial_id"] for info in (json.loads(entry[0]) for entry in data["trial_data"]) if info.get("status") == "TERMINATED"}
    return done


def test_interrupted_sweep_resumes_without_redoing_finished_trials(tiny_causal, tmp_path):
    raw = _sweep_config(tiny_causal, tmp_path, "resumable", search_alg="grid", scheduler="fifo", space={"training.learning_rate": {"grid": [5e-3, 2e-3, 1e-3]}})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen([sys.executable, "-m", "tune", "--config", str(config)], cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "resumable" / "trials"
    deadline = time.time() + 400
    while time.time() < deadline and not _terminated(trials):
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its embedded Ray die at once
    driver.wait()
    finished = {d.name: len(_results(d)) for d in trials.glob("run_trial_*") if any(t in d.name for t in _terminated(trials))}
    assert finished, "a trial finished before the driver was killed"
    assert len(finished) < 3, "the kill interrupted the sweep"
    assert not (tmp_path / "resumable" / "leaderboard.csv").exists()

    resumed = subprocess.run([sys.executable, "-m", "tune", "--resume", str(tmp_path / "resumable")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(tmp_path / "resumable")
    assert len(rows) == 3 and all(r["status"] == "completed" and r["steps_run"] == "12" for r in rows)
    for name, count in finished.items():
        assert len(_results(trials / name)) == count, f"{name} finished before the kill and was not run again"
    assert (tmp_path / "resumable" / "best" / "adapter" / "adapter_model.safetensors").exists()
