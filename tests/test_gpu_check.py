"""bench/gpu_check.py --dry-run: the GPU acceptance script keeps working on CPU, every check printing its row."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("qlora-train", "adapter-reload", "serve-two-adapters", "packing-sdpa", "packing-flash_attention_2", "speed-1b", "ray-train", "serve-auto-vllm")
GPU_ONLY = ("packing-flash_attention_2", "serve-auto-vllm")


@pytest.mark.ray
def test_the_gpu_check_passes_its_dry_run_with_a_row_per_check(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO, env={**env, "LORAFLEET_BENCH_RESULTS": str(tmp_path / "results")},
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines() if line.startswith("| ") and line.count("|") > 4}
    assert {name: rows.get(name) for name in CHECKS} == {name: "skip" if name in GPU_ONLY else "pass" for name in CHECKS}, output[-6000:]
    assert not (tmp_path / "results").exists()  # a dry run's figures are no GPU's: no result file
