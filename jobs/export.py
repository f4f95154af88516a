"""`lorafleet export`: an adapter merged into its base as a plain checkpoint, and whether a serving
engine can load the adapter as it is.

The base is always loaded unquantized, whatever the training used: merging a QLoRA update into
4-bit weights would round most of it away. The merged folder holds safetensors weights, the
adapter's tokenizer and chat template, and the base's generation config: it loads with
`AutoModelFor*.from_pretrained(OUT)` and serves as a base model (`model.name=OUT`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from jobs import adapter
from jobs.config import ConfigError, RunConfig
from jobs.model import auto_model_class, hub_kwargs, model_kind, model_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENGINES = ("vllm",)


def check(adapter_dir: Path, engine: str, run: RunConfig) -> list[str]:
    """What keeps `engine` from loading this adapter, each with what to retrain (empty: loadable)."""
    return adapter.vllm_problems(adapter_dir, run.serve.vllm_max_lora_rank) if engine == "vllm" else []


def _require(adapter_dir: Path, out: Path) -> None:
    problems = []
    if not adapter.is_adapter_folder(adapter_dir):
        problems.append(
            f"--adapter = {str(adapter_dir)!r}: no {adapter.CONFIG} + {adapter.WEIGHTS} there; pass a trained adapter "
            "folder (e.g. runs/demo/adapter)"
        )
    if out.exists() and any(out.iterdir()):
        problems.append(f"--merged = {str(out)!r}: the folder exists and is not empty; pick a new folder")
    if problems:
        raise ConfigError(problems)


def merge(run: RunConfig, adapter_dir: Path, out: Path, dtype: str = "fp32") -> Path:
    """The adapter folded into the unquantized base, written to `out` (atomically: a crash leaves no half folder)."""
    _require(adapter_dir, out)
    adapter.require_safetensors(adapter_dir)
    hub = hub_kwargs(run.model)
    base = auto_model_class(model_kind(run.model)).from_pretrained(model_path(run.model), dtype=DTYPES[dtype], **hub)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_path(run.model)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)  # with the base's generation_config.json
    AutoTokenizer.from_pretrained(str(tokenizer_source), **hub).save_pretrained(staging)  # with the chat template
    if out.exists():
        out.rmdir()  # empty: checked above
    staging.rename(out)
    return out
