"""Outputs on an object store: `ray.storage_path: s3://...` against a local S3 server (moto).

Unit tier first (publish/fetch, Serve's adapter resolution), then the Ray tier: a pipeline
(train -> eval -> deploy -> smoke request) and a sweep whose checkpoints and results live in S3.
"""

import json
import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs import storage
from jobs.config import load_config
from tests.conftest import BUCKET


def _remote_files(uri: str) -> set[str]:
    fs, root = pafs.FileSystem.from_uri(uri)
    return {info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)) if info.type == pafs.FileType.File}


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_local_storage_publishes_nothing(tmp_path):
    assert storage.publish(_folder(tmp_path / "run", {"a.txt": "x"}), str(tmp_path / "ray")) is None
    assert not storage.is_remote("runs/ray") and storage.is_remote("s3://b/p") and storage.is_remote("gs://b/p")


def test_publish_then_fetch_round_trip(s3, tmp_path):
    run_dir = _folder(tmp_path / "run", {"adapter/adapter_config.json": "{}", "adapter/adapter_model.safetensors": "w1", "report.md": "r",
                                         "checkpoints/big.bin": "skip me"})
    uri = storage.publish(run_dir, f"{s3}/runs", skip=("checkpoints",))
    assert uri == f"{s3}/runs/run"
    assert _remote_files(uri) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "report.md"}

    first = storage.fetch(f"{uri}/adapter", tmp_path / "cache")
    assert (first / "adapter_model.safetensors").read_text() == "w1"
    assert storage.fetch(f"{uri}/adapter", tmp_path / "cache") == first, "an unchanged adapter is downloaded once"

    # A second run under the same name replaces the first one's files, and readers get the new version
    # (told apart by size and modification time, which S3 keeps to the second).
    time.sleep(1.1)
    _folder(run_dir, {"adapter/adapter_model.safetensors": "w2"})
    (run_dir / "report.md").unlink()
    storage.publish(run_dir, f"{s3}/runs", skip=("checkpoints",))
    assert "report.md" not in _remote_files(uri)
    second = storage.fetch(f"{uri}/adapter", tmp_path / "cache")
    assert second != first and (second / "adapter_model.safetensors").read_text() == "w2"
    assert not list((tmp_path / "cache").glob(".fetch-*")), "no staging folder left behind"

    with pytest.raises(FileNotFoundError, match="no files there"):
        storage.fetch(f"{s3}/runs/absent", tmp_path / "cache")


def test_serve_resolves_a_remote_adapter(s3, tmp_path):
    from serve import adapters

    uri = storage.publish(_folder(tmp_path / "remote-run", {"adapter/adapter_config.json": "{}", "adapter/adapter_model.safetensors": "w"}), f"{s3}/runs")
    cfg = load_config(None, [f"serve.adapters={{good: {uri}/adapter, gone: {s3}/runs/nothing/adapter}}"]).serve
    assert cfg.adapters["good"] == f"{uri}/adapter", "URIs are kept as they are, not made into local paths"
    folder = adapters.resolve(cfg, "good")
    assert adapters.is_adapter_folder(folder) and str(folder).startswith(os.environ["LORAFLEET_CACHE"])
    with pytest.raises(adapters.UnknownAdapter, match="adapter 'gone': cannot fetch"):
        adapters.resolve(cfg, "gone")
    assert adapters.names(cfg) == ["good", "gone"]
    assert adapters.exists(f"{uri}/adapter") and not adapters.exists(f"{s3}/runs/nothing/adapter")


def test_serve_reads_adapter_versions_from_a_registry_on_s3(s3, tmp_path, tiny_causal):
    """serve.adapter_root on an object store, what every replica of a cluster can read: names are listed, the
    current version and a pinned one are fetched into the local cache, and a rollback is seen."""
    from jobs import registry
    from serve import adapters
    from tests.serve_fixtures import make_adapter

    store = f"{s3}/served-registry"
    for seed in (1, 2):
        registry.publish(store, "qa", make_adapter(tiny_causal, tmp_path / f"v{seed}", seed=seed))
    cfg = load_config(None, [f"serve.adapter_root={store}", "serve.registry_poll_s=0"]).serve
    assert cfg.adapter_root == store and adapters.names(cfg) == ["qa"]
    current, pinned = adapters.resolve(cfg, "qa"), adapters.resolve(cfg, "qa@2")
    assert str(current).startswith(os.environ["LORAFLEET_CACHE"]) and current != pinned
    assert (current / adapters.WEIGHTS).read_bytes() == (tmp_path / "v2" / adapters.WEIGHTS).read_bytes()
    assert (pinned / adapters.WEIGHTS).read_bytes() == (tmp_path / "v1" / adapters.WEIGHTS).read_bytes()
    versions = adapters.CurrentVersions(cfg)
    assert versions.ref("qa") == adapters.Ref("qa", 3)
    registry.rollback(store, "qa")
    assert versions.ref("qa") == adapters.Ref("qa", 2) and adapters.resolve(cfg, "qa") == pinned
    with pytest.raises(adapters.UnknownAdapter, match="has no version 9; its versions: 2, 3"):
        adapters.resolve(cfg, "qa@9")


@pytest.mark.ray
def test_pipeline_and_sweep_keep_everything_in_s3(s3, tiny_causal, tmp_path):
    import ray
    from ray import serve

    from jobs.pipeline import pipeline
    from tune.sweep import sweep

    common = [f"model.name={tiny_causal}", f"ray.storage_path={s3}/runs", "data.demo_rows=96", "training.max_steps=6", "training.eval_steps=3",
              "training.logging_steps=3", "training.batch_size=4", "training.learning_rate=5e-3", "ray.resources_per_worker={CPU: 1}"]
    ray.init(num_cpus=2)
    try:
        run = load_config(None, [*common, f"training.output_dir={tmp_path / 'piped'}", "eval.max_new_tokens=4", "serve.replica_resources={CPU: 0.5}",
                                 "serve.port=8765"])
        outcome = pipeline(run)
        serve.shutdown()
        # Ray Train's checkpoints, the published outputs (with the eval report), and the deployed adapter's source.
        assert outcome.published == f"{s3}/runs/piped"
        published = _remote_files(outcome.published)
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "report.md", "metrics.json", "eval/eval.md"} <= published
        assert any(name.endswith("checkpoint/adapter_model.safetensors") for name in _remote_files(f"{s3}/runs") if name.startswith("piped-"))
        assert outcome.smoke["finish_reason"] in ("stop", "length")

        swept = sweep(load_config(None, [*common, f"tune.output_dir={tmp_path / 'swept'}", "tune.num_samples=2", "tune.max_concurrent_trials=1",
                                         "tune.learning_rate=[1e-4, 1e-2]"]))
        assert swept.summary["best"] is not None and swept.published == f"{s3}/runs/swept"
        assert {"leaderboard.csv", "leaderboard.md", "sweep.json", "best/adapter/adapter_model.safetensors", "best/lineage.json"} <= _remote_files(swept.published)
        trial_checkpoints = _remote_files(f"{s3}/runs/swept-checkpoints")
        assert sum(name.endswith("checkpoint/adapter_model.safetensors") for name in trial_checkpoints) >= 2, "each trial checkpointed to S3"
        lineage = json.loads((tmp_path / "swept" / "best" / "lineage.json").read_text())
        assert lineage["checkpoint"].startswith(f"{BUCKET}/runs/swept-checkpoints/"), "the best adapter came from the remote checkpoint"
    finally:
        ray.shutdown()


def test_a_crash_while_writing_never_leaves_a_half_adapter_where_readers_look(s3, tmp_path, monkeypatch):
    from jobs.adapter import install as install_adapter
    from serve import adapters

    checkpoint = _folder(tmp_path / "ckpt", {"adapter_config.json": "{}", "adapter_model.safetensors": "new", "tokenizer.json": "{}"})
    target = _folder(tmp_path / "run" / "adapter", {"adapter_config.json": "{}", "adapter_model.safetensors": "old"})
    real_copy2 = storage.shutil.copy2
    calls = []

    def dies_on_second_file(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy2(src, dst, *args, **kwargs)

    # Local install: the old adapter stays whole, and no staging folder is left beside it.
    monkeypatch.setattr(storage.shutil, "copy2", dies_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        install_adapter(checkpoint, target)
    monkeypatch.undo()
    assert (target / "adapter_model.safetensors").read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["adapter"]

    # Upload to the store: dies before adapter_config.json (always last), so readers find no adapter, not half of one.
    real_copy = storage.pafs.copy_files
    monkeypatch.setattr(storage.pafs, "copy_files", lambda src, dst, **kw: (_ for _ in ()).throw(OSError("connection reset")) if dst.endswith("adapter_config.json") else real_copy(src, dst, **kw))
    with pytest.raises(OSError, match="connection reset"):
        storage.publish(tmp_path / "run", f"{s3}/crash")
    uri = f"{s3}/crash/run/adapter"
    assert "adapter/adapter_model.safetensors" in _remote_files(f"{s3}/crash/run") and not adapters.exists(uri)
    monkeypatch.undo()

    # Download: dies halfway, so nothing lands in the cache; the next fetch gets the whole adapter.
    storage.publish(tmp_path / "run", f"{s3}/crash")
    cache = tmp_path / "cache"
    monkeypatch.setattr(storage.pafs, "copy_files", lambda *a, **kw: (_ for _ in ()).throw(OSError("connection reset")))
    with pytest.raises(OSError, match="connection reset"):
        storage.fetch(uri, cache)
    monkeypatch.undo()
    assert list(cache.iterdir()) == []
    assert adapters.is_adapter_folder(storage.fetch(uri, cache))


@pytest.mark.ray
def test_the_vllm_engine_serves_an_adapter_from_s3_as_from_its_folder(s3, tiny_causal_vllm, tmp_path):
    import httpx
    import ray
    from ray import serve

    from serve.app import deploy
    from tests.serve_fixtures import make_adapter
    from tests.subprocesses import free_port

    local = make_adapter(tiny_causal_vllm, tmp_path / "run" / "adapter", seed=1)
    uri = storage.publish(tmp_path / "run", f"{s3}/runs")
    run = load_config(None, [f"model.name={tiny_causal_vllm}", "quantization.mode=none", "serve.engine=vllm", "serve.vllm_max_lora_rank=8",
                             "serve.vllm_kv_cache_gib=0.25", "serve.vllm_dtype=float32", "serve.replica_resources={CPU: 1}", f"serve.port={free_port()}",
                             f"serve.adapters={{remote: {uri}/adapter, local: {local}}}"])
    ray.init(num_cpus=2)
    try:
        url = deploy(run).url
        answers = {}
        for model in ("remote", "local"):
            response = httpx.post(f"{url}/completions", json={"model": model, "prompt": "first second third", "max_tokens": 8, "temperature": 0}, timeout=300)
            assert response.status_code == 200, response.text
            answers[model] = response.json()["choices"][0]["text"]
        assert answers["remote"] == answers["local"] and answers["remote"]
    finally:
        serve.shutdown()
        ray.shutdown()
