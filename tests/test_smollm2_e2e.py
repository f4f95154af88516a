"""End-to-end tier: a short real QLoRA run of SmolLM2-135M-Instruct through `lorafleet train`."""

import json

import pytest
import ray
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.config import load_config
from jobs.packaged import packaged_model_path
from jobs.train import train

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def test_short_smollm2_qlora_run_on_embedded_ray(tmp_path):
    run = load_config("configs/demo.yaml", [
        f"training.output_dir={tmp_path / 'out'}", f"ray.storage_path={tmp_path / 'ray'}",
        "data.demo_rows=60", "training.max_steps=4", "training.eval_steps=4", "training.logging_steps=1", "training.batch_size=4",
    ])
    assert not ray.is_initialized()
    try:
        outcome = train(run)  # no address: starts the embedded local Ray by itself
    finally:
        ray.shutdown()
    metrics = json.loads((outcome.output_dir / "metrics.json").read_text())
    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert metrics["trainable_parameters"] and metrics["trainable_parameters"] < 0.1 * metrics["total_parameters"]
    # Plain PEFT loading, as a user would do it without lorafleet.
    base = AutoModelForCausalLM.from_pretrained(packaged_model_path("smollm2-135m-instruct"))
    model = PeftModel.from_pretrained(base, outcome.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(outcome.adapter_dir)
    assert tokenizer.chat_template and model.peft_config["default"].r == 16
