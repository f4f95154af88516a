"""The adapter on disk: the folder PEFT's `save_pretrained` writes, and the one owner of its names.

File names are PEFT's own. Only safetensors weights count as an adapter (pickled `.bin` weights
can run code when loaded). In a Ray Train checkpoint the adapter sits in the HF checkpoint
subfolder that Ray's report callback writes; `install` copies one into place atomically.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from ray.train.huggingface.transformers import RayTrainReportCallback

CONFIG = CONFIG_NAME  # adapter_config.json: copied last anywhere, so a reader that sees it sees the weights too
WEIGHTS = SAFETENSORS_WEIGHTS_NAME  # adapter_model.safetensors
IN_CHECKPOINT = RayTrainReportCallback.CHECKPOINT_NAME  # the HF checkpoint folder inside a Ray Train checkpoint
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "spiece")


def is_adapter_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def require_safetensors(adapter_dir: str | Path) -> None:
    if not (Path(adapter_dir) / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: no {WEIGHTS}; only safetensors adapters are loaded (pickle files can run code)"
        )


def last_is_config(path: Path) -> tuple[bool, str]:
    """Sort key for copying a folder: the adapter config after everything else."""
    return path.name == CONFIG, str(path)


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written folder into place; readers never see a partial adapter."""
    if target.exists():
        old = target.with_name(f".{target.name}-old-{time.time_ns()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def install(hf_checkpoint: Path, adapter_dir: Path) -> None:
    """Copy the adapter and tokenizer files of an HF checkpoint folder to `adapter_dir`, atomically."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=f".{adapter_dir.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the adapter is read by Serve and other users
    try:
        for item in hf_checkpoint.iterdir():
            if item.name in (WEIGHTS, CONFIG) or item.name.startswith(TOKENIZER_PREFIXES):
                shutil.copy2(item, staging / item.name)
        _replace_dir(staging, adapter_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the swap happened


def install_from_checkpoint(ray_checkpoint: Path, adapter_dir: Path) -> None:
    """The adapter of a Ray Train checkpoint folder (local) to `adapter_dir`."""
    install(ray_checkpoint / IN_CHECKPOINT, adapter_dir)


EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "shared", "embed_in", "embed_out")


def vllm_problems(folder: Path, max_rank: int) -> list[str]:
    """What keeps vLLM from loading this adapter, each with what to retrain (empty: loadable).

    vLLM's LoRA serves low-rank matrices on linear layers only, up to its max_lora_rank.
    """
    cfg = json.loads((folder / CONFIG).read_text())
    found = []
    if cfg.get("modules_to_save"):
        found.append(
            f"it fully trains modules_to_save {cfg['modules_to_save']}, which vLLM cannot serve; "
            "retrain without modules_to_save"
        )
    if cfg.get("use_dora"):
        found.append("it is a DoRA adapter (use_dora), which vLLM cannot serve; retrain it as plain LoRA")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    embedded = sorted({m for m in targets if m.split(".")[-1] in EMBEDDING_MODULES})
    if embedded:
        found.append(
            f"it adapts the embeddings / output head {embedded}, which vLLM's LoRA cannot; "
            "retrain with lora.target_modules without them"
        )
    rank = max([int(cfg.get("r", 0)), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())])
    if rank > max_rank:
        found.append(
            f"its rank r={rank} is above the engine's maximum {max_rank}: raise serve.vllm_max_lora_rank, "
            f"or retrain with lora.r <= {max_rank}"
        )
    return found
