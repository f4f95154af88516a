"""Ray integration tier: sweeps of tiny models on a local Ray."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from jobs.config import load_config
from tune.sweep import sweep

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2)
    yield
    ray.shutdown()


def _sweep_config(tiny_causal, tmp_path, name, **tune_section):
    return {
        "model": {"name": tiny_causal},
        "data": {"demo_rows": 120},
        "training": {"max_steps": 12, "eval_steps": 3, "logging_steps": 3, "batch_size": 4, "output_dir": str(tmp_path / "train")},
        "ray": {"resources_per_worker": {"CPU": 1}, "storage_path": str(tmp_path / "ray")},
        "tune": {"output_dir": str(tmp_path / name), "max_concurrent_trials": 1, **tune_section},
    }


def _load(raw, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _rows(sweep_dir):
    with open(sweep_dir / "leaderboard.csv") as handle:
        return list(csv.DictReader(handle))


def test_asha_sweep_stops_poor_trials_and_exports_a_loadable_best_adapter(local_ray, tiny_causal, tmp_path):
    # Grid order: the two good learning rates run first, so ASHA can stop the hopeless ones at step 3.
    raw = _sweep_config(tiny_causal, tmp_path, "sweep", search_alg="grid", reduction_factor=2, lora_r=[4, 8], space={"training.learning_rate": {"grid": [5e-3, 1e-6]}})
    outcome = sweep(_load(raw, tmp_path))

    rows = _rows(outcome.sweep_dir)
    assert len(rows) == 4
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(int(r["steps_run"]) < int(r["planned_steps"]) == 12 for r in stopped)
    assert {r["training.learning_rate"] for r in stopped} == {"1e-06"}
    assert outcome.summary["trial_steps"] < 4 * 12
    assert rows[0]["status"] == "completed" and float(rows[0]["best_eval_loss"]) < min(float(r["best_eval_loss"]) for r in stopped)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU") != 2 and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU") == 2, "stopped trials gave their workers' CPUs back"

    best = outcome.sweep_dir / "best"
    lineage = json.loads((best / "lineage.json").read_text())
    assert lineage["trial_id"] == rows[0]["trial_id"] and lineage["metrics"]["eval_loss"] == pytest.approx(float(rows[0]["best_eval_loss"]))
    assert lineage["config"]["lora"]["r"] == int(rows[0]["lora.r"]) and lineage["config"]["lora"]["alpha"] == 2 * int(rows[0]["lora.r"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal), best / "adapter")
    assert model.peft_config["default"].r == int(rows[0]["lora.r"])
    assert load_config(best / "config.yaml").lora.r == int(rows[0]["lora.r"]), "best/config.yaml is a run config for lorafleet eval/serve"

    board = (outcome.sweep_dir / "leaderboard.md").read_text()
    assert board.count("stopped early") == len(stopped) and "## Best trial" in board
    assert (outcome.sweep_dir / "curves.png").stat().st_size > 10_000
    assert list((outcome.sweep_dir / "trials").glob("*/events.out.tfevents.*")), "TensorBoard logs for every trial"


def test_failed_trials_are_retried_then_listed_as_failed(local_ray, tiny_causal, tmp_path):
    raw = _sweep_config(tiny_causal, tmp_path, "failing", search_alg="grid", scheduler="fifo", trial_retries=1, target_modules=[["q_proj"], ["no_such_module"]])
    raw["training"]["max_steps"] = 3
    outcome = sweep(_load(raw, tmp_path))

    rows = {r["lora.target_modules"]: r for r in _rows(outcome.sweep_dir)}
    assert rows["q_proj"]["status"] == "completed" and rows["q_proj"]["attempts"] == "1"
    failed = rows["no_such_module"]
    assert failed["status"] == "failed" and failed["attempts"] == "2" and failed["best_eval_loss"] == ""
    assert "no_such_module" in failed["error"] or "Target modules" in failed["error"]
    assert "## Failed trials" in (outcome.sweep_dir / "leaderboard.md").read_text()
    assert json.loads((outcome.sweep_dir / "best" / "lineage.json").read_text())["params"]["lora.target_modules"] == "q_proj"


def test_resume_needs_a_sweep_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tune", "--resume", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no sweep.yaml there" in " ".join(result.stderr.split())
