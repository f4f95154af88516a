"""Loading a config: the YAML file, dotted `key=value` overrides, validation with every problem
translated to field, value and fix, and the resolved config as saved with a run.

`load_config(path, overrides)` is the one way in: it raises `ConfigError` listing every problem
at once before anything touches Ray.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.config.errors import ConfigError, problem
from jobs.config.keys import section_at
from jobs.config.schema import RunConfig


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted `a.b.c=value` overrides; values are parsed as YAML (numbers, lists, bools)."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(
                problem("override", item, "write overrides as dotted.key=value, e.g. training.learning_rate=1e-4")
            )
            continue
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(problem(key, item, f"'{part}' is not a section, so it has no sub-keys"))
                break
            node = child
        else:
            try:
                node[leaf] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                reason = str(exc).splitlines()[0]
                problems.append(
                    problem(
                        key.strip(),
                        value,
                        f"not a YAML value ({reason}); quote the whole override in the shell, e.g. "
                        f"'ray.resources_per_worker={{CPU: 4}}'",
                    )
                )
    if problems:
        raise ConfigError(problems, "overrides")
    return raw


def _known_keys(loc: tuple) -> list[str]:
    section = section_at(RunConfig, loc[:-1])
    return list(section.model_fields) if section else []


def _describe(error: dict[str, Any]) -> list[str]:
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        leaf = str(error["loc"][-1])
        known = _known_keys(error["loc"])
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return [problem(field, error["input"], f"unknown key; {hint}")]
    if not field:  # cross-field rules: one line per problem
        return str(error["ctx"]["error"]).splitlines()
    message = error["msg"].removeprefix("Value error, ")
    return [problem(field, error["input"], f"{message}")]


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in _describe(error)]
        raise ConfigError(problems, source) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, validate: all errors at once."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(
                [problem("--config", str(path), "file not found; pass an existing YAML file")], source
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError([problem("--config", str(path), f"not valid YAML: {exc}")], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(
                [
                    problem(
                        "--config",
                        type(raw).__name__,
                        "the file must be a YAML mapping of sections (model:, lora:, ...)",
                    )
                ],
                source,
            )
    return validate(apply_overrides(raw, list(overrides)), source)


PATH_FIELDS = (
    "model.name",
    "data.path",
    "data.eval_path",
    "eval.json_schema",
    "training.deepspeed",
    "training.output_dir",
    "ray.storage_path",
    "tune.output_dir",
    "serve.adapter_root",
)


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The same config with relative local paths made absolute, for processes whose working
    directory is not the user's (Tune trials, Serve replicas). Hub ids and URIs stay as they are;
    what was left at its default stays unset (so defaults that depend on it still apply)."""
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    if cfg.serve.api_key is not None:  # a JSON dump masks secrets; this copy must keep working
        raw["serve"]["api_key"] = cfg.serve.api_key.get_secret_value()
    for key in PATH_FIELDS:
        section, leaf = key.split(".")
        if section == "tune" and not cfg.is_sweep:
            continue
        value = getattr(getattr(cfg, section), leaf)
        if (
            isinstance(value, str)
            and "://" not in value
            and value != "demo"
            and (Path(value).exists() or leaf in ("output_dir", "storage_path"))
        ):
            raw.setdefault(section, {})[leaf] = str(Path(value).resolve())
    if cfg.serve.adapters:
        raw["serve"]["adapters"] = {
            name: path if "://" in path else str(Path(path).resolve()) for name, path in cfg.serve.adapters.items()
        }
    return RunConfig.model_validate(raw)


def as_json(cfg: RunConfig, exclude: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as JSON for Ray workers, replicas and saved files: validated again, it is the same config.
    A run that is no sweep leaves its tune section out, which its copy would otherwise set, and so be checked as
    a sweep (`RunConfig.is_sweep`): a training run without evaluation data would fail in its Ray workers."""
    exclude = {**(exclude or {}), **({} if cfg.is_sweep else {"tune": True})}
    return cfg.model_dump(mode="json", exclude=exclude)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as saved with a run; secrets are left out (set them again where needed)."""
    return yaml.safe_dump(as_json(cfg, exclude={"serve": {"api_key"}}), sort_keys=False)
