"""Tokenizer and model loading: QLoRA is a setting here, not a second code path.

`quantization.mode` decides how the frozen base is loaded (4-bit, 8-bit or full
precision); everything after that (gradient checkpointing, LoRA) is the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    set_seed,
)

from jobs import adapter, devices
from jobs.config import PACKAGED_MODELS, ConfigError, ModelConfig, RunConfig
from jobs.packaged import packaged_model_path

log = logging.getLogger("lorafleet.model")
NON_REENTRANT = {"use_reentrant": False}  # reentrant checkpointing breaks DDP with frozen weights


def model_path(cfg: ModelConfig) -> str:
    if cfg.name in PACKAGED_MODELS:
        return str(packaged_model_path(cfg.name))
    return cfg.name


def hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def auto_model_class(kind: str):
    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def model_config(cfg: ModelConfig):
    return AutoConfig.from_pretrained(model_path(cfg), **hub_kwargs(cfg))


def model_kind(cfg: ModelConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "seq2seq" if model_config(cfg).is_encoder_decoder else "causal"


def load_tokenizer(cfg: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg), **hub_kwargs(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def uses_chat_template(cfg: ModelConfig, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "auto":
        return has_template
    if cfg.chat_template and not has_template:
        raise ConfigError(
            [
                f"model.chat_template = true: the tokenizer of {cfg.name!r} has no chat template; set "
                "model.chat_template=false"
            ]
        )
    return cfg.chat_template


def compute_dtype(run: RunConfig, device: torch.device) -> torch.dtype:
    return devices.compute_dtype(run.quantization.compute_dtype, device)


def quantization_config(run: RunConfig, device: torch.device) -> BitsAndBytesConfig | None:
    q = run.quantization
    if q.mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(run, device),
        )
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def one_4bit_kernel(model):
    """Keep bitsandbytes' 4-bit layers on the one kernel path that trains.

    On CPUs with AVX-512 BF16, bitsandbytes 0.50 repacks a Linear4bit's weight at its first
    forward in eval mode without grad (the Trainer's first evaluation, say) and from then on
    multiplies with a fused kernel that (1) rounds differently and
    (2) has no autograd: training steps after that evaluation get no gradient through the
    frozen base layers, and `.to()` unpacks the weight again with a lossy round trip. So on
    those CPUs training silently went wrong after the first evaluation, and eval and Serve saw
    another model than the one that trained. The switch is bitsandbytes' own per-layer flag.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_base(run: RunConfig, device: torch.device, kind: str):
    """The frozen base model, quantized as configured, placed on this process's device."""
    model = auto_model_class(kind).from_pretrained(
        model_path(run.model),
        quantization_config=quantization_config(run, device),
        # Pinned to this worker's own device: "auto" would spread one replica over all GPUs.
        device_map={"": device},
        dtype=compute_dtype(run, device) if run.quantization.mode == "none" else None,
        **hub_kwargs(run.model),
    )
    return one_4bit_kernel(model)


def lora_config(run: RunConfig, kind: str) -> PeftLoraConfig:
    lora = run.lora
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        task_type="SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM",
    )


def load_for_training(run: RunConfig, device: torch.device, kind: str):
    model = load_base(run, device, kind)
    checkpointing = run.training.gradient_checkpointing
    if run.quantization.mode != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=NON_REENTRANT
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        model.enable_input_require_grads()
    if checkpointing:
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    set_seed(run.training.seed)  # LoRA's A matrices are random: same seed, same adapter init
    model = get_peft_model(model, lora_config(run, kind))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def parameter_counts(model) -> dict[str, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total)}


def attach_adapter(base, adapter_dir: str | Path):
    """A saved adapter on an already loaded base."""
    adapter.require_safetensors(adapter_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_adapter(run: RunConfig, adapter_dir: str | Path, device: torch.device, kind: str):
    """Base + a saved adapter, for evaluation and serving."""
    adapter.require_safetensors(adapter_dir)  # before the slow base load
    return attach_adapter(load_base(run, device, kind), adapter_dir)
