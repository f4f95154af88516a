"""Markdown helpers shared by the generators: escaping text and writing tables."""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([\\*_\[\]|])")


def text(value: object) -> str:
    """Plain text as Markdown: spans in backticks stay code, the rest cannot turn into HTML, emphasis,
    links or table cells."""
    parts = str(value).replace("\n", " ").split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        parts = ["`".join(parts)]
    for i in range(0, len(parts), 2):
        parts[i] = _SPECIAL.sub(r"\\\1", parts[i]).replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def code(value: object) -> str:
    """Inline code that holds any text (backticks included); a pipe inside it does not split a table cell."""
    value = str(value).replace("\n", " ")
    fence = "``" if "`" in value else "`"
    return f"{fence} {value} {fence}" if fence == "``" else f"`{value}`"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A pipe table; cells are Markdown already (use `text` or `code`)."""
    marks = [{"r": "---:", "c": ":---:"}.get(a, "---") for a in (align or ["l"] * len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
