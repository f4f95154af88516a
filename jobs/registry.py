"""The adapter registry: immutable numbered versions of each named adapter and which one is current, on a local
folder or an object store (s3://, gs://), the same layout on both.

    REGISTRY/NAME/versions/N/     the adapter's files, `lineage/` (the training run's config and metrics, when
                                  the adapter came out of a lorafleet run), and `version.json`, written last
    REGISTRY/NAME/current         {"version": N, ...}, replaced in one write
    REGISTRY/NAME/<adapter files> a plain adapter folder, as `serve.adapter_root` held before: version 1

A version counts once its `version.json` exists, so a reader sees all of a version or none of it, on a store
without atomic folder renames too; a publish that dies halfway leaves a folder no one reads, and its number is
never used again. Version numbers only grow and a version's folder is never written twice. One publisher per name
at a time (an object store offers no lock to take a number with).
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from jobs import adapter
from jobs.config import ADAPTER_NAME

VERSIONS, CURRENT, VERSION_FILE, LINEAGE = "versions", "current", "version.json", "lineage"
LINEAGE_FILES = ("config.yaml", "metrics.json")  # what a lorafleet training run writes beside its adapter/
LINEAGE_METRICS = ("final_train_loss", "final_eval_loss", "best_eval_loss", "steps", "train_runtime_s")
LEGACY = 1  # the number of a plain adapter folder at REGISTRY/NAME


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Version:
    number: int
    uri: str  # the version's folder
    published: str  # ISO time, UTC
    lineage: dict[str, Any]
    gate: dict[str, Any] = field(default_factory=dict)  # an evaluation gate's decision (lorafleet pipeline)


def _fs(registry: str) -> tuple[pafs.FileSystem, str]:
    if "://" in registry:
        return pafs.FileSystem.from_uri(registry)
    return pafs.LocalFileSystem(), str(Path(registry).resolve())


def _uri(registry: str, path: str) -> str:
    """The registry's own spelling (scheme and bucket) of a path its filesystem returned."""
    if "://" not in registry:
        return path
    scheme = registry.split("://", 1)[0]
    return f"{scheme}://{path}"


def _check_name(name: str) -> None:
    if not ADAPTER_NAME.match(name):
        raise RegistryError(f"NAME = {name[:80]!r}: 1-64 letters, digits, '.', '_' or '-'; pick such a name")


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One object written whole: on a local disk through a rename, on an object store a PUT is already whole."""
    if isinstance(fs, pafs.LocalFileSystem):
        staging = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(staging) as out:
            out.write(data)
        fs.move(staging, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _home(registry: str, name: str) -> tuple[pafs.FileSystem, str]:
    _check_name(name)
    fs, root = _fs(registry)
    return fs, f"{root}/{name}"


def _version(fs: pafs.FileSystem, registry: str, home: str, number: int) -> Version | None:
    """Version `number` if it is complete: a plain folder's files (1), or a version folder's version.json."""
    if number == LEGACY:
        config, weights = fs.get_file_info([f"{home}/{adapter.CONFIG}", f"{home}/{adapter.WEIGHTS}"])
        if config.type != pafs.FileType.File or weights.type != pafs.FileType.File:
            return None
        published = weights.mtime.astimezone(datetime.UTC).isoformat(timespec="seconds") if weights.mtime else ""
        return Version(LEGACY, _uri(registry, home), published, {})
    folder = f"{home}/{VERSIONS}/{number}"
    meta = _read_json(fs, f"{folder}/{VERSION_FILE}")
    if meta is None:
        return None
    return Version(number, _uri(registry, folder), meta["published"], meta.get("lineage", {}), meta.get("gate", {}))


def _numbers(fs: pafs.FileSystem, home: str) -> list[int]:
    """Every number with a folder under versions/, complete or not."""
    entries = fs.get_file_info(pafs.FileSelector(f"{home}/{VERSIONS}", allow_not_found=True))
    return [int(e.base_name) for e in entries if e.base_name.isdigit()]


def versions(registry: str, name: str) -> list[Version]:
    """The complete versions of `name`, oldest first."""
    fs, home = _home(registry, name)
    found = (_version(fs, registry, home, n) for n in sorted({LEGACY, *_numbers(fs, home)}))
    return [v for v in found if v is not None]


def names(registry: str) -> list[str]:
    fs, root = _fs(registry)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and ADAPTER_NAME.match(e.base_name))


def current(registry: str, name: str) -> Version | None:
    """The version served under `name`: the one `current` names, else (a plain folder) version 1. Reads the
    pointer and that one version only: serving asks at every batch."""
    fs, home = _home(registry, name)
    pointer = _read_json(fs, f"{home}/{CURRENT}")
    return _version(fs, registry, home, pointer["version"] if pointer is not None else LEGACY)


def version(registry: str, name: str, number: int) -> Version | None:
    """Version `number` of `name`, if it is complete and kept."""
    fs, home = _home(registry, name)
    return _version(fs, registry, home, number)


def _set_current(registry: str, name: str, number: int, reason: str) -> None:
    fs, home = _home(registry, name)
    record = {"version": number, "since": _now(), "reason": reason}
    _write(fs, f"{home}/{CURRENT}", json.dumps(record).encode())


def _lineage(adapter_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """What the training run beside the adapter says of it: its folder, headline metrics and config."""
    run = adapter_dir.parent
    files = [run / f for f in LINEAGE_FILES if (run / f).is_file()]
    if not files:
        return {}, []
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    return {
        "run": str(run.resolve()),
        "metrics": {k: metrics[k] for k in LINEAGE_METRICS if metrics.get(k) is not None},
    }, files


def publish(
    registry: str, name: str, adapter_dir: Path, keep: int = 10, make_current: bool = True, gate: dict | None = None
) -> Version:
    """A new immutable version of `name` from `adapter_dir`, made current unless `make_current` is false (an
    evaluation gate refused it; `gate` records why); versions beyond the newest `keep` are removed (never the
    current one)."""
    fs, home = _home(registry, name)
    if not adapter.is_adapter_folder(adapter_dir):
        raise RegistryError(
            f"ADAPTER_DIR = {str(adapter_dir)!r}: no {adapter.CONFIG} + {adapter.WEIGHTS} there; pass the adapter folder a training run wrote (<training.output_dir>/adapter)"
        )
    if keep < 1:
        raise RegistryError(f"--keep = {keep}: keep at least 1 version (the current one)")
    number = max([LEGACY, *_numbers(fs, home)]) + 1  # above every number in use: no folder is written twice
    folder = f"{home}/{VERSIONS}/{number}"
    fs.create_dir(folder)
    files = sorted((p for p in adapter_dir.iterdir() if p.is_file()), key=adapter.last_is_config)
    lineage, lineage_files = _lineage(adapter_dir)
    for path in files:
        pafs.copy_files(str(path), f"{folder}/{path.name}", destination_filesystem=fs)
    if lineage_files:
        fs.create_dir(f"{folder}/{LINEAGE}")  # a local disk needs the folder; an object store ignores it
    for path in lineage_files:
        pafs.copy_files(str(path), f"{folder}/{LINEAGE}/{path.name}", destination_filesystem=fs)
    meta = {
        "name": name,
        "version": number,
        "published": _now(),
        "source": str(adapter_dir.resolve()),
        "lineage": lineage,
        **({"gate": gate} if gate else {}),
    }
    _write(fs, f"{folder}/{VERSION_FILE}", json.dumps(meta, indent=2).encode())  # last: now the version exists
    if make_current:
        _set_current(registry, name, number, "publish")
    _prune(registry, name, keep)
    return Version(number, _uri(registry, folder), meta["published"], lineage)


def _prune(registry: str, name: str, keep: int) -> None:
    now = current(registry, name)
    fs, home = _home(registry, name)
    for old in versions(registry, name)[:-keep]:
        if old.number != LEGACY and (now is None or old.number != now.number):
            fs.delete_dir(f"{home}/{VERSIONS}/{old.number}")


def rollback(registry: str, name: str, to: int | None = None) -> Version:
    """Make an earlier version current: `to`, or the newest one below the current version."""
    known = versions(registry, name)
    if not known:
        raise RegistryError(
            f"NAME = {name!r}: no versions in {registry}; publish one first (lorafleet registry publish)"
        )
    now = current(registry, name)
    if to is None:
        earlier = [v for v in known if now is None or v.number < now.number]
        if not earlier:
            raise RegistryError(
                f"{name}: version {now.number if now else '?'} is the oldest kept; nothing to roll back to"
            )
        target = earlier[-1]
    else:
        target = next((v for v in known if v.number == to), None)
        if target is None:
            raise RegistryError(
                f"--to = {to}: {name} has versions {', '.join(str(v.number) for v in known)}; pick one of them"
            )
    _set_current(registry, name, target.number, f"rollback from {now.number if now else 'none'}")
    return target
