"""The vLLM model replica: vLLM's async engine behind the engine contract (`serve.contract`), so
routes, checks, auth and adapters stay the gateway's.

vLLM schedules every running request together (continuous batching, paged KV cache) and applies
each request's own LoRA per token, so requests for different adapters share one running batch.
Adapters are multiplexed as in the HF engine (`serve.replica`): Serve keeps the replica's set (LRU,
`max_adapters_per_replica`, which is also vLLM's `max_loras`) and routes a request to a replica
that holds its adapter; an evicted adapter is removed from vLLM.

Every load is a new LoRA id, and its name is the adapter's key (`NAME@VERSION`, `serve.adapters`):
vLLM 0.32 keys prefix-cache blocks on the LoRA's name and path
(`vllm/v1/core/kv_cache_utils.py: _gen_lora_extra_hash_keys`) and each registry version has its own
folder, so no version reads blocks another version computed.

Ray Serve LLM (`ray.serve.llm`) runs vLLM too, but its LoRA loader takes adapters only from one
cloud-storage prefix (`dynamic_lora_loading_path` must start with s3://, gs://, abfss:// or
azure://), so named local folders and the registry folder could not be served: this deployment
wraps vLLM's `AsyncLLM` instead (docs/design.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ray import serve
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from jobs.adapter import CONFIG, WEIGHTS, is_adapter_folder, vllm_problems
from jobs.config import RunConfig
from jobs.model import model_config, model_path
from jobs.packaged import lorafleet_cache
from serve import adapters, replica
from serve.adapters import AdapterLoadError, check_fits
from serve.generation import Delta, EngineDead, GenRequest, Rejected, logprob_entry

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger("ray.serve")
GIB = 1024**3
ZERO_RANK = 8  # vLLM's smallest max_lora_rank


def engine_args(run: RunConfig):
    """vLLM's settings for this config: LoRA on, logprobs as the HF engine reports them, memory bounded."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    s = run.serve
    memory = (
        {"gpu_memory_utilization": s.vllm_gpu_memory_utilization}
        if s.on_gpu
        else {"kv_cache_memory_bytes": int(s.vllm_kv_cache_gib * GIB)}  # on CPU vLLM would otherwise reserve 92% of RAM
    )
    slots = s.max_adapters_per_replica + (0 if s.on_gpu else 1)  # on CPU, one slot for the zero adapter
    return AsyncEngineArgs(
        model=model_path(run.model),
        revision=run.model.revision,
        trust_remote_code=run.model.trust_remote_code,
        dtype=s.vllm_dtype,
        enable_lora=True,
        max_lora_rank=s.vllm_max_lora_rank,
        max_loras=slots,
        max_cpu_loras=slots,
        max_logprobs=20,
        logprobs_mode="processed_logprobs",  # the distribution the token was drawn from, as the HF engine reports
        enforce_eager=not s.on_gpu,  # CUDA graphs only exist on GPU
        seed=0,
        **memory,
    )


def sampling_params(req: GenRequest):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if req.response_format:
        fmt = req.response_format
        structured = (
            StructuredOutputsParams(json_object=True)
            if fmt["type"] == "json_object"
            else StructuredOutputsParams(json=fmt["schema"])
        )
    return SamplingParams(
        n=req.n,
        max_tokens=req.max_tokens,
        temperature=0.0 if req.greedy() else req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop or None,
        logprobs=req.logprobs,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
    )


def _logprobs(choice, k: int | None) -> list[dict] | None:
    if k is None or choice.logprobs is None:
        return None
    entries = []
    for token, by_id in zip(choice.token_ids, choice.logprobs, strict=False):
        chosen = by_id[token]
        top = sorted((lp for lp in by_id.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        entries.append(
            logprob_entry(
                chosen.decoded_token or "", chosen.logprob, [(t.decoded_token or "", t.logprob) for t in top[:k]]
            )
        )
    return entries


def zero_adapter(shape, cache: Path) -> Path:
    """A LoRA on every linear layer whose matrices are all zero, for base-model requests on CPU.

    vLLM 0.32's CPU LoRA ops pick each row's adapter as `lora_b_weights[lora_indices_tensor]`
    (vllm/lora/ops/torch_ops/lora_ops.py), and a row without adapter has index -1: Python's last
    slot, so a base request batched with adapter requests was answered by an adapter
    (tests/test_serve_ray.py sends two adapters and the base at once). Through this adapter every row
    has a real slot, and the LoRA adds exactly zero. Written by hand: PEFT cannot save a model
    built on the meta device, and loading the base's weights for an all-zero file would waste memory.

    vLLM reads the folder whenever it loads the adapter again, so it must outlive the replica's start. It
    lives in `cache`, named by its shapes and written once: every replica of a base model, restarted or
    added by autoscaling, uses the same folder, where a temporary folder per replica was never removed.
    """
    layers = sorted(
        (name, module.in_features, module.out_features)
        for name, module in shape.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head"
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ZERO_RANK,
        "lora_alpha": ZERO_RANK,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({name.split(".")[-1] for name, _, _ in layers}),
    }
    folder = cache / f"zero-lora-{hashlib.sha256(json.dumps([config, layers]).encode()).hexdigest()[:16]}"
    if is_adapter_folder(folder):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".zero-lora-"))
    tensors = {}
    for name, fan_in, fan_out in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(ZERO_RANK, fan_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(fan_out, ZERO_RANK)
    save_file(tensors, staging / WEIGHTS)
    (staging / CONFIG).write_text(json.dumps(config))
    try:
        staging.rename(folder)  # atomic: a reader sees the whole folder or none
    except OSError:  # another replica wrote the same folder first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@serve.deployment
class VllmEngine:
    def __init__(self, run: dict):
        from vllm.v1.engine.async_llm import AsyncLLM

        run = RunConfig.model_validate(run)
        self.cfg = run.serve
        # Ray sets OMP_NUM_THREADS to the replica's CPUs, and vLLM then keeps that many torch threads in its engine
        # loop, where they spin-wait between ops and slow generation down (its own default is one; compute threads
        # are bound by VLLM_CPU_OMP_THREADS_BIND).
        os.environ.pop("OMP_NUM_THREADS", None)
        self.llm = AsyncLLM.from_engine_args(engine_args(run))
        with torch.device("meta"):  # the base's shapes, without weights, to check that an adapter fits
            self.shape = AutoModelForCausalLM.from_config(model_config(run.model))
        self.lora_ids = itertools.count(1)  # vLLM keys adapters by id: a reloaded adapter gets a new one
        self.base_lora = None
        if not run.serve.on_gpu:
            from vllm.lora.request import LoRARequest

            folder = zero_adapter(self.shape, lorafleet_cache() / "zero-adapters")
            self.base_lora = LoRARequest("__base__", next(self.lora_ids), str(folder))
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's, known once an adapter loads
        self.adapter = replica.adapter_cache(self, run.serve.max_adapters_per_replica)
        log.info("engine ready: vLLM %s, up to %d adapters", run.model.name, run.serve.max_adapters_per_replica)

    async def load_adapter(self, name: str) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        folder: Path = await asyncio.to_thread(adapters.resolve, self.cfg, name)  # may fetch from s3://
        problems = vllm_problems(folder, self.cfg.vllm_max_lora_rank)
        if problems:
            raise AdapterLoadError(f"adapter {name!r} ({folder}) cannot be served by vLLM: " + "; ".join(problems))
        check_fits(self.shape, name, folder)
        request = LoRARequest(name, next(self.lora_ids), str(folder))
        try:
            await self.llm.add_lora(request)
        except Exception as exc:  # broken files, or what the checks above cannot see
            raise AdapterLoadError(
                f"adapter {name!r} ({folder}) cannot be loaded by vLLM: {type(exc).__name__}: {exc}"
            ) from None
        log.info("adapter %r loaded from %s", name, folder)
        self.loop = asyncio.get_running_loop()  # vLLM's client runs here; evictions come from other threads
        return request

    def unload_adapter(self, name: str, lora: LoRARequest) -> None:
        asyncio.run_coroutine_threadsafe(self.llm.remove_lora(lora.lora_int_id), self.loop)

    async def stream(self, request: dict) -> AsyncIterator[Delta]:
        """New text of one request's choices as vLLM generates it; a choice's last Delta carries finish_reason."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        req = GenRequest(**request)
        if self.llm.errored:
            raise EngineDead(f"vLLM's engine is dead: {self.llm.dead_error}")
        lora = (await self.adapter(req.adapter)).lora if req.adapter else self.base_lora
        copies = req.n if req.greedy() else 1  # vLLM refuses n > 1 when greedy: every choice is the one answer
        params = sampling_params(replace(req, n=req.n // copies))
        tokens: dict[int, int] = {}
        prompt = TokensPrompt(prompt_token_ids=req.prompt_ids)
        try:
            async for out in self.llm.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
                for choice in out.outputs:
                    if choice.finish_reason not in (None, "stop", "length"):
                        raise RuntimeError(f"vLLM ended the request: {choice.finish_reason}")
                    tokens[choice.index] = tokens.get(choice.index, 0) + len(choice.token_ids)
                    logprobs = _logprobs(choice, req.logprobs)
                    for index in range(choice.index, choice.index + copies):
                        yield Delta(choice.text, choice.finish_reason, tokens[choice.index], index, logprobs)
        except VLLMValidationError as exc:
            raise Rejected(f"vLLM refused the request: {exc}") from None
        except EngineDeadError as exc:
            raise EngineDead(f"vLLM's engine died: {exc}") from None

    complete = replica.complete

    async def check_health(self) -> None:
        """Serve replaces the replica when vLLM's engine process has died."""
        if self.llm.errored:
            raise EngineDead(f"vLLM's engine is dead: {self.llm.dead_error}")

    def __del__(self):
        if getattr(self, "llm", None) is not None:
            self.llm.shutdown()  # ends vLLM's engine process with the replica
