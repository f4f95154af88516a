"""Adapters for the serving tests: random (non-zero) LoRA weights, so each one answers differently."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM


def make_adapter(base: str, folder: Path, seed: int, targets: list[str] | str = "all-linear", seq2seq: bool = False) -> Path:
    torch.manual_seed(seed)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    return folder
