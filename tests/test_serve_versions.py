"""Unit tier for adapter versions in serving: keys, pins, which version a name means and when it changes, and the
HF engine's verdict on a dead device. The same behaviours through Serve, on both engines: tests/test_serve_ray.py."""

import asyncio

import pytest
import torch

from jobs import registry
from jobs.config import load_config
from jobs.model import load_base
from jobs.prompting import Prompting
from serve import adapters
from serve.api import Answering
from serve.app import application
from serve.engine import Engine, _fatal
from serve.generation import EngineDead, eos_token_ids
from serve.grammar import Grammars
from serve.model_thread import ModelThread
from serve.multi_lora import MultiLora
from tests.serve_fixtures import make_adapter


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_causal):
    root = tmp_path_factory.mktemp("versions")
    store = root / "registry"
    store.mkdir()
    make_adapter(tiny_causal, store / "plain", seed=1)  # a plain folder: version 1
    one, two = make_adapter(tiny_causal, root / "one", seed=2), make_adapter(tiny_causal, root / "two", seed=3)
    registry.publish(str(store), "qa", one)  # version 2: 1 is a plain folder's number
    registry.publish(str(store), "qa", two)  # version 3
    return {"store": store, "one": one, "two": two, "configured": make_adapter(tiny_causal, root / "conf", seed=4)}


def _cfg(published, **extra):
    overrides = [f"serve.adapter_root={published['store']}", f"serve.adapters={{conf: {published['configured']}}}"]
    return load_config(None, overrides + [f"serve.{k}={v}" for k, v in extra.items()]).serve


def test_keys_name_a_version_and_pins_resolve_to_that_versions_own_folder(published):
    cfg = _cfg(published)
    assert adapters.parse("qa@12") == adapters.Ref("qa", 12) and adapters.parse("qa").key == "qa"
    assert adapters.resolve(cfg, "qa@2").parts[-2:] == ("versions", "2")
    assert adapters.resolve(cfg, "qa@3").parts[-2:] == ("versions", "3")
    assert adapters.resolve(cfg, "qa") == adapters.resolve(cfg, "qa@3")  # unpinned: the current version
    assert adapters.resolve(cfg, "plain@1").name == "plain"
    for bad, says in [
        ("qa@7", "has no version 7; its versions: 2, 3"),
        ("conf@1", "set in serve.adapters, which has no versions"),
        ("qa@x", "not a valid adapter name"),
        ("qa@1@2", "not a valid adapter name"),
        ("@1", "not a valid adapter name"),
    ]:
        with pytest.raises(adapters.UnknownAdapter, match=says):
            adapters.resolve(cfg, bad)


def test_a_name_means_its_current_version_read_again_after_the_poll_interval(published, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(adapters.time, "monotonic", lambda: clock[0])
    cfg = _cfg(published, registry_poll_s=2)
    versions = adapters.CurrentVersions(cfg)
    assert versions.ref("qa") == adapters.Ref("qa", 3)
    registry.rollback(str(published["store"]), "qa")
    try:
        clock[0] += 1.9
        assert versions.ref("qa").version == 3  # within the interval: the version read last
        assert versions.ref("qa@3").version == 3 and versions.ref("conf") == adapters.Ref("conf")
        clock[0] += 0.2
        assert versions.ref("qa").version == 2
        assert {r.key for r in versions.listing()} == {"conf", "plain@1", "qa@2"}
        assert adapters.CurrentVersions(_cfg(published, registry_poll_s=0)).ref("qa").version == 2
    finally:
        registry.rollback(str(published["store"]), "qa", to=3)
    with pytest.raises(adapters.UnknownAdapter, match="no adapter named 'gone'"):
        versions.ref("gone")


def test_responses_name_the_version_that_answered():
    by = Answering.of(adapters.Ref("qa", 3), "base")
    assert (by.model, by.version, by.key, by.fingerprint) == ("qa", "3", "qa@3", "qa@3")
    assert by.headers() == {"X-Lorafleet-Adapter-Version": "3"}
    assert Answering.of(None, "base").headers() == {} and Answering.of(None, "base").fingerprint == "base"
    assert Answering.of(adapters.Ref("conf"), "base").key == "conf"


def test_device_errors_that_poison_the_context_are_fatal_and_out_of_memory_is_not():
    assert _fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert _fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert not _fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not _fatal(ValueError("a bad grammar"))


def test_an_hf_engine_whose_device_failed_fails_its_health_check_and_refuses_requests(tiny_causal):
    """The batch that hit the error gets EngineDead (a 503 at the gateway), the health check fails so Serve
    replaces the replica, and a request that reaches it meanwhile is refused at once instead of hanging."""
    engine = object.__new__(Engine.func_or_class)  # no Serve: the methods under test need only these fields
    run = load_config(None, [f"model.name={tiny_causal}", "quantization.mode=none"])
    engine.prompting = Prompting.load(run.model)
    engine.model = load_base(run, torch.device("cpu"), engine.prompting.kind).eval()
    engine.eos = eos_token_ids(engine.model, engine.prompting.tokenizer)
    engine.device, engine.dead, engine.serve_cfg, engine.thread = torch.device("cpu"), None, run.serve, ModelThread()
    engine.lora = MultiLora(engine.model, engine.device)
    engine.grammars = Grammars(engine.prompting.tokenizer, engine.model.config.vocab_size)
    engine.scheduler = engine._step_loop(8)
    engine.check_health()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.model.forward = broken

    async def answer():
        async for _ in engine.stream({"prompt_ids": [1, 2, 3], "max_tokens": 4}):
            pass

    with pytest.raises(EngineDead, match="illegal memory access"):
        asyncio.run(asyncio.wait_for(answer(), 30))
    with pytest.raises(EngineDead):
        engine.check_health()

    async def first_delta():
        async for delta in engine.stream({"prompt_ids": [1, 2], "max_tokens": 2}):
            return delta

    with pytest.raises(EngineDead):
        asyncio.run(asyncio.wait_for(first_delta(), 5))


def test_serve_deploy_apps_get_the_drain_timeout_as_serves_graceful_shutdown(tiny_causal):
    """Apps that `lorafleet serve` does not stop itself (serve deploy, a cluster) drain through Serve: a replica it
    stops finishes its requests for up to serve.drain_timeout_s."""
    run = load_config(None, [f"model.name={tiny_causal}", "serve.drain_timeout_s=45", "serve.engine=hf"])
    gateway = application(run)._bound_deployment
    engine = gateway.init_args[0]._bound_deployment
    for deployment in (gateway, engine):
        assert deployment._deployment_config.graceful_shutdown_timeout_s == 45, deployment.name
