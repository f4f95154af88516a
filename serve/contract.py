"""The engine contract: what a model replica offers the gateway and the adapter multiplexer.

`serve.engine.Engine` (HF `generate`) and `serve.vllm_engine.VllmEngine` both have it, structurally:
the gateway sees only these methods, so a config can switch engines without touching routes,
checks or adapters. Requests cross replicas as `asdict(GenRequest)`, answers as `Delta`s or
`collect`'s dict. Serve's own hooks (`check_health`, `__del__`) stay each engine's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve.generation import Delta


class EngineReplica(Protocol):
    def stream(self, request: dict) -> AsyncIterator[Delta]:
        """New text of one request's choices as it is generated; a choice's last Delta carries finish_reason.
        Raises what the gateway answers with a 4xx: UnknownAdapter, AdapterLoadError (the request's adapter
        cannot be loaded) or Rejected (the engine refuses the request); or EngineDead (a 503), after which
        Serve's health check (`check_health`) fails until the replica is replaced."""
        ...

    async def complete(self, request: dict) -> dict:
        """The whole answer at once (no per-token messages between replicas): `collect` of `stream`."""
        ...

    async def load_adapter(self, name: str) -> Any:
        """Adapter key `name` (`NAME@VERSION`, or `NAME` of serve.adapters: `serve.adapters.Ref`) made usable by
        `stream`, as weights of its own that no other key shares; returns what the engine needs to use it later."""
        ...

    def unload_adapter(self, name: str, lora: Any) -> None:
        """Remove an adapter the multiplexer evicted (`lora` as `load_adapter` returned it); called once, from
        Serve's eviction thread or the GC, so it cannot await anything on the replica's event loop."""
        ...
