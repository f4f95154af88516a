"""The dotted-key view of a config model (`training.learning_rate`) that overrides and search spaces use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def section_at(root: type[BaseModel], parents: list[str] | tuple) -> type[BaseModel] | None:
    """The config section that the dotted path `parents` leads to from `root`, or None when it leads nowhere."""
    model = root
    for part in parents:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def field_at(root: type[BaseModel], key: str) -> Any:
    """The pydantic field a dotted key names, or None when the key does not exist."""
    *parents, leaf = key.split(".")
    section = section_at(root, parents)
    return section.model_fields.get(leaf) if section else None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += all_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys
