"""Where served adapters come from: named folders or s3:// / gs:// URIs in the config (a URI is
fetched into the replica's local cache on first use), or the versions of each adapter in a
registry (`jobs.registry`: a folder, or s3:// / gs:// fetched the same way; a new name is servable at once).

Engines load an adapter by key: `NAME@VERSION` for a registry version, `NAME` for a configured
adapter (it has no versions). A version's files never change, so a key always means the same
weights: a new version is a new key, hence a new PEFT adapter, a new vLLM LoRA id and name, and
new prefix-cache blocks. Which version `NAME` means is the API replica's choice (`CurrentVersions`).

A name is one path component (`ADAPTER_NAME`) and its folder must resolve inside the registry,
so no request can make a replica read outside it; only safetensors weights count as an adapter.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from jobs import registry, storage
from jobs.adapter import CONFIG, WEIGHTS, is_adapter_folder
from jobs.config import ADAPTER_NAME, ServeSection


class UnknownAdapter(LookupError):
    """The requested adapter is not servable; the message says why and what is available."""


class AdapterLoadError(ValueError):
    """An adapter folder exists but does not fit this base model or this engine (a 400 model_not_loadable)."""


PINNED = re.compile(r"^(?P<name>[^@]+)@(?P<version>[0-9]{1,9})$")


@dataclass(frozen=True)
class Ref:
    """An adapter's name and version (None: a configured adapter, which has no versions)."""

    name: str
    version: int | None = None

    @property
    def key(self) -> str:
        """The engines' id for these weights: Serve's multiplexed model id, PEFT's adapter name, vLLM's LoRA name."""
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse(model: str) -> Ref:
    """`NAME` or `NAME@VERSION` (a pinned version), or UnknownAdapter."""
    pinned = PINNED.match(model)
    name, version = (pinned["name"], int(pinned["version"])) if pinned else (model, None)
    if not ADAPTER_NAME.match(name):
        raise UnknownAdapter(
            f"{model[:80]!r} is not a valid adapter name (1-64 letters, digits, '.', '_' or '-', then @VERSION to pin one)"
        )
    return Ref(name, version)


def exists(path: str) -> bool:
    """An adapter folder, local or on an object store (checked there without downloading)."""
    return storage.has_files(path, (CONFIG, WEIGHTS)) if storage.is_remote(path) else is_adapter_folder(Path(path))


def _in_root(root: str, ref: Ref) -> registry.Version | None:
    """`ref`'s version in the registry (`jobs.registry`; a plain adapter folder is version 1), its current version
    when `ref` names none. On an object store a valid name is one key component, so it cannot leave the registry."""
    if not storage.is_remote(root) and (Path(root) / ref.name).resolve().parent != Path(root).resolve():
        return None
    if ref.version is None:
        return registry.current(root, ref.name)
    return registry.version(root, ref.name, ref.version)


_fetched_versions: dict[str, Path] = {}  # a remote version's local copy: a numbered version's files never change


def _local_copy(name: str, version: registry.Version) -> Path:
    if not storage.is_remote(version.uri):
        return Path(version.uri)
    if version.uri in _fetched_versions:
        return _fetched_versions[version.uri]
    folder = _fetched(name, version.uri)
    if version.number != registry.LEGACY:  # a plain folder may be replaced in place: fetch checks it each time
        _fetched_versions[version.uri] = folder
    return folder


def resolve(cfg: ServeSection, key: str) -> Path:
    """The folder of adapter `key` (`NAME` or `NAME@VERSION`), or UnknownAdapter."""
    ref = parse(key)
    name = ref.name
    if name in cfg.adapters:
        if ref.version is not None:
            raise UnknownAdapter(f"adapter {name!r} is set in serve.adapters, which has no versions; ask for {name!r}")
        folder = (
            _fetched(name, cfg.adapters[name]) if storage.is_remote(cfg.adapters[name]) else Path(cfg.adapters[name])
        )
        if not is_adapter_folder(folder):
            raise UnknownAdapter(f"adapter {name!r}: {folder} has no {CONFIG} + {WEIGHTS}")
        return folder
    return _local_copy(name, _find(cfg, ref))


def _find(cfg: ServeSection, ref: Ref) -> registry.Version:
    """`ref`'s version in serve.adapter_root (the current one when `ref` names none), or UnknownAdapter saying why."""
    if cfg.adapter_root and (found := _in_root(cfg.adapter_root, ref)):
        return found
    if ref.version is not None and ref.name in names(cfg):
        kept = ", ".join(str(v.number) for v in registry.versions(cfg.adapter_root, ref.name))
        raise UnknownAdapter(f"adapter {ref.name!r} has no version {ref.version}; its versions: {kept}")
    raise UnknownAdapter(f"no adapter named {ref.name!r}; available: {', '.join(names(cfg)) or 'none'}")


class CurrentVersions:
    """Which version each registry name means, as an API replica sees it: read again once older than
    `serve.registry_poll_s`, so a publish or rollback is served within that time, and every request
    after it is sent to the new version's key while requests already sent finish on theirs."""

    def __init__(self, cfg: ServeSection):
        self.cfg = cfg
        self.seen: dict[str, tuple[int, float]] = {}  # name -> (version, when read)

    def ref(self, model: str) -> Ref:
        """The adapter and version that answer `model` (`NAME` or `NAME@VERSION`), or UnknownAdapter."""
        ref = parse(model)
        if ref.name in self.cfg.adapters:
            resolve(self.cfg, ref.key)
            return ref
        if ref.version is not None:  # checked, not fetched: the API replica holds no model
            _find(self.cfg, ref)
            return ref
        seen = self.seen.get(ref.name)
        now = time.monotonic()
        if seen is None or now - seen[1] >= self.cfg.registry_poll_s:
            seen = self.seen[ref.name] = (_find(self.cfg, ref).number, now)
        return Ref(ref.name, seen[0])

    def listing(self) -> list[Ref]:
        """Every servable adapter with the version a request for its name gets now."""
        out = []
        for name in names(self.cfg):
            try:
                out.append(self.ref(name))
            except UnknownAdapter:  # removed since it was listed
                continue
        return out


def _fetched(name: str, uri: str) -> Path:
    try:
        return storage.fetch(uri)
    except OSError as exc:
        raise UnknownAdapter(f"adapter {name!r}: cannot fetch {uri}: {exc}") from None


def names(cfg: ServeSection) -> list[str]:
    """Every servable adapter name: the configured ones (a URI is listed without fetching it), then the registry's
    subfolders.
    """
    found = [name for name, path in cfg.adapters.items() if storage.is_remote(path) or is_adapter_folder(Path(path))]
    root = cfg.adapter_root
    if root and (storage.is_remote(root) or Path(root).is_dir()):
        found += [name for name in registry.names(root) if name not in found and _in_root(root, Ref(name))]
    return found


def check_fits(model, name: str, folder: Path) -> None:
    """AdapterLoadError unless every LoRA matrix of the adapter fits a module of this base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, tensor in load_file(folder / WEIGHTS).items():
        side = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
        if side is None:
            continue
        path = key.split(f".lora_{side}.")[0].removeprefix("base_model.model.")
        try:
            module = base.get_submodule(path)
        except AttributeError:
            raise AdapterLoadError(
                f"adapter {name!r} ({folder}) adapts {path}, which this base model does not have: it was trained on "
                "another architecture"
            ) from None
        module = getattr(module, "base_layer", module)  # already wrapped for another adapter
        expected = getattr(module, "in_features" if side == "A" else "out_features", None)
        actual = tensor.shape[1] if side == "A" else tensor.shape[0]
        if expected is not None and expected != actual:
            raise AdapterLoadError(
                f"adapter {name!r} ({folder}) has {actual} features where {path} has {expected}: it was trained on "
                "another model size"
            )
