"""What both engine replicas share: Serve's adapter multiplexing and `complete` over `stream`.

`serve.multiplexed` keeps up to `max_adapters_per_replica` adapters on a replica (LRU) and makes
Serve route a request for an adapter to a replica that already holds it; what it caches for an
adapter unloads it from the engine when evicted. Loading and unloading themselves are the
engine's (`EngineReplica.load_adapter` / `unload_adapter`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from serve.contract import EngineReplica
from serve.generation import collect


class LoadedAdapter:
    """What the multiplexer caches for an adapter; its eviction removes the adapter from the engine."""

    def __init__(self, engine: EngineReplica, name: str, lora: Any):
        self.engine, self.name, self.lora, self.unloaded = engine, name, lora, False

    def __del__(self):  # Serve calls it from a thread on LRU eviction; the GC may call it again later
        if not self.unloaded:
            self.unloaded = True
            self.engine.unload_adapter(self.name, self.lora)


def adapter_cache(engine: EngineReplica, max_adapters: int) -> Callable[[str], Awaitable[LoadedAdapter]]:
    """The replica's adapters by name, loaded on first use, the least recently used evicted past `max_adapters`."""

    async def load(name: str) -> LoadedAdapter:  # a plain function: Serve keeps its LRU cache on it
        return LoadedAdapter(engine, name, await engine.load_adapter(name))

    return serve.multiplexed(max_num_models_per_replica=max_adapters)(load)


async def complete(engine: EngineReplica, request: dict) -> dict:
    """The whole answer at once (no per-token messages between replicas)."""
    return await collect(engine.stream(request))
