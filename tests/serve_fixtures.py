"""Adapters for the serving tests: random (non-zero) LoRA weights, so each one answers differently."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM


def make_adapter(base: str, folder: Path, seed: int, targets: list[str] | str = "all-linear", seq2seq: bool = False, rank: int = 4) -> Path:
    torch.manual_seed(seed)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def narrow_llama(folder: Path) -> Path:
    """A Llama like the tiny test model but half as wide: its adapters fit the architecture, not the sizes."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return folder
