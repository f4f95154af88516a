"""The HF model replica: one base model, adapters multiplexed on top of it, batched generation.

- The base is loaded once per replica (quantized as `serve.quantization` says).
- Adapters load on first use through Serve's multiplexer (`serve.replica`: LRU,
  `max_adapters_per_replica`); Serve routes a request for an adapter to a replica that holds it.
- Causal models run on the step loop (`serve.scheduler`): a request joins the running batch at the
  next decoding step and leaves it at its own end, with its own sampling settings. Every row goes
  through its own adapter in one batched op per layer (`serve.multi_lora`), so rows of different
  adapters never see each other's weights, and a batch over 8 adapters costs about what one does.
- Seq2seq models (and caches the step loop cannot merge: sliding windows, linear attention) keep the
  static path: `serve.batch` gathers concurrent requests, one `generate` call serves every request
  with the same sampling settings.
- All torch work runs on one thread (`serve.model_thread`), forward passes and adapter (un)loading in
  turn: an adapter is never removed mid-forward, and one a running request uses stays in its slot
  until the request ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import torch
from ray import serve
from ray.serve import context as serve_context

from jobs import devices
from jobs.config import RunConfig
from jobs.model import load_base
from jobs.prompting import Prompting
from serve import adapters, replica
from serve.adapters import AdapterLoadError, check_fits
from serve.generation import (
    Delta,
    EngineDead,
    GenRequest,
    LogprobCapture,
    Progress,
    eos_token_ids,
    generate_kwargs,
    merged,
)
from serve.grammar import Grammars
from serve.model_thread import ModelThread
from serve.multi_lora import MultiLora
from serve.scheduler import Scheduler, can_schedule

log = logging.getLogger("ray.serve")
_END = object()
FATAL_MARKS = ("CUDA error", "device-side assert", "CUBLAS_STATUS_", "CUDNN_STATUS_")  # errors that poison the context


def _batch_across_adapters() -> None:
    """Let this request share `serve.batch`'s batches with requests for other adapters.

    Ray Serve 2.60's batcher splits every batch by multiplexed model id (`ray/serve/batching.py`,
    `_split_batch_by_model_id`), so 32 requests over 8 adapters ran as 8 small generate calls one after another
    (0.25x one adapter's throughput, measured). The engine routes each row to its own adapter itself
    (`serve.multi_lora`), so once the request's adapter is loaded its id is cleared from the request's context,
    which the batcher reads; Serve has no public switch for this.
    """
    context = serve_context._get_serve_request_context()
    serve_context._serve_request_context.set(replace(context, multiplexed_model_id=""))


def _fatal(exc: Exception) -> bool:
    """A device error after which no generate can succeed (out-of-memory is not one: the next batch may fit)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, torch.AcceleratorError) or any(mark in str(exc) for mark in FATAL_MARKS)


def serving_run(run: RunConfig) -> RunConfig:
    """The run config with the base precision the replicas load."""
    if run.serve.quantization == "as_trained":
        return run
    return run.model_copy(update={"quantization": run.quantization.model_copy(update={"mode": run.serve.quantization})})


@serve.deployment
class Engine:
    def __init__(self, run: dict):
        run = RunConfig.model_validate(run)
        self.serve_cfg = run.serve
        cpus = int(run.serve.replica_resources.get("CPU", 1))
        torch.set_num_threads(max(1, cpus))  # one replica per `CPU` share, not every core each
        self.device = devices.replica_device(run.serve.on_gpu)
        self.prompting = Prompting.load(run.model)
        self.thread = ModelThread()
        self.model = self.thread.call(
            lambda: load_base(serving_run(run), self.device, self.prompting.kind).eval()
        ).result()
        self.lora = MultiLora(self.model, self.device)
        self.eos = eos_token_ids(self.model, self.prompting.tokenizer)
        self.grammars = Grammars(self.prompting.tokenizer, self.model.config.vocab_size)
        self.dead: str | None = None  # why the engine can generate no more (a CUDA error poisons the context)
        self.adapter = replica.adapter_cache(self, run.serve.max_adapters_per_replica)
        self.generate_batch.set_max_batch_size(run.serve.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(run.serve.batch_wait_timeout_s)
        self.scheduler = (
            self._step_loop(run.serve.max_batch_size) if can_schedule(self.model, self.prompting.kind) else None
        )
        log.info(
            "engine ready: %s (%s) on %s, %s of up to %d",
            run.model.name,
            self.prompting.kind,
            self.device,
            "a step loop (continuous batching)" if self.scheduler else "static batches",
            run.serve.max_batch_size,
        )

    def _step_loop(self, max_rows: int) -> Scheduler:
        return Scheduler(
            self.model,
            self.lora,
            self.prompting,
            self.eos,
            self.grammars,
            self.thread,
            max_rows,
            self._ensure_adapter,
            self._failure,
        )

    def _failure(self, exc: Exception) -> Exception:
        """What the requests of a failed generation receive; a device error marks the engine dead."""
        if _fatal(exc):
            self.dead = f"the model's device failed: {type(exc).__name__}: {str(exc)[:200]}"
            return EngineDead(self.dead)
        return exc

    async def load_adapter(self, name: str) -> None:
        folder = adapters.resolve(self.serve_cfg, name)
        await asyncio.wrap_future(self.thread.call(lambda: self._attach(name, folder)))

    def _attach(self, name: str, folder: Path) -> None:
        if name in self.lora:
            return
        check_fits(self.model, name, folder)
        try:
            self.lora.load(name, folder)
        except Exception as exc:  # broken files, a LoRA feature the op does not compute, or what check_fits cannot see
            self.lora.unload(name)
            raise AdapterLoadError(
                f"adapter {name!r} ({folder}) cannot be loaded on this base model: {type(exc).__name__}: {exc}"
            ) from None
        log.info("adapter %r loaded from %s", name, folder)

    def unload_adapter(self, name: str, lora: None) -> None:
        def unload() -> None:
            self.lora.unload(name)
            log.info("adapter %r unloaded", name)

        self.thread.call(unload)  # not awaited: the GC may call this on the model thread itself

    async def stream(self, request: dict) -> AsyncIterator[Delta]:
        """New text of one request's choices as it is generated; a choice's last Delta carries finish_reason."""
        req = GenRequest(**request)
        if self.dead:
            raise EngineDead(self.dead)
        if req.adapter:
            await self.adapter(req.adapter)
        if self.scheduler is None:
            async for delta in self._static(req):
                yield delta
            return
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
        ticket = self.scheduler.submit(req, lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item))
        try:
            choices_left = req.n
            while choices_left:
                item = await deltas.get()
                if isinstance(item, Exception):
                    raise item
                choices_left -= item.finish is not None
                yield item
        finally:
            ticket.cancelled = True  # a client that left frees its rows at the next step

    async def _static(self, req: GenRequest) -> AsyncIterator[Delta]:
        _batch_across_adapters()
        # n choices are n rows of the same batch (one sampling key, so one generate call)
        rows = [self.generate_batch(replace(req, n=1)) for _ in range(req.n)]
        async for index, delta in merged(rows):
            if delta is not None:
                delta.index = index
                yield delta

    complete = replica.complete

    def check_health(self) -> None:
        """Serve replaces the replica once its device has failed."""
        if self.dead:
            raise EngineDead(self.dead)

    # the static path's batching; its sizes are replaced from the config in __init__
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, requests: list[GenRequest]) -> AsyncIterator[list]:
        """Per step, one item per request: its Delta, None (nothing new), or StopIteration once it
        has finished (which ends that caller's stream while the rest of the batch goes on)."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.sampling_key(), []).append(index)
        finished: set[int] = set()
        log.debug("batch of %d request(s) in %d sampling group(s)", len(requests), len(groups))
        for indices in groups.values():
            async for deltas in self._run_group([requests[i] for i in indices]):
                out: list = [StopIteration if i in finished else None for i in range(len(requests))]
                for index, delta in zip(indices, deltas, strict=True):
                    if delta is not None and index not in finished:
                        out[index] = delta
                        if delta.finish:
                            finished.add(index)
                yield out

    async def _run_group(self, group: list[GenRequest]) -> AsyncIterator[list[Delta | None]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        capture = LogprobCapture() if any(r.logprobs is not None for r in group) else None
        progress = Progress(group, self.prompting.tokenizer, self.eos, put, capture)

        def work() -> None:
            try:
                for name in {r.adapter for r in group if r.adapter}:
                    self._ensure_adapter(name)
                if group[0].seed is not None:
                    torch.manual_seed(group[0].seed)
                fmt = group[0].response_format  # part of the sampling key: one per group
                grammar = self.grammars.mask(fmt, progress.rows) if fmt else None
                with self.lora.routing([r.adapter for r in group]), torch.inference_mode():
                    kwargs = generate_kwargs(group, self.prompting, self.device, progress, grammar)
                    self.model.generate(**kwargs)
                put(progress.close())
                put(_END)
            except Exception as exc:  # delivered to every request of the group
                put(self._failure(exc))

        worker = asyncio.wrap_future(self.thread.call(work))
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
        await worker

    def _ensure_adapter(self, name: str) -> None:
        """An adapter evicted between a request's arrival and its generation is loaded again (on the model thread)."""
        self._attach(name, adapters.resolve(self.serve_cfg, name))
