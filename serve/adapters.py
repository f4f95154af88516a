"""Where served adapters come from: named folders or s3:// / gs:// URIs in the config (a URI is
fetched into the replica's local cache on first use), or the current version of each adapter in a
registry folder (`jobs.registry`), read at request time (a new name is servable at once).

A name is one path component (`ADAPTER_NAME`) and its folder must resolve inside the registry,
so no request can make a replica read outside it; only safetensors weights count as an adapter.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from jobs import registry, storage
from jobs.adapter import CONFIG, WEIGHTS, is_adapter_folder
from jobs.config import ADAPTER_NAME, ServeSection


class UnknownAdapter(LookupError):
    """The requested adapter is not servable; the message says why and what is available."""


class AdapterLoadError(ValueError):
    """An adapter folder exists but does not fit this base model or this engine (a 400 model_not_loadable)."""


def exists(path: str) -> bool:
    """An adapter folder, local or on an object store (checked there without downloading)."""
    return storage.has_files(path, (CONFIG, WEIGHTS)) if storage.is_remote(path) else is_adapter_folder(Path(path))


def _in_root(root: Path, name: str) -> Path | None:
    """The current version of `name` in the registry folder (`jobs.registry`; a plain adapter folder is version 1)."""
    if (root / name).resolve().parent != root.resolve():
        return None
    version = registry.current(str(root), name)
    return Path(version.uri) if version else None


def resolve(cfg: ServeSection, name: str) -> Path:
    """The folder of adapter `name`, or UnknownAdapter."""
    if not ADAPTER_NAME.match(name):
        raise UnknownAdapter(f"{name[:80]!r} is not a valid adapter name (1-64 letters, digits, '.', '_' or '-')")
    if name in cfg.adapters:
        folder = (
            _fetched(name, cfg.adapters[name]) if storage.is_remote(cfg.adapters[name]) else Path(cfg.adapters[name])
        )
        if not is_adapter_folder(folder):
            raise UnknownAdapter(f"adapter {name!r}: {folder} has no {CONFIG} + {WEIGHTS}")
        return folder
    if cfg.adapter_root and (folder := _in_root(Path(cfg.adapter_root), name)):
        return folder
    raise UnknownAdapter(f"no adapter named {name!r}; available: {', '.join(names(cfg)) or 'none'}")


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
    root = Path(cfg.adapter_root) if cfg.adapter_root else None
    if root and root.is_dir():
        found += [name for name in registry.names(str(root)) if name not in found and _in_root(root, name)]
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
