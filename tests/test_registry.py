"""The adapter registry (`lorafleet registry publish | list | rollback`) on a folder and on a local S3 (moto)."""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from jobs import registry
from jobs.cli import app as cli
from jobs.config import load_config
from serve import adapters


def _adapter(folder: Path, weights: str, with_run: bool = False) -> Path:
    """A stand-in adapter (the registry copies files; it never loads them) inside a run folder when `with_run`."""
    adapter_dir = folder / "adapter"
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_config.json").write_text("{}")
    (adapter_dir / "adapter_model.safetensors").write_text(weights)
    if with_run:
        (folder / "config.yaml").write_text("lora: {r: 8}\n")
        (folder / "metrics.json").write_text(json.dumps({"final_eval_loss": 1.25, "steps": 30, "log_history": []}))
    return adapter_dir


def _weights(version: registry.Version) -> str:
    fs, path = (pafs.FileSystem.from_uri(version.uri) if "://" in version.uri else (pafs.LocalFileSystem(), version.uri))
    with fs.open_input_stream(f"{path}/adapter_model.safetensors") as stream:
        return stream.read().decode()


@pytest.fixture(params=["folder", "s3"])
def where(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "registry")
    return f"{request.getfixturevalue('s3')}/registry-{tmp_path.name}"


def test_publish_rollback_and_pin_versions(where, tmp_path):
    first = registry.publish(where, "squad", _adapter(tmp_path / "run1", "w1", with_run=True))
    second = registry.publish(where, "squad", _adapter(tmp_path / "run2", "w2"))
    assert (first.number, second.number) == (2, 3)  # 1 is a plain folder's number
    assert registry.current(where, "squad").number == 3 and _weights(registry.current(where, "squad")) == "w2"
    assert first.lineage == {"run": str((tmp_path / "run1").resolve()), "metrics": {"final_eval_loss": 1.25, "steps": 30}}

    assert registry.rollback(where, "squad").number == 2
    assert _weights(registry.current(where, "squad")) == "w1"
    assert registry.rollback(where, "squad", to=3).number == 3
    with pytest.raises(registry.RegistryError, match="--to = 7: squad has versions 2, 3"):
        registry.rollback(where, "squad", to=7)
    assert [v.number for v in registry.versions(where, "squad")] == [2, 3]
    assert registry.names(where) == ["squad"]


def test_a_publish_that_died_halfway_is_never_read_and_its_number_never_reused(where, tmp_path, monkeypatch):
    registry.publish(where, "squad", _adapter(tmp_path / "run1", "w1"))
    real_write = registry._write
    monkeypatch.setattr(registry, "_write", lambda fs, path, data: (_ for _ in ()).throw(OSError("connection reset")) if path.endswith("version.json") else real_write(fs, path, data))
    with pytest.raises(OSError):
        registry.publish(where, "squad", _adapter(tmp_path / "run2", "half"))
    monkeypatch.undo()
    assert [v.number for v in registry.versions(where, "squad")] == [2] and registry.current(where, "squad").number == 2
    assert registry.publish(where, "squad", _adapter(tmp_path / "run3", "w3")).number == 4


def test_old_versions_are_pruned_but_never_the_current_one(tmp_path):
    where = str(tmp_path / "registry")
    for i in range(4):
        registry.publish(where, "squad", _adapter(tmp_path / f"run{i}", f"w{i}"), keep=2)
    assert [v.number for v in registry.versions(where, "squad")] == [4, 5]
    registry.rollback(where, "squad", to=4)
    registry.publish(where, "squad", _adapter(tmp_path / "run9", "w9"), keep=1)
    assert [v.number for v in registry.versions(where, "squad")] == [6]


def test_a_plain_adapter_folder_is_version_1_and_serving_reads_the_current_version(tmp_path):
    root = tmp_path / "registry"
    _adapter(root / "plain", "old").rename(root / "squad")  # what serve.adapter_root held before versions
    cfg = load_config(None, [f"serve.adapter_root={root}"]).serve
    assert adapters.resolve(cfg, "squad") == root / "squad"
    registry.publish(str(root), "squad", _adapter(tmp_path / "run", "new"))
    assert (adapters.resolve(cfg, "squad") / "adapter_model.safetensors").read_text() == "new"
    registry.rollback(str(root), "squad")
    assert adapters.resolve(cfg, "squad") == root / "squad"
    assert adapters.names(cfg) == ["squad"]


def test_the_registry_commands_keep_their_arguments_and_say_what_to_fix(tmp_path):
    where = str(tmp_path / "registry")
    runner = CliRunner()
    published = runner.invoke(cli, ["registry", "publish", where, "squad", str(_adapter(tmp_path / "run", "w1", with_run=True))])
    assert published.exit_code == 0 and "squad: version 2 published and current" in published.stdout, published.output
    runner.invoke(cli, ["registry", "publish", where, "squad", str(_adapter(tmp_path / "run2", "w2")), "--keep", "5"])
    listed = runner.invoke(cli, ["registry", "list", where])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("  squad@2 ") and '"final_eval_loss": 1.25' in lines[0] and lines[1].startswith("* squad@3 ")
    rolled = runner.invoke(cli, ["registry", "rollback", where, "squad", "--to", "2"])
    assert rolled.exit_code == 0 and "squad: version 2 is current" in rolled.stdout
    missing = runner.invoke(cli, ["registry", "publish", where, "squad", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "ADAPTER_DIR" in missing.output and "no adapter_config.json" in missing.output
    bad_name = runner.invoke(cli, ["registry", "rollback", where, "../etc"])
    assert bad_name.exit_code == 2 and "NAME = '../etc'" in bad_name.output
