"""reference/configuration.md from the pydantic schema: every section of `RunConfig` and every field,
with its type, default and description, nested models included (walked through `model_fields`)."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .markdown import code, table, text


@dataclass
class Section:
    """One model of the schema and where it sits in a config file."""

    path: str  # dotted key of its fields' parent: "model", "tune.space.<key>"
    model: type[BaseModel]
    description: str
    anchor: str


def _anchor(path: str) -> str:
    return path.replace(".", "-").replace("<", "").replace(">", "").replace("[]", "-item")


def _models_in(annotation) -> Iterator[tuple[str, type[BaseModel]]]:
    """Models inside a field's type, each with the suffix its fields' keys get: "" directly,
    ".<key>" as a map's values, "[]" as a list's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and not issubclass(annotation, SecretStr):
        yield "", annotation
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict and len(args) == 2:
        for suffix, model in _models_in(args[1]):
            yield ".<key>" + suffix, model
    elif origin in (list, tuple, set, frozenset):
        for arg in args:
            for suffix, model in _models_in(arg):
                yield "[]" + suffix, model
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _models_in(arg)


def sections(root: type[BaseModel]) -> list[Section]:
    """Every model below `root`, depth first in field order; `root`'s own fields are the top-level sections."""
    found: list[Section] = []

    def walk(model: type[BaseModel], path: str, description: str) -> None:
        found.append(Section(path, model, description, _anchor(path)))
        for name, field in model.model_fields.items():
            for suffix, inner in _models_in(field.annotation):
                walk(inner, f"{path}.{name}{suffix}", field.description or "")

    for name, field in root.model_fields.items():
        for suffix, inner in _models_in(field.annotation):
            walk(inner, f"{name}{suffix}", field.description or "")
    return found


def field_paths(root: type[BaseModel]) -> list[str]:
    """The dotted key of every field the reference lists: `model.name`, `tune.space.<key>.choice`, ..."""
    return [f"{section.path}.{name}" for section in sections(root) for name in section.model.model_fields]


# --- types -----------------------------------------------------------------------------------

_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", SecretStr: "secret string", typing.Any: "any",
          type(None): "null"}


def _value(value) -> str:
    """A value as it is written in YAML (flow style for maps and lists)."""
    if isinstance(value, SecretStr):
        return '"**********"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        return _value(value.model_dump())
    return str(value)


def type_text(annotation, links: dict[type[BaseModel], str] | None = None) -> str:
    """A field's type in words, as Markdown: `one of "auto", "causal"`, `list of string or null`, ..."""
    links = links or {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in links:
        return f"[{code(links[annotation][0])}](#{links[annotation][1]})"
    if origin is typing.Literal:
        values = ", ".join(code(_value(a)) for a in args)
        return values if len(args) == 1 else f"one of {values}"
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        words = " or ".join(type_text(a, links) for a in parts)
        return words + (" or null" if len(parts) < len(args) else "")
    if origin in (list, set, frozenset):
        return f"list of {_inner(args[0], links)}" if args else "list"
    if origin is tuple:
        return "\\[" + ", ".join(type_text(a, links) for a in args) + "\\]"
    if origin is dict:
        return f"map of {_inner(args[0], links)} to {_inner(args[1], links)}" if args else "map"
    if annotation in _NAMES:
        return _NAMES[annotation]
    return code(getattr(annotation, "__name__", str(annotation)))


def _inner(annotation, links) -> str:
    """A type inside a list or map: a union in parentheses, so `list of (string or list of string)` reads one way."""
    words = type_text(annotation, links)
    return f"({words})" if typing.get_origin(annotation) in (typing.Union, types.UnionType) else words


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "≤"))


def constraints(field: FieldInfo) -> str:
    """The field's numeric bounds, e.g. `> 0, < 1`."""
    found = []
    for meta in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                found.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(found)


def default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see its section"
    return code(_value(value))


# --- the page --------------------------------------------------------------------------------


def _section_title(section: Section) -> str:
    if "<key>" in section.path or "[]" in section.path:
        return f"{code(section.path)}: one entry"
    return code(section.path)


def page(root: type[BaseModel] | None = None) -> str:
    if root is None:
        from jobs.config.schema import RunConfig

        root = RunConfig
    found = sections(root)
    links = {s.model: (s.path, s.anchor) for s in found if "." in s.path}
    top = [s for s in found if "." not in s.path]
    out = [
        "# Configuration reference",
        "",
        ("Generated at build time from `jobs/config/schema.py`, the pydantic model `RunConfig` that every "
        "command validates. A run config is one YAML file whose top-level keys are the sections below; "
        "each section may be left out (every field has a default). Any field can also be set on the command "
        "line as a dotted override after the config file, e.g. "
        "`lorafleet train --config configs/demo.yaml training.learning_rate=1e-4 lora.r=16`; maps and lists take "
        "YAML flow syntax (`ray.resources_per_worker={CPU: 4}`). Unknown keys are errors, and the cross-field "
        "rules in `jobs/config/rules.py` run on every load, so `lorafleet train` stops before Ray starts on a "
        "config that cannot work."),
        "",
        table(["section", "what it configures", "fields"],
              [[f"[{code(s.path)}](#{s.anchor})", text(s.description), str(len(s.model.model_fields))] for s in top],
              ["l", "l", "r"]),
    ]
    for section in found:
        level = "##" if "." not in section.path else "###"
        out += ["", f"{level} {_section_title(section)} {{ #{section.anchor} }}", ""]
        if section.description:
            out += [text(section.description), ""]
        doc = section.model.__dict__.get("__doc__")
        if doc:
            out += [text(" ".join(doc.split())), ""]
        rows = []
        for name, field in section.model.model_fields.items():
            kind = type_text(field.annotation, links)
            bounds = constraints(field)
            rows.append([code(f"{section.path}.{name}"), kind + (f", {bounds}" if bounds else ""), default_text(field),
                         text(field.description or "")])
        out.append(table(["key", "type", "default", "description"], rows))
    return "\n".join(out) + "\n"
