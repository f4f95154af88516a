"""`lorafleet serve` stops cleanly: SIGTERM (Kubernetes) or Ctrl-C with requests in flight lets them finish,
refuses new ones with a 503 in OpenAI's format, and exits 0 with a log line per step (a real process, its embedded
Ray and Serve)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from tests.subprocesses import free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
IN_FLIGHT = 4


def _slow_llama(tiny_causal: str, folder: Path) -> Path:
    """The tiny model's tokenizer on a wider, deeper random Llama: a few hundred tokens take seconds on a CPU, so
    requests are still in flight when the signal comes."""
    small = AutoConfig.from_pretrained(tiny_causal)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=small.vocab_size, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=small.pad_token_id, eos_token_id=small.eos_token_id,
                         bos_token_id=small.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_causal) / name, folder / name)
    return folder


def _wait_for(line: str, lines: list[str], process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if any(line in seen for seen in lines):
            return
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the server never printed {line!r}:\n{''.join(lines)[-4000:]}")


def _in_flight(base: str) -> float:
    lines = httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith("lorafleet_requests_in_flight "))


def _sigterm(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # what Kubernetes sends the container's process


def _ctrl_c(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group, Ray's processes too


@pytest.mark.parametrize("stop", [_sigterm, _ctrl_c], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_drains_requests_in_flight_refuses_new_ones_and_exits_0(tiny_causal, tmp_path, stop):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(_slow_llama(tiny_causal, tmp_path / "slow-llama"))},
        "quantization": {"mode": "none"},
        "serve": {"port": port, "engine": "hf", "max_tokens_limit": 512, "drain_timeout_s": 120, "replica_resources": {"CPU": 1}},
    }))
    process = subprocess.Popen([sys.executable, "-m", "serve", "--config", str(config)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        _wait_for("embedded Ray: the app stops with this process", lines, process, 300)
        body = {"model": "slow-llama", "prompt": "first second third", "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            answers = [pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=300) for _ in range(IN_FLIGHT)]
            deadline = time.monotonic() + 60
            while _in_flight(base) < IN_FLIGHT and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _in_flight(base) == IN_FLIGHT and not any(a.done() for a in answers), "the requests were not in flight"
            stop(process)
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/healthz", timeout=10).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(a.done() for a in answers), "the requests finished before the drain began: make them longer"
            refused = httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 4}, timeout=30)
            finished = [a.result() for a in answers]
        process.wait(timeout=240)
        reader.join(30)
        out = "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down", refused.text
    assert [r.status_code for r in finished] == [200] * IN_FLIGHT, [r.text[:300] for r in finished]
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in finished)
    assert process.returncode == 0, out[-4000:]
    steps = ["stopping: new requests get 503", "drained: every request in flight has finished", "Serve stopped", "Ray stopped; exiting"]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), out[-4000:]
    assert "Traceback" not in out, out[-4000:]
