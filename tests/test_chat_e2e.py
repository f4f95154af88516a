"""End-to-end tier: a short real SmolLM2 QLoRA run on the generated multi-turn conversations
(`configs/chat-smollm2.yaml`); the adapter must beat the base on held-out conversations, whose
answer depends on their first turn; merged into the unquantized base (`lorafleet export`), it
gives the adapter's logits."""

import json

import pytest
import ray
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.config import load_config
from jobs.demo_data import demo_conversations
from jobs.evaluation import run_eval
from jobs.export import merge
from jobs.model import model_path
from jobs.train import train

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
# Measured here: 10 steps of 8 conversations on 120 -> base EM 0 / F1 33.7, adapter 100 / 100 (12 held out); 10 steps
# of 4 -> the same (adapter eval loss 0.042), with training 185 s instead of 284 s on 2 cores; 24 steps on 200 -> base
# 0 / 12.7, adapter 100 / 100 (20 held out). The margins keep half of the smallest gap seen.
MARGIN_EM, MARGIN_F1 = 50, 30


def test_an_adapter_trained_on_conversations_beats_the_base_on_held_out_ones(tmp_path):
    run = load_config("configs/chat-smollm2.yaml", [
        f"training.output_dir={tmp_path / 'out'}", f"ray.storage_path={tmp_path / 'ray'}", "data.demo_rows=120",
        "training.max_steps=10", "training.eval_steps=10", "training.batch_size=4",
    ])
    try:
        outcome = train(run)
    finally:
        ray.shutdown()
    report = json.loads((outcome.output_dir / "metrics.json").read_text())
    assert report["final_train_loss"] < report["first_train_loss"]
    evaluated = run_eval(run, outcome.adapter_dir, True, tmp_path / "eval", tmp_path / "predictions.jsonl")
    base, adapter = (evaluated.results[k].metrics for k in ("base", "adapter"))
    assert adapter["exact_match"] >= base["exact_match"] + MARGIN_EM and adapter["f1"] >= base["f1"] + MARGIN_F1, (base, adapter)
    first = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["role"] == "user" and "locker" in first["messages"][0]["content"]
    assert "user: Please remember my locker" in (tmp_path / "eval" / "eval.md").read_text()
    merged = merge(run, outcome.adapter_dir, tmp_path / "merged")  # the 4-bit-trained adapter, into the fp32 base
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path(run.model)), outcome.adapter_dir)
    folded = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        for row in demo_conversations(20, seed=11):  # 20 prompts: each conversation without its last answer
            ids = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            assert float((reference(**ids).logits - folded(**ids).logits).abs().max()) < 1e-3
